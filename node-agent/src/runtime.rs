//! The agent's handle on its sandbox directories: start a sandbox's shim, ask it to stop,
//! read where every sandbox stands, remove what is finished. The shim itself is
//! [`crate::shim`].
//!
//! One directory per sandbox under `<state_dir>/sandboxes/<id>/`:
//!
//! | file | written by | meaning |
//! |---|---|---|
//! | `launch.json` | agent, before the shim starts | what to run ([`Launch`]) |
//! | `shim.pid` | shim, first thing | the shim's pid, to tell whether it still runs |
//! | `started` | shim | the runtime runs the sandbox (its start is over) |
//! | `stdout`, `stderr` | shim | captured output, at most `max_output_bytes` each |
//! | `terminate` | agent | "stop it": grace period in ms, then the reason |
//! | `exit.json` | shim, last thing (or the agent, when it could not start it) | how it ended ([`ExitRecord`]) |
//! | `shim.log` | shim (its stderr) | the shim's own messages |
//! | `pause` | agent | "pause it": the mode ([`crate::checkpoint`]) |
//! | `paused.json` | shim, instead of `exit.json` | it is paused to this disk ([`PausedRecord`]) |
//! | `snapshot/` | shim (`runsc checkpoint`) | its memory image while paused |
//! | `fs/upper`, `fs/merged` | shim | the sandbox's writes over its image, and its root |
//! | `bundle/config.json` | shim | the OCI runtime spec runsc runs |
//!
//! Files are written atomically (write to a temporary name, then rename), so a reader sees
//! either nothing or the whole file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use crate::launch::Launch;

/// File names inside a sandbox directory.
pub mod files {
    /// What to run.
    pub const LAUNCH: &str = "launch.json";
    /// The shim's pid.
    pub const PID: &str = "shim.pid";
    /// Captured stdout.
    pub const STDOUT: &str = "stdout";
    /// Captured stderr.
    pub const STDERR: &str = "stderr";
    /// Stop request.
    pub const TERMINATE: &str = "terminate";
    /// How it ended.
    pub const EXIT: &str = "exit.json";
    /// The shim's own log.
    pub const SHIM_LOG: &str = "shim.log";
    /// The runtime runs it.
    pub const STARTED: &str = "started";
    /// When an exec or file call last touched it (unix ms), for the idle limit.
    pub const ACTIVITY: &str = "activity";
    /// Pause request.
    pub const PAUSE: &str = "pause";
    /// It is paused to disk.
    pub const PAUSED: &str = "paused.json";
    /// The checkpoint image.
    pub const SNAPSHOT: &str = "snapshot";
    /// Why the last pause failed (the sandbox kept running).
    pub const PAUSE_FAILED: &str = "pause_failed";
    /// It is frozen in place (standby), since the Unix ms inside; see [`crate::freezer`].
    pub const STANDBY: &str = "standby";
}

pub use crate::checkpoint::{PauseMode, PausedRecord};

/// How a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command exited (a signal N is reported as 128 + N, as shells do).
    Exited {
        /// Exit code.
        code: i32,
    },
    /// It could not start, timed out or was terminated.
    Failed {
        /// Why.
        reason: String,
    },
}

/// `exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// How it ended.
    pub outcome: Outcome,
    /// When, in Unix ms.
    pub finished_unix_ms: u64,
    /// stdout hit the cap.
    pub stdout_truncated: bool,
    /// stderr hit the cap.
    pub stderr_truncated: bool,
}

impl ExitRecord {
    /// A sandbox that ended now, failed for `reason`, with no output cut.
    pub fn failed(reason: &str) -> ExitRecord {
        ExitRecord {
            outcome: Outcome::Failed {
                reason: reason.to_owned(),
            },
            finished_unix_ms: unix_ms(),
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }
}

/// What the agent finds in a sandbox directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalState {
    /// Its shim runs (or is just starting).
    Running,
    /// Its shim runs and the sandbox is frozen in place ([`crate::freezer`]).
    Standby,
    /// Paused to this node's disk; no shim runs.
    Paused(PausedRecord),
    /// It ended.
    Finished(ExitRecord),
}

impl LocalState {
    /// Its shim runs it: Running, or frozen on standby.
    pub fn runs(&self) -> bool {
        matches!(self, LocalState::Running | LocalState::Standby)
    }
}

