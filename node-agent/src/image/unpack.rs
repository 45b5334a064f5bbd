//! Applies image layers (tar, optionally gzip-compressed) onto a root filesystem directory,
//! with OCI whiteouts: `.wh.NAME` deletes `NAME` from the layers below, `.wh..wh..opq`
//! empties its directory of what the layers below put there.
//!
//! A layer is read twice: first its whiteouts are applied (they only ever concern the layers
//! below, so doing them first is exact), then its entries are extracted. Nothing a layer says
//! can reach outside the root: entry paths with `..` or a symlinked parent are refused by
//! `tar`'s `unpack_in`, and a whiteout is applied only when every directory on its way is a
//! real directory inside the root (a layer cannot plant `a -> /` and then whiteout
//! `a/.wh.etc`).

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (the common case: `…tar+gzip`, `…tar.gzip`, Docker's `…tar.gzip`).
    Gzip,
}

impl Compression {
    /// The compression a layer media type names; `Err` for what berth cannot unpack.
    pub fn of_media_type(media_type: &str) -> Result<Compression, String> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
            other => Err(format!(
                "layer media type {other:?} is not supported (tar and tar+gzip are)"
            )),
        }
    }
}

fn open(blob: &Path, compression: Compression) -> io::Result<tar::Archive<Box<dyn Read>>> {
    let file = io::BufReader::new(fs::File::open(blob)?);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(file),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
    };
    Ok(tar::Archive::new(reader))
}

/// An entry path made relative and plain (no root, no `.`); `None` when it has `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// `root/rel` when every parent on the way is a real directory (not a symlink) under
/// `root`; the last component itself may be anything.
fn inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut at = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    let (last, parents) = parts.split_last()?;
    for part in parents {
        at.push(part);
        let meta = fs::symlink_metadata(&at).ok()?;
        if !meta.is_dir() || meta.file_type().is_symlink() {
            return None;
        }
    }
    at.push(last);
    Some(at)
}

