//! Exec and file calls into this node's sandboxes, through the helper in each
//! ([`crate::sandboxd`]). Output goes out through a channel of four messages: while the
//! caller does not read, the helper's socket is not read either, so the sandbox's process
//! blocks on its pipe instead of anything growing here. A caller that goes away closes the
//! socket, which kills the exec's process group. Every call counts as activity for the
//! sandbox's idle limit ([`Activity`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_sandboxd::wire::{CHUNK, ExecStart, FromHelper, ToHelper, Winsize};

use crate::runtime::{Runtime, files, read_exit, unix_ms, valid_sandbox_id, write_atomic};
use crate::sandboxd::{self, Receiver, status};

/// A stream of answers.
pub type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How often an open call renews the sandbox's activity.
const ACTIVITY_EVERY: Duration = Duration::from_secs(1);

/// Marks a sandbox active while a call is open: writes `activity` (unix ms) at the start,
/// every second while open, and at the end. The shim ends a sandbox idle past its
/// `idle_timeout_ms`, counting from the last of these.
pub struct Activity {
    dir: PathBuf,
    ticker: tokio::task::JoinHandle<()>,
}

fn touch(dir: &Path) {
    let _ = write_atomic(&dir.join(files::ACTIVITY), unix_ms().to_string().as_bytes());
}

impl Activity {
    /// Starts marking `dir` active.
    pub fn begin(dir: PathBuf) -> Activity {
        let d = dir.clone();
        let ticker = tokio::spawn(async move {
            loop {
                let d2 = d.clone();
                let _ = tokio::task::spawn_blocking(move || touch(&d2)).await;
                tokio::time::sleep(ACTIVITY_EVERY).await;
            }
        });
        Activity { dir, ticker }
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.ticker.abort();
        let d = self.dir.clone();
        tokio::task::spawn_blocking(move || touch(&d));
    }
}

/// The directory of a sandbox that can take calls.
fn dir_of(runtime: &Runtime, id: &str) -> Result<PathBuf, Status> {
    if !valid_sandbox_id(id) {
        return Err(Status::invalid_argument(format!(
            "sandbox_id: {id:?} is not a sandbox id"
        )));
    }
    let dir = runtime.dir(id);
    if !dir.join(files::LAUNCH).exists() {
        return Err(Status::not_found(format!(
            "sandbox_id: this node has no sandbox {id}"
        )));
    }
    if read_exit(&dir).is_some() {
        return Err(Status::failed_precondition(format!(
            "sandbox_id: {id} has ended"
        )));
    }
    Ok(dir)
}

fn unexpected(m: &FromHelper) -> Status {
    Status::internal(format!("the sandbox's helper answered out of turn: {m:?}"))
}

/// Relays the helper's answers into `out` until `each` says the call is over (`None`
/// means keep going); stops at once when the caller goes away.
async fn relay<T: Send + 'static>(
    mut rx: Receiver,
    out: mpsc::Sender<Result<T, Status>>,
    guard: Activity,
    also_stop: Option<tokio::task::JoinHandle<()>>,
    each: impl Fn(FromHelper) -> (Option<Result<T, Status>>, bool) + Send + 'static,
) {
    loop {
        let next = tokio::select! {
            () = out.closed() => break,
            m = rx.recv() => m,
        };
        let (send, done) = match next {
            Ok(Some(FromHelper::Error { kind, message })) => {
                (Some(Err(status(kind, message))), true)
            }
            Ok(Some(m)) => each(m),
            Ok(None) => (
                Some(Err(Status::unavailable(
                    "the sandbox's helper closed the call early (the sandbox may have stopped)",
                ))),
                true,
            ),
            Err(s) => (Some(Err(s)), true),
        };
        if let Some(item) = send {
            if out.send(item).await.is_err() {
                break;
            }
        }
        if done {
            break;
        }
    }
    if let Some(h) = also_stop {
        h.abort();
    }
    drop(guard);
}

