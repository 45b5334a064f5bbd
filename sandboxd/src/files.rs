//! File calls. Paths are checked and resolved by [`berth_sandboxd::paths`] against the
//! sandbox's root (`/` here: the helper runs inside it). Writes go to a temporary file in the
//! target's directory and are renamed over the target once complete, so a call that fails
//! halfway leaves the old file as it was. Sizes are bounded by `wire::MAX_FILE_BYTES`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use berth_sandboxd::paths;
use berth_sandboxd::wire::{
    self, CHUNK, DirEntry, ErrorKind, FromHelper, MAX_DIR_ENTRIES, MAX_FILE_BYTES, ToHelper,
};

use crate::send;

fn fail(conn: &mut UnixStream, kind: ErrorKind, message: String) -> io::Result<()> {
    send(conn, &FromHelper::Error { kind, message })
}

fn io_fail(conn: &mut UnixStream, path: &str, e: &io::Error) -> io::Result<()> {
    fail(conn, ErrorKind::of(e), format!("{path}: {e}"))
}

fn resolve(conn: &mut UnixStream, path: &str) -> io::Result<Option<PathBuf>> {
    match paths::resolve(Path::new("/"), path, true) {
        Ok(p) => Ok(Some(p)),
        Err(why) => {
            fail(conn, ErrorKind::BadPath, format!("path: {why}"))?;
            Ok(None)
        }
    }
}

static TEMP: AtomicU64 = AtomicU64::new(0);

/// `WriteFile`: `Data` frames until `End`.
pub(crate) fn write(
    conn: &mut UnixStream,
    path: &str,
    mode: u32,
    create_parents: bool,
) -> io::Result<()> {
    let Some(target) = resolve(conn, path)? else {
        return Ok(());
    };
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return fail(
            conn,
            ErrorKind::BadPath,
            format!("path: {path:?} names no file"),
        );
    };
    if target.is_dir() {
        return fail(conn, ErrorKind::Invalid, format!("{path}: is a directory"));
    }
    if create_parents {
        if let Err(e) = fs::create_dir_all(dir) {
            return io_fail(conn, path, &e);
        }
    }
    let temp = dir.join(format!(
        ".{}.berth-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let mode = if mode == 0 { 0o644 } else { mode & 0o7777 };
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
    {
        Ok(f) => f,
        Err(e) => return io_fail(conn, path, &e),
    };
    let outcome = receive(conn, &mut file);
    let outcome = outcome.and_then(|n| {
        // The mode asked for, whatever the umask took away.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        fs::rename(&temp, &target)?;
        Ok(n)
    });
    match outcome {
        Ok(Ok(bytes)) => send(conn, &FromHelper::Written { bytes }),
        Ok(Err((kind, message))) => {
            let _ = fs::remove_file(&temp);
            fail(conn, kind, message)
        }
        Err(e) => {
            let _ = fs::remove_file(&temp);
            io_fail(conn, path, &e)
        }
    }
}

/// Reads `Data` frames into `file` until `End`: `Ok(Err(..))` for a refusal to report.
fn receive(conn: &mut UnixStream, file: &mut File) -> io::Result<Result<u64, (ErrorKind, String)>> {
    let mut total = 0u64;
    loop {
        let Some(body) = wire::read_frame(conn)? else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the caller went away before the end of the file",
            ));
        };
        match ToHelper::decode(&body)? {
            ToHelper::Data(d) => {
                total += d.len() as u64;
                if total > MAX_FILE_BYTES {
                    return Ok(Err((
                        ErrorKind::TooLarge,
                        format!("the file is larger than the limit of {MAX_FILE_BYTES} bytes"),
                    )));
                }
                file.write_all(&d)?;
            }
            ToHelper::End => return Ok(Ok(total)),
            other => {
                return Ok(Err((
                    ErrorKind::Invalid,
                    format!("expected file data, got {other:?}"),
                )));
            }
        }
    }
}

/// `ReadFile`: the size and mode, the contents in chunks, then `FileEnd`.
pub(crate) fn read(conn: &mut UnixStream, path: &str) -> io::Result<()> {
    let Some(target) = resolve(conn, path)? else {
        return Ok(());
    };
    let mut file = match File::open(&target) {
        Ok(f) => f,
        Err(e) => return io_fail(conn, path, &e),
    };
    let meta = file.metadata()?;
    if meta.is_dir() {
        return fail(conn, ErrorKind::Invalid, format!("{path}: is a directory"));
    }
    if meta.len() > MAX_FILE_BYTES {
        return fail(
            conn,
            ErrorKind::TooLarge,
            format!(
                "{path}: {} bytes, above the limit of {MAX_FILE_BYTES}",
                meta.len()
            ),
        );
    }
    send(
        conn,
        &FromHelper::FileInfo {
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
        },
    )?;
    let mut buf = vec![0u8; CHUNK];
    let mut left = MAX_FILE_BYTES;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 || left == 0 {
            break;
        }
        left = left.saturating_sub(n as u64);
        send(conn, &FromHelper::FileData(buf[..n].to_vec()))?;
    }
    send(conn, &FromHelper::FileEnd)
}

/// `ListDir`: entries by name, at most `MAX_DIR_ENTRIES`.
pub(crate) fn list(conn: &mut UnixStream, path: &str) -> io::Result<()> {
    let Some(target) = resolve(conn, path)? else {
        return Ok(());
    };
    let read = match fs::read_dir(&target) {
        Ok(r) => r,
        Err(e) => return io_fail(conn, path, &e),
    };
    let mut names: Vec<_> = read.flatten().map(|e| e.file_name()).collect();
    names.sort();
    let left_out = names.len().saturating_sub(MAX_DIR_ENTRIES) as u64;
    let entries = names
        .iter()
        .take(MAX_DIR_ENTRIES)
        .filter_map(|n| {
            let meta = fs::symlink_metadata(target.join(n)).ok()?;
            let t = meta.file_type();
            Some(DirEntry {
                name: n.to_string_lossy().into_owned(),
                kind: if t.is_symlink() {
                    b'l'
                } else if t.is_dir() {
                    b'd'
                } else if t.is_file() {
                    b'f'
                } else {
                    b'o'
                },
                size: meta.len(),
                mode: meta.permissions().mode() & 0o7777,
                modified_unix_ms: meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    send(conn, &FromHelper::Entries { entries, left_out })
}