/// Removes a file, a symlink (not its target) or a whole directory tree.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one layer blob onto `root`. Returns the bytes of regular files it wrote.
pub fn apply_layer(root: &Path, blob: &Path, compression: Compression) -> io::Result<u64> {
    // Pass 1: whiteouts.
    for entry in open(blob, compression)?.entries()? {
        let entry = entry?;
        let Some(path) = clean(&entry.path()?) else {
            continue;
        };
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name == OPAQUE {
            let dir = path.parent().unwrap_or(Path::new(""));
            let target = if dir.as_os_str().is_empty() {
                Some(root.to_path_buf())
            } else {
                inside(root, dir)
            };
            if let Some(target) = target.filter(|t| t.is_dir() && !t.is_symlink()) {
                for child in fs::read_dir(&target)? {
                    remove_any(&child?.path())?;
                }
            }
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let victim = path.with_file_name(hidden);
            if let Some(target) = inside(root, &victim) {
                remove_any(&target)?;
            }
        }
    }
    // Pass 2: everything else.
    let mut archive = open(blob, compression)?;
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(nix::unistd::geteuid().is_root());
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut bytes = 0u64;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let Some(path) = clean(&entry.path()?) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a layer entry's path leaves the root (`..`)",
            ));
        };
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(WHITEOUT_PREFIX) || path.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        // A layer's entry replaces what is below: a file over a directory, or the reverse.
        if let Some(target) = inside(root, &path) {
            if let Ok(meta) = fs::symlink_metadata(&target) {
                if meta.is_dir() != kind.is_dir() || meta.file_type().is_symlink() {
                    remove_any(&target)?;
                }
            }
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            // Device nodes come from the runtime's /dev, never from an image.
            continue;
        }
        if kind.is_file() {
            bytes += entry.header().size().unwrap_or(0);
        }
        entry.unpack_in(root)?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar layer from (path, contents) pairs; a `None` content is a directory, a path
    /// ending in `->target` a symlink.
    pub(crate) fn layer(dir: &Path, name: &str, entries: &[(&str, Option<&str>)]) -> PathBuf {
        let path = dir.join(name);
        let file = fs::File::create(&path).expect("layer");
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            file,
            flate2::Compression::fast(),
        ));
        for (entry, contents) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            if let Some((link, target)) = entry.split_once("->") {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                builder
                    .append_link(&mut header, link, target)
                    .expect("symlink");
                continue;
            }
            match contents {
                Some(text) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(text.len() as u64);
                    header.set_mode(0o644);
                    builder
                        .append_data(&mut header, entry, text.as_bytes())
                        .expect("file");
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    builder
                        .append_data(&mut header, entry, io::empty())
                        .expect("dir");
                }
            }
        }
        builder.into_inner().expect("tar").finish().expect("gzip");
        path
    }

    #[test]
    fn whiteouts_delete_and_opaque_directories_hide_the_layers_below() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        fs::create_dir(&root).expect("root");
        let base = layer(
            tmp.path(),
            "base.tgz",
            &[
                ("etc", None),
                ("etc/os-release", Some("base\n")),
                ("etc/passwd", Some("root:x:0:0::/:/bin/sh\n")),
                ("opt", None),
                ("opt/old", Some("old\n")),
                ("var", None),
                ("var/dir", None),
                ("var/dir/f", Some("f\n")),
            ],
        );
        let top = layer(
            tmp.path(),
            "top.tgz",
            &[
                ("etc/.wh.passwd", Some("")),
                ("opt/.wh..wh..opq", Some("")),
                ("opt/new", Some("new\n")),
                ("var/dir", Some("now a file\n")),
                ("etc/os-release", Some("top\n")),
            ],
        );
        apply_layer(&root, &base, Compression::Gzip).expect("base");
        let written = apply_layer(&root, &top, Compression::Gzip).expect("top");
        assert_eq!(written, 4 + 11 + 4);
        assert!(!root.join("etc/passwd").exists());
        assert!(!root.join("opt/old").exists());
        assert_eq!(
            fs::read_to_string(root.join("opt/new")).expect("new"),
            "new\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("var/dir")).expect("file"),
            "now a file\n"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/os-release")).expect("os"),
            "top\n"
        );
        assert!(!root.join("etc/.wh.passwd").exists());
    }

    #[test]
    fn a_layer_cannot_reach_outside_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("rootfs");
        fs::create_dir(&root).expect("root");
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).expect("outside");
        fs::write(outside.join("precious"), "keep").expect("precious");
        // A symlink to the outside, then a whiteout and a file through it.
        let evil = layer(
            tmp.path(),
            "evil.tgz",
            &[(&format!("escape->{}", outside.display()), None)],
        );
        apply_layer(&root, &evil, Compression::Gzip).expect("symlink layer");
        let through = layer(
            tmp.path(),
            "through.tgz",
            &[("escape/.wh.precious", Some(""))],
        );
        apply_layer(&root, &through, Compression::Gzip).expect("whiteout ignored");
        assert!(
            outside.join("precious").exists(),
            "whiteout followed a symlink"
        );
        let write = layer(tmp.path(), "write.tgz", &[("escape/planted", Some("x"))]);
        assert!(apply_layer(&root, &write, Compression::Gzip).is_err());
        assert!(
            !outside.join("planted").exists(),
            "a file was written through a symlink"
        );
        assert_eq!(clean(Path::new("/a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(clean(Path::new("a/../../b")), None);
    }

    #[test]
    fn media_types_are_named_when_unsupported() {
        assert_eq!(
            Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Ok(Compression::Gzip)
        );
        let err = Compression::of_media_type("application/vnd.oci.image.layer.v1.tar+zstd")
            .expect_err("zstd");
        assert!(err.contains("tar+zstd"), "{err}");
    }
}
