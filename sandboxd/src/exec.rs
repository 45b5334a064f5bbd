//! Exec calls: a process with pipes (or a terminal), its stdin fed from the connection, its
//! output sent back as it comes, and its exit code last. The connection's end before the
//! exit kills the process group; so does the call's timeout. Writes block while the agent
//! does not read, so a slow reader stalls the process instead of growing a buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group, setsid};
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
use rustix::termios::{Winsize, tcsetwinsize};

use berth_sandboxd::wire::{self, CHUNK, ExecStart, FromHelper, ToHelper};

use crate::reaper::{Ended, Reaper};
use crate::send;

/// The helper's own argv[1] when it starts a terminal's process (see [`tty_child`]).
pub(crate) const TTY_CHILD: &str = "__tty-child";
/// How long output still draining after the exit is waited for: descendants that keep the
/// pipes open (a server started with `&`) do not hold the call.
const DRAIN: Duration = Duration::from_millis(200);

type Shared = Arc<Mutex<UnixStream>>;

fn send_shared(to: &Shared, m: &FromHelper) -> io::Result<()> {
    let mut s = to.lock().unwrap_or_else(|p| p.into_inner());
    send(&mut *s, m)
}

fn winsize(w: wire::Winsize) -> Winsize {
    Winsize {
        ws_row: w.rows,
        ws_col: w.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A pseudo-terminal: its master side and the path of its other side.
fn open_pty(size: wire::Winsize) -> io::Result<(File, String)> {
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    tcsetwinsize(&master, winsize(size))?;
    Ok((File::from(master), name.to_string_lossy().into_owned()))
}

fn kill_group(pid: u32) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(p, Signal::KILL);
    }
}

/// Runs one exec call to its end.
pub(crate) fn exec(conn: UnixStream, start: ExecStart, reaper: &Reaper) -> io::Result<()> {
    let out: Shared = Arc::new(Mutex::new(conn.try_clone()?));
    let Some((program, args)) = start.argv.split_first() else {
        return refuse(&out, "the command is empty", 126);
    };
    let mut master = None;
    let mut command = match start.tty {
        None => {
            let mut c = Command::new(program);
            c.args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            c
        }
        Some(size) => {
            let (m, pts) = open_pty(size)?;
            master = Some(m);
            let mut c = Command::new(std::env::current_exe()?);
            c.arg(TTY_CHILD).arg(pts).arg("--").arg(program).args(args);
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        }
    };
    command.envs(start.env.iter().map(|(k, v)| (k, v)));
    if !start.cwd.is_empty() {
        command.current_dir(&start.cwd);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return refuse(&out, &format!("cannot run {program:?}: {e}"), code);
        }
    };
    let pid = child.id();
    send_shared(&out, &FromHelper::Started { pid })?;

    let (drained_tx, drained) = mpsc::channel();
    let mut pumps = 0;
    let mut stdin: Option<Box<dyn Write + Send>> = None;
    if let Some(m) = &master {
        pump(m.try_clone()?, out.clone(), false, drained_tx.clone());
        pumps += 1;
        stdin = Some(Box::new(m.try_clone()?));
    }
    if let Some(o) = child.stdout.take() {
        pump(o, out.clone(), false, drained_tx.clone());
        pumps += 1;
    }
    if let Some(e) = child.stderr.take() {
        pump(e, out.clone(), true, drained_tx.clone());
        pumps += 1;
    }
    if let Some(i) = child.stdin.take() {
        stdin = Some(Box::new(i));
    }
    let finished = Arc::new(AtomicBool::new(false));
    {
        let finished = finished.clone();
        let tty = master.is_some();
        let resize = match &master {
            Some(m) => Some(m.try_clone()?),
            None => None,
        };
        std::thread::spawn(move || input(conn, stdin, tty, resize, &finished, pid));
    }

    let deadline =
        (start.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(start.timeout_ms));
    let (ended, timed_out) = match reaper.wait_for(pid, deadline) {
        Some(e) => (e, false),
        None => {
            kill_group(pid);
            let e = reaper.wait_for(pid, None).unwrap_or(Ended {
                code: 137,
                signal: 9,
            });
            (e, true)
        }
    };
    finished.store(true, Ordering::SeqCst);
    let until = Instant::now() + DRAIN;
    for _ in 0..pumps {
        let left = until.saturating_duration_since(Instant::now());
        if drained.recv_timeout(left).is_err() {
            break;
        }
    }
    let result = send_shared(
        &out,
        &FromHelper::Exit {
            code: ended.code,
            signal: ended.signal,
            timed_out,
        },
    );
    let s = out.lock().unwrap_or_else(|p| p.into_inner());
    let _ = s.shutdown(std::net::Shutdown::Both);
    result
}