/// A sandbox this node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSandbox {
    /// What was launched.
    pub launch: Launch,
    /// Where it stands.
    pub state: LocalState,
    /// Its runtime runs it (`started` is there); a running sandbox without it is starting.
    pub started: bool,
    /// Why its last pause failed (it kept running), while the shim's note is there.
    pub pause_failed: Option<String>,
}

/// Now, in Unix milliseconds (record times for operators, never for decisions).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes a file atomically (temporary name, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Whether a sandbox id is safe as a directory name.
pub fn valid_sandbox_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The agent's handle on its sandbox directories.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    shim: Vec<OsString>,
}

impl Runtime {
    /// Sandbox directories under `root`; `shim` is the program and leading arguments that
    /// run [`run_shim`] on a directory (the berth binary and `agent-shim`).
    pub fn new(root: PathBuf, shim: Vec<OsString>) -> io::Result<Runtime> {
        fs::create_dir_all(&root)?;
        Ok(Runtime { root, shim })
    }

    /// A sandbox's directory.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Starts a sandbox unless this node already has it (an assignment delivered twice, or
    /// again after a reconnect, starts it once). Returns whether it started now.
    pub fn start(&self, launch: &Launch) -> io::Result<bool> {
        if !valid_sandbox_id(&launch.sandbox_id) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{:?} is not a valid sandbox id", launch.sandbox_id),
            ));
        }
        let dir = self.dir(&launch.sandbox_id);
        if dir.join(files::LAUNCH).exists() {
            return Ok(false);
        }
        fs::create_dir_all(&dir)?;
        let bytes = serde_json::to_vec_pretty(launch).map_err(io::Error::other)?;
        write_atomic(&dir.join(files::LAUNCH), &bytes)?;
        self.spawn_shim(&dir)?;
        Ok(true)
    }

    /// Starts the shim on a sandbox directory (its log appended to `shim.log`).
    fn spawn_shim(&self, dir: &Path) -> io::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(files::SHIM_LOG))?;
        let Some((program, args)) = self.shim.split_first() else {
            return Err(io::Error::other("no shim command configured"));
        };
        let mut shim = Command::new(program)
            .args(args)
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        // Reap it when it ends (the record is in exit.json); after an agent restart the
        // orphaned shim is reaped by init instead.
        thread::spawn(move || {
            let _ = shim.wait();
        });
        Ok(())
    }

    /// Asks a sandbox's shim to stop it: SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&self, id: &str, grace: Duration, reason: &str) -> io::Result<()> {
        if !valid_sandbox_id(id) {
            return Ok(());
        }
        let dir = self.dir(id);
        if !dir.exists() || dir.join(files::TERMINATE).exists() {
            return Ok(());
        }
        // A frozen sandbox takes no signal: thaw it so it can be stopped.
        if let Err(e) = self.thaw(id) {
            tracing::warn!(sandbox = %id, error = %e, "could not thaw a sandbox to stop it");
        }
        write_atomic(
            &dir.join(files::TERMINATE),
            format!("{}\n{reason}\n", grace.as_millis()).as_bytes(),
        )
    }

    /// Asks a running sandbox's shim to pause it to disk (thawed first when it is on
    /// standby). A sandbox that is not running (ended, paused already) is left as it is.
    pub fn pause(&self, id: &str, mode: PauseMode) -> io::Result<()> {
        if !valid_sandbox_id(id) {
            return Ok(());
        }
        let dir = self.dir(id);
        self.thaw(id).map_err(io::Error::other)?;
        if !dir.join(files::LAUNCH).exists()
            || dir.join(files::EXIT).exists()
            || dir.join(files::PAUSED).exists()
        {
            return Ok(());
        }
        write_atomic(
            &dir.join(files::PAUSE),
            format!("{}\n", mode.as_str()).as_bytes(),
        )
    }

    /// Freezes a running gVisor sandbox in place (standby). Blocking, a few ms: the agent
    /// runs it, and [`Runtime::thaw`], in order on one thread ([`crate::standby`]).
    pub fn standby(&self, id: &str) -> Result<(), String> {
        let sandbox = self
            .inspect(id)
            .ok_or_else(|| format!("sandbox {id} is not on this node"))?;
        match sandbox.state {
            LocalState::Standby => return Ok(()),
            LocalState::Running if sandbox.started => {}
            _ => return Err(format!("sandbox {id} is not running here")),
        }
        let dir = self.dir(id);
        let cid = crate::shim_command::container_id(&dir, &sandbox.launch);
        crate::freezer::freeze(&dir, &cid, unix_ms())
    }

    /// Thaws a sandbox on standby here (a no-op for any other) and marks it active.
    /// Blocking, a few ms.
    pub fn thaw(&self, id: &str) -> Result<(), String> {
        let dir = self.dir(id);
        if !valid_sandbox_id(id) || !crate::freezer::is_standby(&dir) {
            return Ok(());
        }
        let launch: Launch = fs::read(dir.join(files::LAUNCH))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| format!("sandbox {id} has no launch record"))?;
        let cid = crate::shim_command::container_id(&dir, &launch);
        crate::freezer::thaw(&dir, &cid)?;
        // A thaw is someone's resume, or a warm pool's sandbox claimed: its idle limit
        // counts from now, not from before it was frozen.
        let _ = write_atomic(&dir.join(files::ACTIVITY), unix_ms().to_string().as_bytes());
        Ok(())
    }

    /// Notes that a standby failed, so the next report says so (as a failed pause does).
    pub fn standby_failed(&self, id: &str, why: &str) {
        if valid_sandbox_id(id) {
            let _ = write_atomic(&self.dir(id).join(files::PAUSE_FAILED), why.as_bytes());
        }
    }

    /// Resumes a sandbox paused here: a new shim restores it, now under `epoch`. Returns
    /// `false` when it is not paused here (running already, or unknown).
    pub fn resume(&self, id: &str, epoch: u64) -> io::Result<bool> {
        if !valid_sandbox_id(id) {
            return Ok(false);
        }
        let dir = self.dir(id);
        if !dir.join(files::PAUSED).exists() || shim_alive(&dir) || dir.join(files::EXIT).exists() {
            return Ok(false);
        }
        let mut launch: Launch = serde_json::from_slice(&fs::read(dir.join(files::LAUNCH))?)
            .map_err(io::Error::other)?;
        launch.epoch = epoch;
        for stale in [files::STARTED, files::PAUSE, files::TERMINATE, files::PID] {
            let _ = fs::remove_file(dir.join(stale));
        }
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec_pretty(&launch).map_err(io::Error::other)?,
        )?;
        self.spawn_shim(&dir)?;
        Ok(true)
    }

    /// Ends a sandbox paused here without resuming it: `exit.json` says why, and its
    /// snapshot is removed (its output and write layer go with the directory later).
    fn end_paused(&self, dir: &Path, reason: &str) -> ExitRecord {
        let record = ExitRecord::failed(reason);
        let _ = serde_json::to_vec(&record).map(|b| write_atomic(&dir.join(files::EXIT), &b));
        crate::checkpoint::resumed(dir);
        record
    }

    /// Records that a sandbox could not be started (its image could not be pulled, ...):
    /// its directory gets the launch and a failed `exit.json`, and no shim runs.
    pub fn record_failure(&self, launch: &Launch, reason: &str) -> io::Result<()> {
        if !valid_sandbox_id(&launch.sandbox_id) {
            return Ok(());
        }
        let dir = self.dir(&launch.sandbox_id);
        if dir.join(files::LAUNCH).exists() {
            return Ok(());
        }
        fs::create_dir_all(&dir)?;
        let record = ExitRecord::failed(reason);
        write_atomic(
            &dir.join(files::EXIT),
            &serde_json::to_vec(&record).map_err(io::Error::other)?,
        )?;
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec_pretty(launch).map_err(io::Error::other)?,
        )
    }

    /// Whether a sandbox's start is over: its runtime runs it, or it already ended (or its
    /// shim is gone).
    pub fn start_settled(&self, id: &str) -> bool {
        let dir = self.dir(id);
        dir.join(files::STARTED).exists()
            || dir.join(files::EXIT).exists()
            || (dir.join(files::PID).exists() && !shim_alive(&dir))
    }

    /// Removes a finished sandbox's directory (its logs and write layer go with it).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        if !valid_sandbox_id(id) {
            return Ok(());
        }
        // A shim killed before it cleaned up may have left the overlay mounted: never
        // delete through it.
        crate::bundle::unmount_rootfs(&self.dir(id));
        // Its freezer group, should the shim have ended before its processes did.
        if let Some(launch) = fs::read(self.dir(id).join(files::LAUNCH))
            .ok()
            .and_then(|b| serde_json::from_slice::<Launch>(&b).ok())
        {
            let dir = self.dir(id);
            crate::freezer::remove_group(&crate::shim_command::container_id(&dir, &launch));
        }
        match fs::remove_dir_all(self.dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every sandbox on this node and where it stands, by id.
    pub fn scan(&self) -> BTreeMap<String, LocalSandbox> {
        self.scan_cached(&BTreeMap::new())
    }

    /// As [`Runtime::scan`], reusing the finished sandboxes of an earlier scan (a finished
    /// sandbox never changes), so a node keeping many finished sandboxes' output does not
    /// re-read each one on every look.
    pub fn scan_cached(
        &self,
        earlier: &BTreeMap<String, LocalSandbox>,
    ) -> BTreeMap<String, LocalSandbox> {
        let mut found = BTreeMap::new();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return found;
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !valid_sandbox_id(&id) {
                continue;
            }
            if let Some(done) = earlier
                .get(&id)
                .filter(|s| matches!(s.state, LocalState::Finished(_)))
            {
                found.insert(id, done.clone());
                continue;
            }
            if let Some(sandbox) = self.inspect(&id) {
                found.insert(id, sandbox);
            }
        }
        found
    }

    /// One sandbox directory; `None` when it holds no launch record.
    pub fn inspect(&self, id: &str) -> Option<LocalSandbox> {
        let dir = self.dir(id);
        let launch: Launch =
            serde_json::from_slice(&fs::read(dir.join(files::LAUNCH)).ok()?).ok()?;
        let state = match read_exit(&dir) {
            Some(record) => LocalState::Finished(record),
            None if shim_alive(&dir) && crate::freezer::is_standby(&dir) => LocalState::Standby,
            None if shim_alive(&dir) => LocalState::Running,
            None if dir.join(files::PAUSED).exists() => {
                match crate::checkpoint::read_paused(&dir) {
                    // Stopped while paused: it ends here, and its snapshot goes with it.
                    Some(_) if dir.join(files::TERMINATE).exists() => {
                        let reason = read_terminate_reason(&dir);
                        LocalState::Finished(self.end_paused(&dir, &reason))
                    }
                    Some(record) => LocalState::Paused(record),
                    None => LocalState::Finished(
                        self.end_paused(&dir, "its pause record does not read"),
                    ),
                }
            }
            None => {
                // Re-read: the shim may have finished between the two looks.
                match read_exit(&dir) {
                    Some(record) => LocalState::Finished(record),
                    None => {
                        let reason = "its shim exited without recording a result (the node \
                                      rebooted, or the shim was killed)"
                            .to_owned();
                        let record = ExitRecord::failed(&reason);
                        // Record it, so later scans agree.
                        let _ = serde_json::to_vec(&record)
                            .map(|b| write_atomic(&dir.join(files::EXIT), &b));
                        LocalState::Finished(record)
                    }
                }
            }
        };
        let started = dir.join(files::STARTED).exists();
        let pause_failed = (state == LocalState::Running)
            .then(|| fs::read_to_string(dir.join(files::PAUSE_FAILED)).ok())
            .flatten();
        Some(LocalSandbox {
            launch,
            state,
            started,
            pause_failed,
        })
    }
}

