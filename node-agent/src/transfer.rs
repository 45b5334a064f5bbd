//! Moving a paused sandbox between nodes: the holder's side (`AgentService.ReadSnapshot`, a
//! tar stream of what a restore needs) and the restoring node's (fetched through a replica's
//! `NodeService.FetchSnapshot`, unpacked into the sandbox's new directory).
//!
//! The stream holds `paused.json`, `snapshot/` (the checkpoint image), `fs/upper/` (the
//! sandbox's writes over its image; the image itself the new node pulls), and the captured
//! `stdout`, `stderr` and `activity`. Tar keeps modes, owners, symlinks and the overlay's
//! extended attributes. Unpacking refuses paths that leave the directory (the tar crate's
//! rule) and stops past the size the holder reported, with slack.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Response, Status};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;

use crate::runtime::{LocalState, Runtime, files};

/// Largest piece of the stream.
const CHUNK: usize = 1 << 20;
/// What a fetch may exceed the reported size by (tar headers, output files).
const SLACK_BYTES: u64 = 256 << 20;

/// What a sandbox directory sends along: files first, then directories.
const PARTS: &[&str] = &[
    files::PAUSED,
    files::STDOUT,
    files::STDERR,
    files::ACTIVITY,
    files::SNAPSHOT,
    "fs/upper",
];

/// The tar stream's sink: chunks into a channel (the gRPC response).
struct Chunks {
    tx: mpsc::Sender<Result<pb::SnapshotData, Status>>,
    buf: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(Ok(pb::SnapshotData { data }))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

/// `AgentService.ReadSnapshot`: the tar stream of a sandbox paused here.
pub async fn read_snapshot(
    runtime: &Runtime,
    request: pb::ReadSnapshotRequest,
) -> Result<Response<ReceiverStream<Result<pb::SnapshotData, Status>>>, Status> {
    let id = request.sandbox_id;
    let paused = {
        let (runtime, id) = (runtime.clone(), id.clone());
        tokio::task::spawn_blocking(move || runtime.inspect(&id))
            .await
            .ok()
            .flatten()
            .is_some_and(|s| matches!(s.state, LocalState::Paused(_)))
    };
    if !paused {
        return Err(Status::not_found(format!(
            "sandbox_id: {id} is not paused on this node"
        )));
    }
    let dir = runtime.dir(&id);
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut out = Chunks {
            tx: tx.clone(),
            buf: Vec::new(),
        };
        if let Err(e) = write_tar(&dir, &mut out) {
            let _ = tx.blocking_send(Err(Status::internal(format!(
                "reading the snapshot of {}: {e}",
                dir.display()
            ))));
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

fn write_tar(dir: &Path, out: &mut Chunks) -> io::Result<()> {
    let mut tar = tar::Builder::new(&mut *out);
    tar.follow_symlinks(false);
    for part in PARTS {
        let path = dir.join(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => tar.append_dir_all(part, &path)?,
            Ok(_) => tar.append_path_with_name(&path, part)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    tar.into_inner()?;
    out.flush()
}

/// Fetches sandbox `id`'s snapshot through the scheduler into `dir` (which must not hold a
/// launch record yet), expecting about `bytes`. On failure the partial directory is removed.
pub async fn fetch(
    client: &mut NodeServiceClient<Channel>,
    id: &str,
    node_id: &str,
    bytes: u64,
    dir: &Path,
) -> Result<u64, String> {
    let mut stream = client
        .fetch_snapshot(pb::FetchSnapshotRequest {
            sandbox_id: id.to_owned(),
            node_id: node_id.to_owned(),
        })
        .await
        .map_err(|s| format!("fetching its snapshot: {}", s.message()))?
        .into_inner();
    let limit = bytes.saturating_add(SLACK_BYTES);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let target = dir.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || unpack(&target, rx));
    let mut received = 0u64;
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                received += chunk.data.len() as u64;
                if received > limit {
                    failure = Some(format!(
                        "its snapshot was reported as {bytes} bytes, and the stream passed {limit}"
                    ));
                    break;
                }
                if tx.send(chunk.data).is_err() {
                    break;
                }
            }
            Err(s) => {
                failure = Some(format!("fetching its snapshot: {}", s.message()));
                break;
            }
        }
    }
    drop(tx);
    let unpacked = unpack
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("unpacking its snapshot: {e}")));
    let result = match (failure, unpacked) {
        (Some(why), _) | (None, Err(why)) => Err(why),
        (None, Ok(())) if !dir.join(files::PAUSED).exists() => {
            Err("the fetched snapshot holds no pause record".to_owned())
        }
        (None, Ok(())) => Ok(received),
    };
    if result.is_err() {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

/// A reader over the chunks a fetch receives.
struct Incoming {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl io::Read for Incoming {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(next) => {
                    self.buf = next;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn unpack(dir: &Path, rx: std::sync::mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut archive = tar::Archive::new(Incoming {
        rx,
        buf: Vec::new(),
        at: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    archive.unpack(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_directory_goes_through_tar_and_back() {
        let tmp = tempfile::tempdir().expect("tmp");
        let from = tmp.path().join("from");
        fs::create_dir_all(from.join("snapshot")).expect("dir");
        fs::create_dir_all(from.join("fs/upper/tmp")).expect("dir");
        fs::write(from.join(files::PAUSED), b"{}").expect("paused");
        fs::write(
            from.join("snapshot/checkpoint.img"),
            vec![7u8; 3 * CHUNK + 5],
        )
        .expect("img");
        fs::write(from.join("fs/upper/tmp/file"), b"kept").expect("file");
        std::os::unix::fs::symlink("file", from.join("fs/upper/tmp/link")).expect("link");
        let (tx, rx) = mpsc::channel(64);
        let writer = std::thread::spawn({
            let from = from.clone();
            move || {
                let mut out = Chunks {
                    tx,
                    buf: Vec::new(),
                };
                write_tar(&from, &mut out)
            }
        });
        let mut rx = rx;
        let (stx, srx) = std::sync::mpsc::sync_channel(64);
        let mut chunks = 0;
        while let Some(Ok(chunk)) = rx.blocking_recv() {
            assert!(chunk.data.len() <= CHUNK + 10_240);
            chunks += 1;
            stx.send(chunk.data).expect("send");
        }
        writer.join().expect("writer").expect("tar");
        drop(stx);
        assert!(chunks > 3, "{chunks} chunks");
        let to = tmp.path().join("to");
        unpack(&to, srx).expect("unpack");
        assert_eq!(
            fs::read(to.join("snapshot/checkpoint.img"))
                .expect("img")
                .len(),
            3 * CHUNK + 5
        );
        assert_eq!(
            fs::read(to.join("fs/upper/tmp/file")).expect("file"),
            b"kept"
        );
        assert_eq!(
            fs::read_link(to.join("fs/upper/tmp/link")).expect("link"),
            Path::new("file")
        );
        assert!(to.join(files::PAUSED).exists());
    }
}