/// An exec that could not start: the reason on stderr and a shell's exit code.
fn refuse(out: &Shared, why: &str, code: i32) -> io::Result<()> {
    send_shared(
        out,
        &FromHelper::Stderr(format!("berth-sandboxd: {why}\n").into_bytes()),
    )?;
    send_shared(
        out,
        &FromHelper::Exit {
            code,
            signal: 0,
            timed_out: false,
        },
    )
}

/// Copies a pipe (or the terminal) into output frames until it ends.
fn pump(mut from: impl Read + Send + 'static, to: Shared, stderr: bool, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let data = buf[..n].to_vec();
            let m = if stderr {
                FromHelper::Stderr(data)
            } else {
                FromHelper::Stdout(data)
            };
            if send_shared(&to, &m).is_err() {
                break;
            }
        }
        let _ = done.send(());
    });
}

/// Feeds the process from the connection; the connection's end before the process's kills
/// its group.
fn input(
    mut conn: UnixStream,
    mut stdin: Option<Box<dyn Write + Send>>,
    tty: bool,
    resize: Option<File>,
    finished: &AtomicBool,
    pid: u32,
) {
    while let Ok(Some(body)) = wire::read_frame(&mut conn) {
        match ToHelper::decode(&body) {
            Ok(ToHelper::Stdin(data)) => {
                if let Some(w) = &mut stdin {
                    if w.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(ToHelper::StdinClose) => {
                // A terminal has no half-close: end-of-file is ^D.
                if let (true, Some(w)) = (tty, &mut stdin) {
                    let _ = w.write_all(&[4]);
                }
                stdin = None;
            }
            Ok(ToHelper::Resize(size)) => {
                if let Some(m) = &resize {
                    let _ = tcsetwinsize(m, winsize(size));
                }
            }
            Ok(_) | Err(_) => break,
        }
    }
    if !finished.load(Ordering::SeqCst) {
        kill_group(pid);
    }
}

/// `berth-sandboxd __tty-child PTS -- COMMAND...`: a new session whose controlling terminal
/// is PTS, then COMMAND in place of this process.
pub(crate) fn tty_child(args: Vec<String>) -> ExitCode {
    let (Some(pts), Some("--")) = (args.first(), args.get(1).map(String::as_str)) else {
        return ExitCode::from(2);
    };
    let Some((program, rest)) = args[2..].split_first() else {
        return ExitCode::from(2);
    };
    let _ = setsid();
    let tty = match OpenOptions::new().read(true).write(true).open(pts) {
        Ok(t) => t,
        Err(_) => return ExitCode::from(126),
    };
    let _ = rustix::process::ioctl_tiocsctty(&tty);
    let (Ok(i), Ok(o), Ok(e)) = (tty.try_clone(), tty.try_clone(), tty.try_clone()) else {
        return ExitCode::from(126);
    };
    let err = Command::new(program)
        .args(rest)
        .stdin(Stdio::from(i))
        .stdout(Stdio::from(o))
        .stderr(Stdio::from(e))
        .exec();
    let mut tty = tty;
    let _ = writeln!(tty, "berth-sandboxd: cannot run {program:?}: {err}");
    ExitCode::from(if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
