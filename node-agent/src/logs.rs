//! `AgentService.ReadLogs`: the captured output of this node's sandboxes. The scheduler
//! replicas proxy it to clients (`SandboxService.ReadLogs`, `berth sandbox logs`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;

use crate::runtime::{Runtime, files, read_exit, valid_sandbox_id};

/// Largest chunk sent.
const CHUNK: usize = 64 * 1024;
/// How often a follower looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// The service over this node's sandbox directories.
#[derive(Clone)]
pub struct Logs {
    runtime: Runtime,
}

impl Logs {
    /// Serves the sandboxes of `runtime`.
    pub fn new(runtime: Runtime) -> Logs {
        Logs { runtime }
    }
}

/// Reads what was appended to a file since `offset`, at most [`CHUNK`] bytes.
fn read_more(path: &Path, offset: &mut u64) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(*offset))?;
    let mut buf = Vec::with_capacity(CHUNK);
    file.take(CHUNK as u64).read_to_end(&mut buf)?;
    *offset += buf.len() as u64;
    Ok(buf)
}

/// The stream of a `ReadLogs` call.
pub type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send + 'static>>;

/// Streams `dir`'s stdout and stderr into `tx`; with `follow`, until the sandbox has
/// exited and everything it wrote has been sent.
async fn pump(dir: PathBuf, follow: bool, tx: mpsc::Sender<Result<pb::LogChunk, Status>>) {
    let streams = [
        (dir.join(files::STDOUT), pb::log_chunk::Stream::Stdout),
        (dir.join(files::STDERR), pb::log_chunk::Stream::Stderr),
    ];
    let mut offsets = [0u64; 2];
    loop {
        // Look for the exit record before reading: output read after seeing it is final.
        let exited = read_exit(&dir);
        let mut progressed = false;
        for (i, (path, stream)) in streams.iter().enumerate() {
            loop {
                let data = match read_more(path, &mut offsets[i]) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("{}: {e}", path.display()))))
                            .await;
                        return;
                    }
                };
                if data.is_empty() {
                    break;
                }
                progressed = true;
                let chunk = pb::LogChunk {
                    stream: *stream as i32,
                    data,
                    truncated: false,
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        }
        let done = !follow || exited.is_some() || !dir.exists();
        if done {
            if let Some(record) = exited {
                for (truncated, stream) in [
                    (record.stdout_truncated, pb::log_chunk::Stream::Stdout),
                    (record.stderr_truncated, pb::log_chunk::Stream::Stderr),
                ] {
                    if truncated {
                        let chunk = pb::LogChunk {
                            stream: stream as i32,
                            data: Vec::new(),
                            truncated: true,
                        };
                        let _ = tx.send(Ok(chunk)).await;
                    }
                }
            }
            return;
        }
        if !progressed {
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

impl Logs {
    /// `AgentService.ReadLogs`.
    pub async fn read_logs(
        &self,
        request: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let req = request.into_inner();
        if !valid_sandbox_id(&req.sandbox_id) {
            return Err(Status::invalid_argument(format!(
                "sandbox_id: {:?} is not a sandbox id",
                req.sandbox_id
            )));
        }
        let dir = self.runtime.dir(&req.sandbox_id);
        if !dir.join(files::LAUNCH).exists() {
            return Err(Status::not_found(format!(
                "sandbox_id: this node has no sandbox {}",
                req.sandbox_id
            )));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(pump(dir, req.follow, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
