//! A sandbox's write layer (the overlayfs upper directory, `fs/upper`) as one OCI image
//! layer: a gzip-compressed tar that [`super::unpack::apply_layer`], or any OCI runtime,
//! applies over the sandbox's image to give the tree the sandbox saw.
//!
//! overlayfs and OCI say the same things in different words:
//!
//! | overlayfs upper | OCI layer |
//! |---|---|
//! | a character device 0/0 named `NAME` (the file was deleted) | an empty file `.wh.NAME` |
//! | a directory with `trusted.overlay.opaque = y` (or `user.overlay.opaque`, for an unprivileged mount): it replaced the lower one | the directory, then `DIR/.wh..wh..opq` |
//! | anything else | itself |
//!
//! The sandbox's overlay is mounted without `redirect_dir` or `metacopy` (the kernel's
//! defaults), so a renamed lower directory is a full copy in the upper one and a
//! `chmod` copies the whole file up: the upper directory alone holds every change.
//!
//! The tar is deterministic for a given tree: entries in byte order of their names,
//! depth first, a directory before its contents; mode, uid, gid and mtime kept as they
//! are (file owners matter to the image's users); user and group names left out; hard
//! links inside the layer written as links to the first path. Extended attributes other
//! than the overlay's own are not carried (file capabilities are lost, as with
//! `docker export`). Sockets are skipped; device nodes other than whiteouts too (the
//! runtime provides `/dev`).

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The marker overlayfs puts on a directory that hides the layers below it.
const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];

/// A layer written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerFile {
    /// The `.tar.gz` file.
    pub path: PathBuf,
    /// `sha256:` of the compressed bytes (the blob digest).
    pub digest: String,
    /// `sha256:` of the tar before compression (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Compressed size.
    pub size: u64,
    /// Bytes of regular files in it.
    pub file_bytes: u64,
    /// Entries written (whiteouts included).
    pub entries: u64,
}

/// Why a layer could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// Its files are over the limit (counted before compression).
    #[error(
        "the sandbox's filesystem changes are over {limit} bytes (snapshot_max_bytes); \
         remove what the image need not carry, or raise the node's limit"
    )]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Reading the upper directory or writing the layer failed.
    #[error("{0}")]
    Io(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DiffError + '_ {
    move |e| DiffError::Io(format!("{}: {e}", path.display()))
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn digest(self) -> (String, u64, W) {
        let hex: String = self
            .hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        (format!("sha256:{hex}"), self.bytes, self.inner)
    }
}

type Gz = flate2::write::GzEncoder<Hashing<io::BufWriter<fs::File>>>;

struct Writer {
    tar: tar::Builder<Hashing<Gz>>,
    limit: u64,
    file_bytes: u64,
    entries: u64,
    /// (device, inode) of files with several links → the first path written.
    linked: HashMap<(u64, u64), PathBuf>,
}

/// A header with the entry's own mode, owner and mtime.
fn header(meta: &fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    h.set_size(size);
    h
}

/// An empty regular file (a whiteout), root-owned.
fn marker() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    h
}

fn is_opaque(path: &Path) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|name| matches!(xattr::get(path, name), Ok(Some(v)) if v == b"y"))
}

