//! `berth sandbox exec ID -- CMD` (and `shell`): runs a command in a running sandbox like
//! `docker exec`: its stdout and stderr are printed as they come, and berth exits with its
//! exit code. Stdin is sent when `-i` is given or when it is not a terminal (so
//! `printf abc | berth sandbox exec ID -- cat` works), and its end closes the command's
//! stdin. `-t` gives the command a terminal of this one's size and puts this one in raw
//! mode. Interrupting berth ends the call, which kills the command in the sandbox.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use tonic::Status;

/// Bytes of stdin per message.
const STDIN_CHUNK: usize = 64 * 1024;

/// What one exec runs.
pub(super) struct ExecCall {
    pub(super) id: String,
    pub(super) command: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) workdir: Option<String>,
    pub(super) interactive: bool,
    pub(super) tty: bool,
    pub(super) timeout_ms: u64,
}

/// The local terminal in raw mode until dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn enter(on: bool) -> RawMode {
        let stdin = std::io::stdin();
        if !on || !stdin.is_terminal() {
            return RawMode(None);
        }
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw);
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

fn terminal_size() -> pb::TerminalSize {
    rustix::termios::tcgetwinsize(std::io::stdout())
        .ok()
        .filter(|w| w.ws_row > 0 && w.ws_col > 0)
        .map_or(pb::TerminalSize { rows: 24, cols: 80 }, |w| {
            pb::TerminalSize {
                rows: u32::from(w.ws_row),
                cols: u32::from(w.ws_col),
            }
        })
}

/// Runs the call; the exit code is the command's.
pub(super) async fn exec(client: &mut Client, call: ExecCall) -> Result<ExitCode, Status> {
    use pb::exec_request::Message;
    let start = pb::ExecStart {
        sandbox_id: call.id.clone(),
        command: call.command,
        env: call.env.into_iter().collect(),
        working_dir: call.workdir.unwrap_or_default(),
        tty: call.tty,
        terminal_size: call.tty.then(terminal_size),
        timeout_ms: call.timeout_ms,
    };
    let (tx, rx) = mpsc::channel::<pb::ExecRequest>(4);
    let first = pb::ExecRequest {
        message: Some(Message::Start(start)),
    };
    tx.send(first)
        .await
        .map_err(|_| Status::aborted("exec: the call ended"))?;
    let attach = call.interactive || !std::io::stdin().is_terminal();
    if attach {
        // A thread, because reading stdin blocks; the channel's bound is the backpressure.
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; STDIN_CHUNK];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let m = pb::ExecRequest {
                    message: Some(Message::Stdin(buf[..n].to_vec())),
                };
                if tx.blocking_send(m).is_err() {
                    return;
                }
            }
            let _ = tx.blocking_send(pb::ExecRequest {
                message: Some(Message::StdinClose(true)),
            });
        });
    } else {
        tx.send(pb::ExecRequest {
            message: Some(Message::StdinClose(true)),
        })
        .await
        .map_err(|_| Status::aborted("exec: the call ended"))?;
    }
    let _raw = RawMode::enter(call.tty);
    let mut service = client.sandbox_service()?;
    let mut answers = service.exec(ReceiverStream::new(rx)).await?.into_inner();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    while let Some(m) = answers.message().await? {
        use pb::exec_response::Message;
        match m.message {
            Some(Message::Stdout(d)) => {
                let _ = out.write_all(&d);
                let _ = out.flush();
            }
            Some(Message::Stderr(d)) => {
                let _ = err.write_all(&d);
                let _ = err.flush();
            }
            Some(Message::Exit(e)) => {
                if e.timed_out {
                    eprintln!("berth: the command was killed after its --exec-timeout");
                }
                return Ok(ExitCode::from(e.exit_code.clamp(0, 255) as u8));
            }
            None => {}
        }
    }
    Err(Status::aborted(
        "exec: the stream ended without an exit code",
    ))
}
