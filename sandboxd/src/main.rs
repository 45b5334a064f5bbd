//! `berth-sandboxd init --socket PATH [--keep-alive] [-- COMMAND...]`: the sandbox's first
//! process. It runs COMMAND (output to its own stdout and stderr, which the shim captures)
//! and serves calls on PATH. Without `--keep-alive` it exits with COMMAND's exit code;
//! with it, it stays until the sandbox is stopped.

mod exec;
mod files;
mod quiesce;
mod reaper;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;

use berth_sandboxd::wire::{self, ErrorKind, FromHelper, MAX_CALLS, ToHelper};

use quiesce::Server;
use reaper::Reaper;

struct Args {
    socket: String,
    keep_alive: bool,
    command: Vec<String>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    if args.next().as_deref() != Some("init") {
        return Err(
            "usage: berth-sandboxd init --socket PATH [--keep-alive] [-- COMMAND...]".into(),
        );
    }
    let mut out = Args {
        socket: String::new(),
        keep_alive: false,
        command: Vec::new(),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => out.socket = args.next().ok_or("--socket needs a path")?,
            "--keep-alive" => out.keep_alive = true,
            "--" => {
                out.command = args.collect();
                break;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.socket.is_empty() {
        return Err("--socket is required".into());
    }
    if out.command.is_empty() && !out.keep_alive {
        return Err("a command is required without --keep-alive".into());
    }
    Ok(out)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(exec::TTY_CHILD) {
        return exec::tty_child(std::env::args().skip(2).collect());
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-sandboxd: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match quiesce::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth-sandboxd: cannot listen on {}: {e}", args.socket);
            return ExitCode::from(2);
        }
    };
    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    std::thread::spawn(move || r.run());
    let server = match Server::new(args.socket.clone()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("berth-sandboxd: cannot make its wake pipe: {e}");
            return ExitCode::from(2);
        }
    };
    let (r, s) = (reaper.clone(), server.clone());
    std::thread::spawn(move || serve(listener, s, r));
    let Some((program, rest)) = args.command.split_first() else {
        loop {
            std::thread::park();
        }
    };
    let main = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .spawn();
    let code = match main {
        Ok(child) => reaper.wait_for(child.id(), None).map_or(1, |e| e.code),
        Err(e) => {
            eprintln!("berth-sandboxd: cannot start {program:?}: {e}");
            if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            }
        }
    };
    if !args.keep_alive {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    eprintln!("berth-sandboxd: {program} exited with {code}; the sandbox stays up (keep-alive)");
    loop {
        std::thread::park();
    }
}

/// Accepts calls, one thread each, until a quiesce; then waits to be woken and listens
/// again (see [`quiesce`]).
fn serve(mut listener: UnixListener, server: Arc<Server>, reaper: Arc<Reaper>) {
    loop {
        while let Some(conn) = server.accept(&listener) {
            let Ok(conn) = conn else { continue };
            let Some(token) = server.admit(&conn) else {
                let mut c = conn;
                let _ = send(
                    &mut c,
                    &FromHelper::Error {
                        kind: ErrorKind::Busy,
                        message: format!("the sandbox is serving its maximum of {MAX_CALLS} calls"),
                    },
                );
                continue;
            };
            let (server, reaper) = (server.clone(), reaper.clone());
            std::thread::spawn(move || {
                call(conn, &reaper, &server);
                server.leave(token);
            });
        }
        drop(listener);
        listener = server.closed_and_wait_for_wake();
    }
}

/// Serves one connection: its first frame says what the call is.
fn call(mut conn: UnixStream, reaper: &Reaper, server: &Server) {
    let first = match wire::read_frame(&mut conn) {
        Ok(Some(body)) => ToHelper::decode(&body),
        _ => return,
    };
    let result = match first {
        Ok(ToHelper::Exec(start)) => exec::exec(conn, start, reaper),
        Ok(ToHelper::WriteFile {
            path,
            mode,
            create_parents,
        }) => files::write(&mut conn, &path, mode, create_parents),
        Ok(ToHelper::ReadFile { path }) => files::read(&mut conn, &path),
        Ok(ToHelper::ListDir { path }) => files::list(&mut conn, &path),
        Ok(ToHelper::Quiesce) => server.quiesce(&mut conn),
        Ok(ToHelper::Sync) => {
            // gVisor's sync(2) writes back every dirty page its file cache holds and
            // syncs the host files; it cannot fail (it returns nothing).
            rustix::fs::sync();
            send(&mut conn, &FromHelper::Synced)
        }
        Ok(other) => {
            let _ = send(
                &mut conn,
                &invalid(format!("a call cannot start with {other:?}")),
            );
            return;
        }
        Err(e) => {
            let _ = send(&mut conn, &invalid(e.to_string()));
            return;
        }
    };
    if let Err(e) = result {
        eprintln!("berth-sandboxd: call ended: {e}");
    }
}

fn invalid(message: String) -> FromHelper {
    FromHelper::Error {
        kind: ErrorKind::Invalid,
        message,
    }
}

/// Writes one answer.
pub(crate) fn send(w: &mut impl io::Write, m: &FromHelper) -> io::Result<()> {
    wire::write_frame(w, &m.encode())
}
