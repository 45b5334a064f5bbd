//! Tests of [`super`]: overlayfs whiteouts and opaque directories become OCI ones, and the
//! agent's own unpacker, applying the base and the new layer, gives the tree the sandbox saw.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;
use crate::image::testing::{LayerEntry, layer};
use crate::image::unpack::{Compression, apply_layer};

/// The base image: `/etc/passwd`, `/etc/os-release`, `/opt/old`, `/opt/keep`.
fn base(dir: &Path) -> PathBuf {
    let bytes = layer(&[
        LayerEntry::Dir("etc"),
        LayerEntry::File("etc/passwd", b"root:x:0:0::/:/bin/sh\n", 0o644),
        LayerEntry::File("etc/os-release", b"base\n", 0o644),
        LayerEntry::Dir("opt"),
        LayerEntry::File("opt/old", b"old\n", 0o644),
        LayerEntry::File("opt/keep", b"keep\n", 0o644),
    ])
    .expect("base layer");
    let path = dir.join("base.tgz");
    fs::write(&path, bytes).expect("write base");
    path
}

/// Every path under `root` with what it is: file contents, `dir`, or `-> target`.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("inside")
                .display()
                .to_string();
            let meta = fs::symlink_metadata(&path).expect("meta");
            let what = if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).expect("link").display())
            } else {
                fs::read_to_string(&path).expect("file")
            };
            out.insert(rel, what);
        }
    }
    out
}

/// The layer's entries: path → (type byte, mode, uid, gid).
fn entries(path: &Path) -> Vec<(String, u8, u32, u64, u64)> {
    let file = fs::File::open(path).expect("layer");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .expect("entries")
        .map(|e| {
            let e = e.expect("entry");
            let h = e.header();
            (
                e.path().expect("path").display().to_string(),
                h.entry_type().as_byte(),
                h.mode().expect("mode"),
                h.uid().expect("uid"),
                h.gid().expect("gid"),
            )
        })
        .collect()
}

fn mknod_whiteout(path: &Path) {
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .expect("mknod (the tests run as root)");
}

#[test]
fn a_deleted_file_and_an_opaque_directory_become_oci_whiteouts() {
    let tmp = tempfile::tempdir().expect("tmp");
    let upper = tmp.path().join("upper");
    fs::create_dir_all(upper.join("etc")).expect("etc");
    fs::create_dir_all(upper.join("opt")).expect("opt");
    fs::create_dir_all(upper.join("home/sandbox")).expect("home");
    mknod_whiteout(&upper.join("etc/passwd"));
    xattr::set(upper.join("opt"), "trusted.overlay.opaque", b"y").expect("opaque xattr");
    fs::write(upper.join("opt/new"), "new\n").expect("new");
    fs::write(upper.join("home/sandbox/notes"), "mine\n").expect("notes");
    nix::unistd::chown(
        &upper.join("home/sandbox/notes"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .expect("chown");
    fs::set_permissions(
        upper.join("home/sandbox/notes"),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("notes", upper.join("home/sandbox/link")).expect("symlink");
    fs::hard_link(
        upper.join("home/sandbox/notes"),
        upper.join("home/sandbox/notes2"),
    )
    .expect("hard link");

    let out = tmp.path().join("layer.tgz");
    let written = write_layer(&upper, &out, 1 << 20).expect("layer");
    assert_eq!(written.size, fs::metadata(&out).expect("size").len());
    assert_eq!(written.file_bytes, 4 + 5);
    let listed = entries(&out);
    let names: Vec<&str> = listed.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "etc",
            "etc/.wh.passwd",
            "home",
            "home/sandbox",
            "home/sandbox/link",
            "home/sandbox/notes",
            "home/sandbox/notes2",
            "opt",
            "opt/.wh..wh..opq",
            "opt/new",
        ]
    );
    let notes = listed
        .iter()
        .find(|e| e.0 == "home/sandbox/notes")
        .expect("notes");
    assert_eq!(
        (notes.1, notes.2, notes.3, notes.4),
        (b'0', 0o640, 1000, 1000)
    );
    let notes2 = listed
        .iter()
        .find(|e| e.0 == "home/sandbox/notes2")
        .expect("link");
    assert_eq!(notes2.1, b'1', "a hard link inside the layer stays one");

    // The digests are of what is on disk: the blob, and the tar inside it.
    let blob = fs::read(&out).expect("blob");
    let hex = |b: &[u8]| -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    assert_eq!(written.digest, format!("sha256:{}", hex(&blob)));
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&blob[..])
        .read_to_end(&mut tar)
        .expect("gunzip");
    assert_eq!(written.diff_id, format!("sha256:{}", hex(&tar)));

    // The same tree gives the same bytes.
    let again = write_layer(&upper, &tmp.path().join("again.tgz"), 1 << 20).expect("again");
    assert_eq!(again.digest, written.digest);

    // Applied over the base with the agent's unpacker: the tree the sandbox saw.
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).expect("root");
    apply_layer(&root, &base(tmp.path()), Compression::Gzip).expect("base");
    apply_layer(&root, &out, Compression::Gzip).expect("snapshot layer");
    let got = tree(&root);
    assert!(!got.contains_key("etc/passwd"), "{got:?}");
    assert!(
        !got.contains_key("opt/old") && !got.contains_key("opt/keep"),
        "{got:?}"
    );
    assert_eq!(got["opt/new"], "new\n");
    assert_eq!(got["etc/os-release"], "base\n");
    assert_eq!(got["home/sandbox/notes2"], "mine\n");
    assert_eq!(got["home/sandbox/link"], "-> notes");
    let meta = fs::metadata(root.join("home/sandbox/notes")).expect("notes");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1000, 1000, 0o640)
    );
    assert!(!got.keys().any(|k| k.contains(".wh.")), "{got:?}");
}

