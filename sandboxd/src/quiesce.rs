//! The calls the helper serves, and getting out of the way of a checkpoint.
//!
//! gVisor refuses to save a sandbox that holds a host socket ("cannot save endpoint with
//! bound host socket"), and the helper's socket is one (`--host-uds=create`). So before
//! `runsc checkpoint` the shim sends [`ToHelper::Quiesce`](berth_sandboxd::wire::ToHelper):
//! the helper stops accepting, cuts every other call (an exec in flight is killed, as when
//! its caller goes away; its caller sees the call break), removes the socket, answers and
//! closes. It then polls for the wake file (only while quiesced, every [`WAKE_POLL`]); the
//! shim writes it once the sandbox runs again, restored or not, and the helper listens on a
//! fresh socket. Processes the sandbox runs are untouched.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use berth_sandboxd::wire::{FromHelper, MAX_CALLS, WAKE};
use rustix::event::{PollFd, PollFlags};

/// How often a quiesced helper looks for the wake file.
const WAKE_POLL: Duration = Duration::from_millis(5);
/// How long a quiesce waits for cut calls' threads to let go of their connections.
const DRAIN: Duration = Duration::from_secs(2);

/// Binds the socket (non-blocking: [`Server::accept`] polls it), replacing a stale one.
pub(crate) fn bind(socket: &str) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

#[derive(Default)]
struct Calls {
    /// A clone of each open call's connection, to cut it on quiesce.
    open: HashMap<u64, UnixStream>,
    next: u64,
    /// Set by a quiesce until the helper listens again.
    quiescing: bool,
    /// The listener is closed (the quiesce waits for it).
    closed: bool,
}

/// The helper's open calls and its listening state.
pub(crate) struct Server {
    socket: String,
    calls: Mutex<Calls>,
    changed: Condvar,
    /// A pipe the accept loop polls beside its listener: a quiesce writes to it.
    wake: (OwnedFd, OwnedFd),
}

impl Server {
    pub(crate) fn new(socket: String) -> io::Result<Server> {
        Ok(Server {
            socket,
            calls: Mutex::default(),
            changed: Condvar::new(),
            wake: rustix::pipe::pipe()?,
        })
    }

    /// The next connection, or `None` once a quiesce has begun. The listener is
    /// non-blocking; the wait is a poll on it and the wake pipe.
    pub(crate) fn accept(&self, listener: &UnixListener) -> Option<io::Result<UnixStream>> {
        loop {
            if self.quiescing() {
                let mut buf = [0u8; 16];
                let _ = rustix::io::read(&self.wake.0, &mut buf);
                return None;
            }
            let mut fds = [
                PollFd::new(listener, PollFlags::IN),
                PollFd::new(&self.wake.0, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Some(Err(e.into())),
            }
            if fds[1].revents().contains(PollFlags::IN) {
                continue;
            }
            match listener.accept() {
                Ok((conn, _)) => return Some(Ok(conn)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a quiesce is under way (the accept loop stops).
    pub(crate) fn quiescing(&self) -> bool {
        self.lock().quiescing
    }

    /// Takes a call in; `None` past [`MAX_CALLS`].
    pub(crate) fn admit(&self, conn: &UnixStream) -> Option<u64> {
        let mut calls = self.lock();
        if calls.open.len() >= MAX_CALLS {
            return None;
        }
        let token = calls.next;
        calls.next += 1;
        if let Ok(clone) = conn.try_clone() {
            calls.open.insert(token, clone);
        }
        Some(token)
    }

    /// A call ended.
    pub(crate) fn leave(&self, token: u64) {
        self.lock().open.remove(&token);
        self.changed.notify_all();
    }

    /// The accept loop has dropped its listener: say so, wait for the wake file, listen again.
    pub(crate) fn closed_and_wait_for_wake(&self) -> UnixListener {
        let _ = std::fs::remove_file(&self.socket);
        self.lock().closed = true;
        self.changed.notify_all();
        let wake = wake_file(&self.socket);
        loop {
            std::thread::sleep(WAKE_POLL);
            if !wake.exists() {
                continue;
            }
            let _ = std::fs::remove_file(&wake);
            match bind(&self.socket) {
                Ok(listener) => {
                    let mut calls = self.lock();
                    calls.quiescing = false;
                    calls.closed = false;
                    return listener;
                }
                Err(e) => eprintln!(
                    "berth-sandboxd: cannot listen again on {}: {e}",
                    self.socket
                ),
            }
        }
    }

    /// Serves a quiesce call (`own` is its connection, the one call left open).
    pub(crate) fn quiesce(&self, own: &mut UnixStream) -> io::Result<()> {
        {
            let mut calls = self.lock();
            calls.quiescing = true;
        }
        // Wake the accept loop from its poll.
        let _ = rustix::io::write(&self.wake.1, b"q");
        let mine = own.try_clone().ok();
        let deadline = Instant::now() + DRAIN;
        let mut calls = self.lock();
        while !calls.closed && Instant::now() < deadline {
            calls = self
                .changed
                .wait_timeout(calls, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let mut ended = 0u32;
        for conn in calls.open.values() {
            let same = mine.as_ref().is_some_and(|m| same_socket(m, conn));
            if !same {
                let _ = conn.shutdown(Shutdown::Both);
                ended += 1;
            }
        }
        // The cut calls' threads drop their connections as they notice.
        while calls.open.len() > 1 && Instant::now() < deadline {
            calls = self
                .changed
                .wait_timeout(calls, Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let closed = calls.closed;
        drop(calls);
        if !closed {
            return Err(io::Error::other("the listener did not close"));
        }
        crate::send(own, &FromHelper::Quiesced { ended_calls: ended })?;
        own.shutdown(Shutdown::Both)
    }
}

/// Whether two handles are the same connection (dups of one socket share its inode).
fn same_socket(a: &UnixStream, b: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    let inode = |s: &UnixStream| {
        rustix::fs::fstat(s.as_fd())
            .map(|st| (st.st_dev, st.st_ino))
            .ok()
    };
    inode(a).is_some() && inode(a) == inode(b)
}

/// The wake file beside the socket.
fn wake_file(socket: &str) -> PathBuf {
    Path::new(socket)
        .parent()
        .unwrap_or(Path::new("/"))
        .join(WAKE)
}
