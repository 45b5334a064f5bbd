//! Pausing a sandbox to disk and bringing it back: the shim's side of pause and resume.
//!
//! The agent asks for a pause with a `pause` file (the mode on its first line). The shim
//! then quiesces the helper (gVisor cannot save a sandbox holding a host socket; see
//! berth-sandboxd's `quiesce`), and either runs `runsc checkpoint` into `snapshot/` (memory
//! and files: the sandbox resumes where it was) or, filesystem-only, stops the sandbox and
//! keeps its write layer (its processes start again on resume). Either way the sandbox's
//! runtime ends, everything it held on the node is released, and the shim writes
//! `paused.json` instead of `exit.json`. The write layer `fs/upper` stays, so files survive.
//!
//! A shim started on a directory holding `paused.json` resumes it: `runsc restore` from
//! `snapshot/` (or a fresh start on the kept files), the helper is woken to listen again,
//! and once the sandbox runs the image and `paused.json` are removed.

use std::fs;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_sandboxd::wire::{self, FromHelper, ToHelper, WAKE};
use serde::{Deserialize, Serialize};

use crate::runtime::{files, unix_ms, write_atomic};

/// How long a quiesce may take before the pause is given up.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a pause keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseMode {
    /// Memory and files: the sandbox resumes where it was (`runsc checkpoint`).
    Memory,
    /// Files only: its processes start again on resume (GPU sandboxes, whose device state
    /// gVisor cannot save).
    FilesystemOnly,
}

impl PauseMode {
    /// The `pause` file's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Memory => "memory",
            PauseMode::FilesystemOnly => "filesystem_only",
        }
    }
}

/// `paused.json`: a sandbox paused to this node's disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedRecord {
    /// What it holds.
    pub mode: PauseMode,
    /// The snapshot's size on disk: the checkpoint image and the write layer.
    pub bytes: u64,
    /// When it was taken, in Unix ms.
    pub taken_unix_ms: u64,
    /// Time it had run before the pause, toward its session limit (paused time does not
    /// count).
    pub ran_ms: u64,
    /// The last exec or file call before the pause, in Unix ms (the idle limit counts from
    /// it, paused time included).
    pub last_activity_unix_ms: u64,
}

/// A pause the agent asked for, if it did.
pub fn requested(dir: &Path) -> Option<PauseMode> {
    let text = fs::read_to_string(dir.join(files::PAUSE)).ok()?;
    Some(match text.lines().next().unwrap_or("").trim() {
        "filesystem_only" => PauseMode::FilesystemOnly,
        _ => PauseMode::Memory,
    })
}

/// Whether a pause of the sandbox in `dir` needing about `need` bytes fits the node's
/// snapshot budget: the snapshots its siblings in the same state directory hold (their
/// `paused.json`), plus `need`. A budget of 0 always fits. The scheduler checks the
/// pauses it asks for; this is for the shim's own automatic pause.
pub fn fits_budget(dir: &Path, budget: u64, need: u64) -> bool {
    if budget == 0 {
        return true;
    }
    let Some(Ok(siblings)) = dir.parent().map(fs::read_dir) else {
        return true;
    };
    let kept: u64 = siblings
        .filter_map(Result::ok)
        .filter(|e| e.path() != dir)
        .filter_map(|e| read_paused(&e.path()))
        .map(|p| p.bytes)
        .sum();
    kept.saturating_add(need) <= budget
}

/// `paused.json`, if the sandbox is paused.
pub fn read_paused(dir: &Path) -> Option<PausedRecord> {
    serde_json::from_slice(&fs::read(dir.join(files::PAUSED)).ok()?).ok()
}

/// Asks the helper to let go of its socket and waits until it has. Returns how many calls
/// it cut. Without a helper listening (none configured, or it already let go) there is
/// nothing to do.
pub fn quiesce_helper(dir: &Path) -> Result<u32, String> {
    let socket = crate::sandboxd::socket(dir);
    let _ = fs::remove_file(dir.join(crate::sandboxd::RUN_DIR).join(WAKE));
    let mut conn = match UnixStream::connect(&socket) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(format!(
                "cannot reach the helper at {}: {e}",
                socket.display()
            ));
        }
    };
    let step = |e: io::Error| format!("quiescing the helper: {e}");
    conn.set_read_timeout(Some(QUIESCE_TIMEOUT)).map_err(step)?;
    conn.set_write_timeout(Some(QUIESCE_TIMEOUT))
        .map_err(step)?;
    wire::write_frame(&mut conn, &ToHelper::Quiesce.encode()).map_err(step)?;
    let answer = wire::read_frame(&mut conn)
        .map_err(step)?
        .ok_or("the helper closed the quiesce call without answering")?;
    let ended = match FromHelper::decode(&answer).map_err(step)? {
        FromHelper::Quiesced { ended_calls } => ended_calls,
        FromHelper::Error { message, .. } => return Err(format!("the helper: {message}")),
        other => return Err(format!("the helper answered a quiesce with {other:?}")),
    };
    // It closes the call once its socket is gone; wait for that, so nothing of it is left
    // when the checkpoint starts.
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    Ok(ended)
}