/// The reason line of a `terminate` file, as the shim words it.
fn read_terminate_reason(dir: &Path) -> String {
    let text = fs::read_to_string(dir.join(files::TERMINATE)).unwrap_or_default();
    match text.split_once('\n').map(|(_, r)| r.trim()) {
        Some(r) if !r.is_empty() => format!("terminated: {r}"),
        _ => "terminated".to_owned(),
    }
}

/// `exit.json`, if it is there.
pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&fs::read(dir.join(files::EXIT)).ok()?).ok()
}

/// Whether the shim of `dir` runs: its pid exists and is a shim for this directory (pids
/// are reused). A directory too young to have a pid file counts as starting.
fn shim_alive(dir: &Path) -> bool {
    let Ok(text) = fs::read_to_string(dir.join(files::PID)) else {
        let young = fs::metadata(dir.join(files::LAUNCH))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(10));
        return young;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return false;
    };
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    let is_zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    !is_zombie && cmdline.contains(dir.to_string_lossy().as_ref())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::RuntimeKind;

    pub(crate) fn launch(id: &str, command: &[&str]) -> Launch {
        Launch {
            sandbox_id: id.into(),
            epoch: 1,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            image: String::new(),
            image_digest: String::new(),
            rootfs: None,
            workdir: String::new(),
            uid: 0,
            gid: 0,
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            cpu_milli: 500,
            memory_mib: 256,
            timeout_ms: 0,
            net: None,
            runtime: RuntimeKind::Process,
            runsc_path: "runsc".into(),
            runsc_platform: "ptrace".into(),
            max_output_bytes: 4096,
            sandboxd_dir: None,
            keep_alive: false,
            idle_timeout_ms: 0,
            auto_pause_idle_ms: 0,
            snapshot_budget_bytes: 0,
        }
    }

    fn write_launch(dir: &Path, l: &Launch) {
        fs::create_dir_all(dir).expect("dir");
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec(l).expect("json"),
        )
        .expect("launch");
    }

    #[test]
    fn terminate_stops_a_running_sandbox_and_scan_tracks_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        // The shim runs on a thread here; the runtime only reads the directory.
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["true".into()]).expect("rt");
        let l = launch("sbx-5", &["sleep", "30"]);
        let dir = runtime.dir("sbx-5");
        write_launch(&dir, &l);
        // Launched, no pid file yet: starting, which counts as running.
        assert_eq!(runtime.scan()["sbx-5"].state, LocalState::Running);
        assert!(!runtime.start_settled("sbx-5"));
        let shim = {
            let dir = dir.clone();
            thread::spawn(move || crate::shim::run_shim(&dir))
        };
        runtime
            .terminate("sbx-5", Duration::from_millis(100), "deleted")
            .expect("terminate");
        assert_eq!(shim.join().expect("shim"), 0);
        assert!(runtime.start_settled("sbx-5"));
        match &runtime.scan()["sbx-5"].state {
            LocalState::Finished(r) => assert_eq!(
                r.outcome,
                Outcome::Failed {
                    reason: "terminated: deleted".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        runtime.remove("sbx-5").expect("remove");
        assert!(runtime.scan().is_empty());
    }

    #[test]
    fn finished_sandboxes_are_not_read_again_and_removed_ones_drop_out() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["true".into()]).expect("rt");
        let dir = runtime.dir("sbx-7");
        write_launch(&dir, &launch("sbx-7", &["true"]));
        assert_eq!(crate::shim::run_shim(&dir), 0);
        let first = runtime.scan();
        assert!(matches!(first["sbx-7"].state, LocalState::Finished(_)));
        // Unreadable now, but a finished sandbox never changes: the earlier look stands.
        fs::write(dir.join(files::LAUNCH), "not json").expect("clobber");
        assert!(
            runtime.scan().is_empty(),
            "a plain scan reads the file again"
        );
        assert_eq!(runtime.scan_cached(&first), first);
        runtime.remove("sbx-7").expect("remove");
        assert!(runtime.scan_cached(&first).is_empty());
    }

    #[test]
    fn a_failure_recorded_before_start_is_reported_and_no_shim_runs() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["false".into()]).expect("rt");
        let l = launch("sbx-8", &["true"]);
        runtime
            .record_failure(&l, "image \"x\": manifest unknown")
            .expect("record");
        assert!(runtime.start_settled("sbx-8"));
        match &runtime.scan()["sbx-8"].state {
            LocalState::Finished(r) => assert_eq!(
                r.outcome,
                Outcome::Failed {
                    reason: "image \"x\": manifest unknown".into()
                }
            ),
            other => panic!("{other:?}"),
        }
        // A later start of the same sandbox is a no-op.
        assert!(!runtime.start(&l).expect("start"));
    }

    #[test]
    fn a_dead_shim_without_a_record_is_reported_failed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["true".into()]).expect("rt");
        let dir = runtime.dir("sbx-6");
        write_launch(&dir, &launch("sbx-6", &["true"]));
        // A pid that is not a shim of this directory (our own process).
        write_atomic(
            &dir.join(files::PID),
            std::process::id().to_string().as_bytes(),
        )
        .expect("pid");
        match &runtime.scan()["sbx-6"].state {
            LocalState::Finished(r) => assert!(matches!(r.outcome, Outcome::Failed { .. })),
            other => panic!("{other:?}"),
        }
        assert!(!valid_sandbox_id("../etc"));
        assert!(valid_sandbox_id("sbx-0000000001"));
    }
}