impl Writer {
    fn whiteout(&mut self, path: &Path) -> io::Result<()> {
        self.entries += 1;
        self.tar
            .append_data(&mut marker(), path, io::empty())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Writes the directory `dir` (relative `rel`, empty for the root) and what it holds.
    fn directory(&mut self, dir: &Path, rel: &Path) -> Result<(), DiffError> {
        if is_opaque(dir) {
            self.whiteout(&rel.join(".wh..wh..opq"))
                .map_err(io_at(dir))?;
        }
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(io_at(dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(io_at(dir))?;
        names.sort();
        for name in names {
            let full = dir.join(&name);
            let rel = rel.join(&name);
            let meta = fs::symlink_metadata(&full).map_err(io_at(&full))?;
            let kind = meta.file_type();
            if kind.is_char_device() && meta.rdev() == 0 {
                let mut hidden = std::ffi::OsString::from(".wh.");
                hidden.push(&name);
                self.whiteout(&rel.with_file_name(hidden))
                    .map_err(io_at(&full))?;
            } else if kind.is_dir() {
                let mut h = header(&meta, tar::EntryType::Directory, 0);
                self.entries += 1;
                self.tar
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(io_at(&full))?;
                self.directory(&full, &rel)?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&full).map_err(io_at(&full))?;
                let mut h = header(&meta, tar::EntryType::Symlink, 0);
                self.entries += 1;
                self.tar
                    .append_link(&mut h, &rel, &target)
                    .map_err(io_at(&full))?;
            } else if kind.is_file() {
                self.file(&full, &rel, &meta)?;
            } else if kind.is_fifo() {
                let mut h = header(&meta, tar::EntryType::Fifo, 0);
                self.entries += 1;
                self.tar
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(io_at(&full))?;
            }
            // Sockets and device nodes are not image content.
        }
        Ok(())
    }

    fn file(&mut self, full: &Path, rel: &Path, meta: &fs::Metadata) -> Result<(), DiffError> {
        self.entries += 1;
        if meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.linked.get(&key).cloned() {
                let mut h = header(meta, tar::EntryType::Link, 0);
                return self
                    .tar
                    .append_link(&mut h, rel, &first)
                    .map_err(io_at(full));
            }
            self.linked.insert(key, rel.to_path_buf());
        }
        self.file_bytes = self.file_bytes.saturating_add(meta.len());
        if self.file_bytes > self.limit {
            return Err(DiffError::TooLarge { limit: self.limit });
        }
        let file = fs::File::open(full).map_err(io_at(full))?;
        // The size is the one read now: a file still growing is cut there (the tar
        // header and the data must agree).
        let mut h = header(meta, tar::EntryType::Regular, meta.len());
        self.tar
            .append_data(&mut h, rel, io::Read::take(file, meta.len()))
            .map_err(io_at(full))
    }
}

/// Writes the changes in `upper` as a gzip-compressed OCI layer at `out`; at most
/// `limit` bytes of regular files. `out` is removed again when it fails.
pub fn write_layer(upper: &Path, out: &Path, limit: u64) -> Result<LayerFile, DiffError> {
    let result = write(upper, out, limit);
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

fn write(upper: &Path, out: &Path, limit: u64) -> Result<LayerFile, DiffError> {
    let file = fs::File::create(out).map_err(io_at(out))?;
    // Level 1: the layer is made on the node's CPUs while sandboxes run there, and the
    // registry keeps it once; the stronger levels cost several times the CPU for a few
    // percent.
    let gz = flate2::write::GzEncoder::new(
        Hashing::new(io::BufWriter::new(file)),
        flate2::Compression::fast(),
    );
    let mut w = Writer {
        tar: tar::Builder::new(Hashing::new(gz)),
        limit,
        file_bytes: 0,
        entries: 0,
        linked: HashMap::new(),
    };
    w.tar.follow_symlinks(false);
    w.directory(upper, Path::new(""))?;
    let (file_bytes, entries) = (w.file_bytes, w.entries);
    let tarred = w.tar.into_inner().map_err(io_at(out))?;
    let (diff_id, _, gz) = tarred.digest();
    let compressed = gz.finish().map_err(io_at(out))?;
    let (digest, size, mut buffered) = compressed.digest();
    buffered.flush().map_err(io_at(out))?;
    let file = buffered
        .into_inner()
        .map_err(|e| io_at(out)(e.into_error()))?;
    file.sync_all().map_err(io_at(out))?;
    Ok(LayerFile {
        path: out.to_path_buf(),
        digest,
        diff_id,
        size,
        file_bytes,
        entries,
    })
}

#[cfg(test)]
#[path = "layer_diff_tests.rs"]
mod tests;