/// Tells a quiesced helper to listen again.
pub fn wake_helper(dir: &Path) {
    let run = dir.join(crate::sandboxd::RUN_DIR);
    if run.is_dir() {
        let _ = write_atomic(&run.join(WAKE), b"");
    }
}

/// Runs `runsc <globals> checkpoint --image-path=<dir>/snapshot <cid>`; the sandbox stops.
pub fn runsc_checkpoint(
    dir: &Path,
    runsc: &str,
    globals: &[String],
    cid: &str,
) -> Result<(), String> {
    let image = dir.join(files::SNAPSHOT);
    let _ = fs::remove_dir_all(&image);
    fs::create_dir_all(&image).map_err(|e| format!("{}: {e}", image.display()))?;
    let out = Command::new(runsc)
        .args(globals)
        .arg("checkpoint")
        .arg(format!("--image-path={}", image.display()))
        .arg(cid)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {runsc} checkpoint: {e}"))?;
    if !out.status.success() {
        let _ = fs::remove_dir_all(&image);
        return Err(format!(
            "runsc checkpoint failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Bytes under `path` (files only; a missing path is 0).
pub fn disk_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Writes `paused.json` and drops the request.
pub fn record_paused(dir: &Path, mode: PauseMode, ran_ms: u64) -> io::Result<PausedRecord> {
    let last_activity_unix_ms = fs::read_to_string(dir.join(files::ACTIVITY))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let record = PausedRecord {
        mode,
        bytes: disk_bytes(&dir.join(files::SNAPSHOT)) + disk_bytes(&dir.join("fs/upper")),
        taken_unix_ms: unix_ms(),
        ran_ms,
        last_activity_unix_ms,
    };
    write_atomic(
        &dir.join(files::PAUSED),
        &serde_json::to_vec(&record).map_err(io::Error::other)?,
    )?;
    let _ = fs::remove_file(dir.join(files::PAUSE));
    Ok(record)
}

/// The sandbox runs again: its pause record goes.
pub fn forget_pause(dir: &Path) {
    let _ = fs::remove_file(dir.join(files::PAUSED));
}

/// The sandbox runs again (or ended while paused): its image and record go.
pub fn resumed(dir: &Path) {
    forget_pause(dir);
    let _ = fs::remove_dir_all(dir.join(files::SNAPSHOT));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paused_sibling(root: &Path, name: &str, bytes: u64) {
        let dir = root.join(name);
        fs::create_dir_all(&dir).expect("dir");
        let record = PausedRecord {
            mode: PauseMode::Memory,
            bytes,
            taken_unix_ms: 1,
            ran_ms: 1,
            last_activity_unix_ms: 1,
        };
        let json = serde_json::to_vec(&record).expect("json");
        fs::write(dir.join(files::PAUSED), json).expect("write");
    }

    #[test]
    fn an_automatic_pause_fits_the_budget_only_beside_what_siblings_keep() {
        let root = tempfile::tempdir().expect("tmp");
        let me = root.path().join("sbx-0000000009");
        fs::create_dir_all(&me).expect("dir");
        paused_sibling(root.path(), "sbx-0000000001", 600);
        paused_sibling(root.path(), "sbx-0000000002", 300);
        fs::create_dir_all(root.path().join("sbx-0000000003")).expect("running one");
        assert!(fits_budget(&me, 1_000, 100));
        assert!(!fits_budget(&me, 1_000, 101));
        assert!(fits_budget(&me, 0, u64::MAX), "no budget");
        // Its own earlier snapshot is not counted twice.
        paused_sibling(root.path(), "sbx-0000000009", 500);
        assert!(fits_budget(&me, 1_000, 100));
    }
}