#[test]
fn a_real_overlay_round_trips_through_the_layer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let lower = tmp.path().join("lower");
    fs::create_dir(&lower).expect("lower");
    let base = base(tmp.path());
    apply_layer(&lower, &base, Compression::Gzip).expect("base");
    let dir = tmp.path().join("sandbox");
    let merged = match crate::bundle::mount_rootfs(&dir, &lower) {
        Ok(m) => m,
        Err(why) => panic!("overlayfs is needed for this test (run as root): {why}"),
    };
    // What a sandbox does: write, delete, replace a directory of the image, rename.
    let changes = (|| -> io::Result<()> {
        fs::write(merged.join("etc/hello"), "hi\n")?;
        fs::remove_file(merged.join("etc/passwd"))?;
        fs::remove_dir_all(merged.join("opt"))?;
        fs::create_dir(merged.join("opt"))?;
        fs::write(merged.join("opt/fresh"), "fresh\n")?;
        fs::write(merged.join("etc/os-release"), "changed\n")?;
        Ok(())
    })();
    let seen = tree(&merged);
    crate::bundle::unmount_rootfs(&dir);
    changes.expect("changes through the overlay");

    let out = tmp.path().join("layer.tgz");
    write_layer(&dir.join("fs/upper"), &out, 1 << 20).expect("layer");
    let names: Vec<String> = entries(&out).into_iter().map(|e| e.0).collect();
    assert!(names.contains(&"etc/.wh.passwd".to_owned()), "{names:?}");
    assert!(names.contains(&"opt/.wh..wh..opq".to_owned()), "{names:?}");
    let root = tmp.path().join("rootfs");
    fs::create_dir(&root).expect("root");
    apply_layer(&root, &base, Compression::Gzip).expect("base");
    apply_layer(&root, &out, Compression::Gzip).expect("snapshot layer");
    assert_eq!(tree(&root), seen);
}

#[test]
fn changes_over_the_limit_are_refused_and_leave_no_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let upper = tmp.path().join("upper");
    fs::create_dir(&upper).expect("upper");
    fs::write(upper.join("big"), vec![7u8; 4096]).expect("big");
    let out = tmp.path().join("layer.tgz");
    let err = write_layer(&upper, &out, 4095).expect_err("over the limit");
    assert!(matches!(err, DiffError::TooLarge { limit: 4095 }), "{err}");
    assert!(err.to_string().contains("snapshot_max_bytes"), "{err}");
    assert!(!out.exists());
}
