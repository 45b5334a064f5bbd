//! The agent's side of the helper inside each sandbox (`berth-sandboxd`, crate
//! `sandboxd/`): the static executable this crate carries ([`BINARY`], built by
//! `build.rs`), installed into `<state_dir>/bin` and mounted read-only into sandboxes at
//! `/.berth/bin`; and [`Call`], one call over the sandbox's socket
//! `<sandbox dir>/run/sandboxd.sock`, which gVisor creates on the host (`--host-uds=create`)
//! when the helper listens at `/.berth/run/sandboxd.sock` inside.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tonic::Status;

use berth_sandboxd::wire::{self, ErrorKind, FromHelper, ToHelper};

/// How long a call waits for a just-started (or just-woken) sandbox's helper to listen.
const HELPER_STARTING: Duration = Duration::from_secs(3);

/// The helper, statically linked.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/berth-sandboxd"));

/// The directory under a sandbox's directory that holds its socket (mounted at
/// `/.berth/run`).
pub const RUN_DIR: &str = "run";

/// Writes the helper into `<state_dir>/bin` (unless the same bytes are there) and returns
/// that directory.
pub fn install(state_dir: &Path) -> io::Result<PathBuf> {
    let dir = state_dir.join("bin");
    fs::create_dir_all(&dir)?;
    let path = dir.join(berth_sandboxd::BINARY);
    if fs::read(&path).is_ok_and(|b| b == BINARY) {
        return Ok(dir);
    }
    let temp = dir.join(format!(
        ".{}.{}",
        berth_sandboxd::BINARY,
        std::process::id()
    ));
    fs::write(&temp, BINARY)?;
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o555))?;
    fs::rename(&temp, &path)?;
    Ok(dir)
}

/// The socket of the sandbox in `dir`.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join(RUN_DIR).join(berth_sandboxd::SOCKET)
}

/// A helper's error as a gRPC status naming what it is about.
pub fn status(kind: ErrorKind, message: String) -> Status {
    match kind {
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::BadPath | ErrorKind::Invalid => Status::invalid_argument(message),
        ErrorKind::PermissionDenied => Status::permission_denied(message),
        ErrorKind::TooLarge => Status::resource_exhausted(message),
        ErrorKind::Busy => Status::unavailable(message),
        ErrorKind::Other => Status::internal(message),
    }
}

/// The sending half of a call.
pub struct Sender(OwnedWriteHalf);
/// The receiving half of a call.
pub struct Receiver(OwnedReadHalf);

/// Opens a call to the helper of the sandbox in `dir`.
pub async fn connect(dir: &Path, id: &str) -> Result<(Sender, Receiver), Status> {
    let path = socket(dir);
    // A sandbox is reported running when runsc runs it, a moment before its helper
    // listens: a call in that moment (or during a resume's wake) waits for it, briefly.
    let deadline = tokio::time::Instant::now() + HELPER_STARTING;
    let mut attempt = UnixStream::connect(&path).await;
    while let Err(e) = &attempt {
        let starting =
            e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::ConnectionRefused;
        if !starting || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        attempt = UnixStream::connect(&path).await;
    }
    let stream = attempt.map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::ConnectionRefused {
            Status::failed_precondition(format!(
                "sandbox_id: {id} has no exec helper listening ({}: {e}); it may still be \
                 starting, or it was started by an agent without one",
                path.display()
            ))
        } else {
            Status::unavailable(format!("{}: {e}", path.display()))
        }
    })?;
    let (r, w) = stream.into_split();
    Ok((Sender(w), Receiver(r)))
}

fn broken(e: io::Error) -> Status {
    Status::unavailable(format!("the sandbox's helper: {e}"))
}

impl Sender {
    /// Sends one frame.
    pub async fn send(&mut self, m: &ToHelper) -> Result<(), Status> {
        self.0
            .write_all(&wire::frame(&m.encode()))
            .await
            .map_err(broken)
    }
}

impl Receiver {
    /// The next frame; `Ok(None)` when the helper closed the call.
    pub async fn recv(&mut self) -> Result<Option<FromHelper>, Status> {
        let mut header = [0u8; 4];
        match self.0.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(broken(e)),
        }
        let len = wire::frame_len(header).map_err(broken)?;
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).await.map_err(broken)?;
        FromHelper::decode(&body).map(Some).map_err(broken)
    }
}