/// `AgentService.Exec`.
pub async fn exec(
    runtime: &Runtime,
    mut inbound: Streaming<pb::ExecRequest>,
) -> Result<Answers<pb::ExecResponse>, Status> {
    let Some(pb::ExecRequest {
        message: Some(pb::exec_request::Message::Start(start)),
    }) = inbound.message().await?
    else {
        return Err(Status::invalid_argument(
            "start: the first message must be start",
        ));
    };
    if start.command.is_empty() {
        return Err(Status::invalid_argument("start.command: must be set"));
    }
    let dir = dir_of(runtime, &start.sandbox_id)?;
    let (mut tx, rx) = sandboxd::connect(&dir, &start.sandbox_id).await?;
    let size = |t: Option<&pb::TerminalSize>| {
        t.map_or(Winsize { rows: 24, cols: 80 }, |t| Winsize {
            rows: t.rows.clamp(1, 1000) as u16,
            cols: t.cols.clamp(1, 1000) as u16,
        })
    };
    let mut env: Vec<(String, String)> = start.env.into_iter().collect();
    env.sort();
    tx.send(&ToHelper::Exec(ExecStart {
        argv: start.command,
        env,
        cwd: start.working_dir,
        tty: start.tty.then(|| size(start.terminal_size.as_ref())),
        timeout_ms: start.timeout_ms,
    }))
    .await?;
    let guard = Activity::begin(dir);
    // Up: the caller's stdin and resizes. The end of its stream is the end of stdin; the
    // socket's write half stays open (closing it would mean the caller went away) until
    // the relay below is done and stops this task.
    let up = tokio::spawn(async move {
        use pb::exec_request::Message;
        while let Some(Ok(m)) = inbound.next().await {
            let sent = match m.message {
                Some(Message::Stdin(data)) => {
                    let mut r = Ok(());
                    for c in data.chunks(CHUNK) {
                        r = tx.send(&ToHelper::Stdin(c.to_vec())).await;
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                Some(Message::StdinClose(_)) => tx.send(&ToHelper::StdinClose).await,
                Some(Message::Resize(t)) => tx.send(&ToHelper::Resize(size(Some(&t)))).await,
                Some(Message::Start(_)) | None => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = tx.send(&ToHelper::StdinClose).await;
        std::future::pending::<()>().await;
    });
    let (out, answers) = mpsc::channel(4);
    tokio::spawn(relay(rx, out, guard, Some(up), |m| {
        use pb::exec_response::Message;
        let wrap = |m| Some(Ok(pb::ExecResponse { message: Some(m) }));
        match m {
            FromHelper::Started { .. } => (None, false),
            FromHelper::Stdout(d) => (wrap(Message::Stdout(d)), false),
            FromHelper::Stderr(d) => (wrap(Message::Stderr(d)), false),
            FromHelper::Exit {
                code,
                signal,
                timed_out,
            } => (
                wrap(Message::Exit(pb::ExecExit {
                    exit_code: code,
                    signal,
                    timed_out,
                })),
                true,
            ),
            other => (Some(Err(unexpected(&other))), true),
        }
    }));
    Ok(Box::pin(ReceiverStream::new(answers)))
}

/// `AgentService.WriteFile`.
pub async fn write_file(
    runtime: &Runtime,
    mut inbound: Streaming<pb::WriteFileRequest>,
) -> Result<pb::WriteFileResponse, Status> {
    use pb::write_file_request::Message;
    let Some(pb::WriteFileRequest {
        message: Some(Message::Start(start)),
    }) = inbound.message().await?
    else {
        return Err(Status::invalid_argument(
            "start: the first message must be start",
        ));
    };
    let dir = dir_of(runtime, &start.sandbox_id)?;
    let (mut tx, mut rx) = sandboxd::connect(&dir, &start.sandbox_id).await?;
    let _guard = Activity::begin(dir);
    tx.send(&ToHelper::WriteFile {
        path: start.path,
        mode: start.mode,
        create_parents: start.create_parents,
    })
    .await?;
    let mut sent = Ok(());
    while let Some(m) = inbound.next().await {
        match m {
            Ok(pb::WriteFileRequest {
                message: Some(Message::Data(d)),
            }) => {
                for c in d.chunks(CHUNK) {
                    sent = tx.send(&ToHelper::Data(c.to_vec())).await;
                    if sent.is_err() {
                        break;
                    }
                }
            }
            Ok(_) => {
                return Err(Status::invalid_argument("data: only data may follow start"));
            }
            // Dropping the connection mid-file leaves the old file in place.
            Err(e) => return Err(Status::cancelled(format!("the upload broke off: {e}"))),
        }
        if sent.is_err() {
            break;
        }
    }
    if sent.is_ok() {
        sent = tx.send(&ToHelper::End).await;
    }
    // A refusal (a bad path, past the size limit) may have come while data was sent.
    match rx.recv().await {
        Ok(Some(FromHelper::Written { bytes })) => Ok(pb::WriteFileResponse {
            bytes_written: bytes,
        }),
        Ok(Some(FromHelper::Error { kind, message })) => Err(status(kind, message)),
        Ok(Some(other)) => Err(unexpected(&other)),
        Ok(None) => Err(sent
            .err()
            .unwrap_or_else(|| Status::unavailable("the sandbox's helper closed the call early"))),
        Err(s) => Err(s),
    }
}

/// `AgentService.ReadFile`.
pub async fn read_file(
    runtime: &Runtime,
    req: pb::ReadFileRequest,
) -> Result<Answers<pb::ReadFileResponse>, Status> {
    let dir = dir_of(runtime, &req.sandbox_id)?;
    let (mut tx, mut rx) = sandboxd::connect(&dir, &req.sandbox_id).await?;
    let guard = Activity::begin(dir);
    tx.send(&ToHelper::ReadFile { path: req.path }).await?;
    use pb::read_file_response::Message;
    // The first answer decides between an error status and a stream.
    let (size, mode) = match rx.recv().await? {
        Some(FromHelper::FileInfo { size, mode }) => (size, mode),
        Some(FromHelper::Error { kind, message }) => return Err(status(kind, message)),
        Some(other) => return Err(unexpected(&other)),
        None => return Err(Status::unavailable("the sandbox's helper closed the call")),
    };
    let (out, answers) = mpsc::channel(4);
    let _ = out
        .send(Ok(pb::ReadFileResponse {
            message: Some(Message::Info(pb::FileInfo { size, mode })),
        }))
        .await;
    tokio::spawn(async move {
        // Keeps the write half open until the read is over.
        let _tx = tx;
        relay(rx, out, guard, None, |m| match m {
            FromHelper::FileData(d) => (
                Some(Ok(pb::ReadFileResponse {
                    message: Some(Message::Data(d)),
                })),
                false,
            ),
            FromHelper::FileEnd => (None, true),
            other => (Some(Err(unexpected(&other))), true),
        })
        .await;
    });
    Ok(Box::pin(ReceiverStream::new(answers)))
}

/// `AgentService.ListDir`.
pub async fn list_dir(
    runtime: &Runtime,
    req: pb::ListDirRequest,
) -> Result<pb::ListDirResponse, Status> {
    let dir = dir_of(runtime, &req.sandbox_id)?;
    let (mut tx, mut rx) = sandboxd::connect(&dir, &req.sandbox_id).await?;
    let _guard = Activity::begin(dir);
    tx.send(&ToHelper::ListDir { path: req.path }).await?;
    use pb::dir_entry::Kind;
    match rx.recv().await? {
        Some(FromHelper::Entries { entries, left_out }) => Ok(pb::ListDirResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::DirEntry {
                    name: e.name,
                    kind: match e.kind {
                        b'f' => Kind::File,
                        b'd' => Kind::Directory,
                        b'l' => Kind::Symlink,
                        _ => Kind::Other,
                    } as i32,
                    size: e.size,
                    mode: e.mode,
                    modified_unix_ms: e.modified_unix_ms,
                })
                .collect(),
            left_out,
        }),
        Some(FromHelper::Error { kind, message }) => Err(status(kind, message)),
        Some(other) => Err(unexpected(&other)),
        None => Err(Status::unavailable("the sandbox's helper closed the call")),
    }
}
