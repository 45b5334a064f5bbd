//! Sandbox runtimes and the per-sandbox shim.
//!
//! Every sandbox runs under a **shim**: a small process (`berth agent-shim DIR`, the berth
//! binary itself) that the agent starts in its own process group and never waits on for
//! the sandbox's sake. The shim starts the sandbox (under gVisor's `runsc` or as a plain
//! process), copies its stdout and stderr into files with a size cap, enforces the timeout,
//! obeys a `terminate` request, and finally writes `exit.json`. Because the shim, not the
//! agent, is the sandbox's parent, an agent can crash or restart while sandboxes keep
//! running; the restarted agent finds them in its state directory and re-adopts them (the
//! containerd-shim pattern).
//!
//! One directory per sandbox under `<state_dir>/sandboxes/<id>/`:
//!
//! | file | written by | meaning |
//! |---|---|---|
//! | `launch.json` | agent, before the shim starts | what to run ([`Launch`]) |
//! | `shim.pid` | shim, first thing | the shim's pid, to tell whether it still runs |
//! | `stdout`, `stderr` | shim | captured output, at most `max_output_bytes` each |
//! | `terminate` | agent | "stop it": grace period in ms, then the reason |
//! | `exit.json` | shim, last thing | how it ended ([`ExitRecord`]) |
//! | `shim.log` | shim (its stderr) | the shim's own messages |
//!
//! Files are written atomically (write to a temporary name, then rename), so a reader sees
//! either nothing or the whole file.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::config::RuntimeKind;

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
}

/// How long the shim waits after SIGTERM before SIGKILL when a timeout fires.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// How often the shim looks at its child, the clock and the terminate file.
const SHIM_POLL: Duration = Duration::from_millis(25);
/// The PATH a sandbox sees.
const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the shim runs: everything it needs, so it depends on nothing else of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Node epoch the sandbox was assigned in.
    pub epoch: u64,
    /// argv.
    pub command: Vec<String>,
    /// Environment from the spec.
    pub env: BTreeMap<String, String>,
    /// UUIDs of the GPUs assigned to it, in order.
    pub gpu_uuids: Vec<String>,
    /// CPU limit.
    pub cpu_milli: u64,
    /// Memory limit.
    pub memory_mib: u64,
    /// Wall-clock limit; 0 for none.
    pub timeout_ms: u64,
    /// Whether it may use the network.
    pub network: bool,
    /// Runtime.
    pub runtime: RuntimeKind,
    /// `runsc` binary (gvisor runtime).
    pub runsc_path: String,
    /// `runsc --platform` value (gvisor runtime).
    pub runsc_platform: String,
    /// Cap on each of stdout and stderr, in bytes.
    pub max_output_bytes: u64,
}

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

/// What the agent finds in a sandbox directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalState {
    /// Its shim runs (or is just starting).
    Running,
    /// It ended.
    Finished(ExitRecord),
}

/// A sandbox this node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSandbox {
    /// What was launched.
    pub launch: Launch,
    /// Where it stands.
    pub state: LocalState,
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

/// Whether cgroup v2 is mounted at `/sys/fs/cgroup` with the cpu and memory controllers:
/// `Err` says why limits cannot be enforced.
pub fn cgroup_v2() -> Result<PathBuf, String> {
    let root = PathBuf::from("/sys/fs/cgroup");
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).map_err(|_| {
        "cgroup v2 is not mounted at /sys/fs/cgroup (this host uses cgroup v1 or a hybrid \
         layout); sandbox CPU and memory limits are not enforced"
            .to_owned()
    })?;
    for needed in ["cpu", "memory"] {
        if !controllers.split_whitespace().any(|c| c == needed) {
            return Err(format!(
                "the cgroup v2 {needed} controller is not available; sandbox CPU and memory \
                 limits are not enforced"
            ));
        }
    }
    Ok(root)
}

/// A cgroup v2 leaf holding one sandbox, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(root: &Path, id: &str, cpu_milli: u64, memory_mib: u64) -> io::Result<Cgroup> {
        let parent = root.join("berth");
        fs::create_dir_all(&parent)?;
        // Delegating controllers may already be done (or not permitted); the limit writes
        // below are what must succeed.
        let _ = fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
        let _ = fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
        let dir = parent.join(id);
        fs::create_dir_all(&dir)?;
        let group = Cgroup(dir);
        if cpu_milli > 0 {
            // Quota per 100 ms period: 1000 milli-CPU = 100,000 µs.
            fs::write(
                group.0.join("cpu.max"),
                format!("{} 100000", cpu_milli * 100),
            )?;
        }
        if memory_mib > 0 {
            fs::write(group.0.join("memory.max"), (memory_mib << 20).to_string())?;
        }
        Ok(group)
    }

    fn add(&self, pid: u32) -> io::Result<()> {
        fs::write(self.0.join("cgroup.procs"), pid.to_string())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// The command line that starts a sandbox under its runtime.
fn sandbox_command(launch: &Launch, work: &Path) -> Result<Command, String> {
    let Some((program, args)) = launch.command.split_first() else {
        return Err("the command is empty".into());
    };
    let mut command = match launch.runtime {
        RuntimeKind::Process => {
            let mut c = Command::new(program);
            c.args(args).current_dir(work);
            c
        }
        RuntimeKind::Gvisor => {
            let mut c = Command::new(&launch.runsc_path);
            // `runsc do` runs the command in a sandbox over a read-only view of the host's
            // root with a writable tmpfs overlay. Cgroups are handled around the shim.
            c.arg(format!("--platform={}", launch.runsc_platform))
                .arg(if launch.network {
                    "--network=host"
                } else {
                    "--network=none"
                })
                .arg("--ignore-cgroups")
                .arg(format!("--root={}", work.join("runsc").display()))
                .args(["do", "-quiet", "-cwd", "/tmp", "--"])
                .arg(program)
                .args(args);
            c
        }
    };
    let gpus = launch.gpu_uuids.join(",");
    command
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .envs(&launch.env)
        .env("BERTH_SANDBOX_ID", &launch.sandbox_id)
        // With no GPUs, an empty CUDA_VISIBLE_DEVICES hides every device from CUDA, and
        // "void" hides them from the NVIDIA container runtime.
        .env("CUDA_VISIBLE_DEVICES", &gpus)
        .env(
            "NVIDIA_VISIBLE_DEVICES",
            if gpus.is_empty() { "void" } else { &gpus },
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so signals reach everything it starts.
        .process_group(0);
    Ok(command)
}

/// Copies a pipe into a file, keeping at most `cap` bytes; sets `truncated` past the cap
/// and keeps draining so the sandbox never blocks on a full pipe.
fn capture(
    mut from: impl Read + Send + 'static,
    to: PathBuf,
    cap: u64,
    truncated: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(&to) else {
            eprintln!("cannot open {}", to.display());
            let _ = io::copy(&mut from, &mut io::sink());
            return;
        };
        let mut written = file.metadata().map_or(0, |m| m.len());
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let room = cap.saturating_sub(written) as usize;
            if room < n {
                truncated.store(true, Ordering::Relaxed);
            }
            let keep = n.min(room);
            if keep > 0 && file.write_all(&buf[..keep]).is_ok() {
                written += keep as u64;
            }
        }
    })
}

/// Reads a `terminate` file: grace in ms on the first line, the reason after it.
fn read_terminate(dir: &Path) -> Option<(Duration, String)> {
    let text = fs::read_to_string(dir.join(files::TERMINATE)).ok()?;
    let (grace, reason) = text.split_once('\n').unwrap_or((&text, ""));
    let grace = grace.trim().parse::<u64>().unwrap_or(10_000).min(600_000);
    Some((Duration::from_millis(grace), reason.trim().to_owned()))
}

/// Sends a signal to the child's process group (and the child, in case it left it).
fn signal(child: &Child, sig: Signal) {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = killpg(pid, sig);
    let _ = kill(pid, sig);
}

/// The shim's main: runs the sandbox in `dir` to completion and writes `exit.json`.
/// Returns the shim's process exit code (0 once a record is written).
pub fn run_shim(dir: &Path) -> i32 {
    let launch: Launch = match fs::read(dir.join(files::LAUNCH))
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "berth agent-shim: {}: {e}",
                dir.join(files::LAUNCH).display()
            );
            return 1;
        }
    };
    if let Err(e) = write_atomic(
        &dir.join(files::PID),
        std::process::id().to_string().as_bytes(),
    ) {
        eprintln!("berth agent-shim: writing the pid file: {e}");
    }
    let stdout_truncated = Arc::new(AtomicBool::new(false));
    let stderr_truncated = Arc::new(AtomicBool::new(false));
    let outcome = supervise(dir, &launch, &stdout_truncated, &stderr_truncated);
    let record = ExitRecord {
        outcome,
        finished_unix_ms: unix_ms(),
        stdout_truncated: stdout_truncated.load(Ordering::Relaxed),
        stderr_truncated: stderr_truncated.load(Ordering::Relaxed),
    };
    let bytes = serde_json::to_vec(&record).unwrap_or_default();
    match write_atomic(&dir.join(files::EXIT), &bytes) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("berth agent-shim: writing exit.json: {e}");
            1
        }
    }
}

fn supervise(
    dir: &Path,
    launch: &Launch,
    stdout_truncated: &Arc<AtomicBool>,
    stderr_truncated: &Arc<AtomicBool>,
) -> Outcome {
    let work = dir.join("work");
    if let Err(e) = fs::create_dir_all(&work) {
        return Outcome::Failed {
            reason: format!("cannot create {}: {e}", work.display()),
        };
    }
    let mut command = match sandbox_command(launch, &work) {
        Ok(c) => c,
        Err(reason) => return Outcome::Failed { reason },
    };
    let cgroup = match cgroup_v2() {
        Ok(root) => {
            match Cgroup::create(
                &root,
                &launch.sandbox_id,
                launch.cpu_milli,
                launch.memory_mib,
            ) {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!("cgroup v2 not writable ({e}); limits are not enforced");
                    None
                }
            }
        }
        Err(why) => {
            eprintln!("{why}");
            None
        }
    };
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = match launch.runtime {
                RuntimeKind::Gvisor => launch.runsc_path.as_str(),
                RuntimeKind::Process => launch.command[0].as_str(),
            };
            return Outcome::Failed {
                reason: format!("could not start {what}: {e}"),
            };
        }
    };
    if let Some(group) = &cgroup {
        if let Err(e) = group.add(child.id()) {
            eprintln!("could not move the sandbox into its cgroup: {e}");
        }
    }
    let cap = launch.max_output_bytes;
    let mut copiers = Vec::new();
    if let Some(out) = child.stdout.take() {
        copiers.push(capture(
            out,
            dir.join(files::STDOUT),
            cap,
            stdout_truncated.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        copiers.push(capture(
            err,
            dir.join(files::STDERR),
            cap,
            stderr_truncated.clone(),
        ));
    }
    let deadline =
        (launch.timeout_ms > 0).then(|| started + Duration::from_millis(launch.timeout_ms));
    // Once set: why it is being stopped, and when SIGKILL follows.
    let mut stopping: Option<(String, Instant)> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let now = Instant::now();
        match &stopping {
            Some((_, kill_at)) if now >= *kill_at => {
                signal(&child, Signal::SIGKILL);
            }
            Some(_) => {}
            None => {
                if deadline.is_some_and(|d| now >= d) {
                    signal(&child, Signal::SIGTERM);
                    stopping = Some((
                        format!("timed out after {} ms", launch.timeout_ms),
                        now + TIMEOUT_GRACE,
                    ));
                } else if let Some((grace, reason)) = read_terminate(dir) {
                    signal(&child, Signal::SIGTERM);
                    let reason = if reason.is_empty() {
                        "terminated".to_owned()
                    } else {
                        format!("terminated: {reason}")
                    };
                    stopping = Some((reason, now + grace));
                }
            }
        }
        thread::sleep(SHIM_POLL);
    };
    // Whatever is left of the group goes with it.
    signal(&child, Signal::SIGKILL);
    for c in copiers {
        let _ = c.join();
    }
    drop(cgroup);
    match (status, stopping) {
        (_, Some((reason, _))) => Outcome::Failed { reason },
        (Ok(status), None) => Outcome::Exited {
            code: status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(-1),
        },
        (Err(e), None) => Outcome::Failed {
            reason: format!("waiting for the sandbox: {e}"),
        },
    }
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
        let log = fs::File::create(dir.join(files::SHIM_LOG))?;
        let Some((program, args)) = self.shim.split_first() else {
            return Err(io::Error::other("no shim command configured"));
        };
        let mut shim = Command::new(program)
            .args(args)
            .arg(&dir)
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
        Ok(true)
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
        write_atomic(
            &dir.join(files::TERMINATE),
            format!("{}\n{reason}\n", grace.as_millis()).as_bytes(),
        )
    }

    /// Removes a finished sandbox's directory (its logs go with it).
    pub fn remove(&self, id: &str) -> io::Result<()> {
        if !valid_sandbox_id(id) {
            return Ok(());
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
            None if shim_alive(&dir) => LocalState::Running,
            None => {
                // Re-read: the shim may have finished between the two looks.
                match read_exit(&dir) {
                    Some(record) => LocalState::Finished(record),
                    None => {
                        let reason = "its shim exited without recording a result (the node \
                                      rebooted, or the shim was killed)"
                            .to_owned();
                        let record = ExitRecord {
                            outcome: Outcome::Failed { reason },
                            finished_unix_ms: unix_ms(),
                            stdout_truncated: false,
                            stderr_truncated: false,
                        };
                        // Record it, so later scans agree.
                        let _ = serde_json::to_vec(&record)
                            .map(|b| write_atomic(&dir.join(files::EXIT), &b));
                        LocalState::Finished(record)
                    }
                }
            }
        };
        Some(LocalSandbox { launch, state })
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
mod tests {
    use super::*;

    fn launch(id: &str, command: &[&str]) -> Launch {
        Launch {
            sandbox_id: id.into(),
            epoch: 1,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            gpu_uuids: vec!["GPU-a".into(), "GPU-b".into()],
            cpu_milli: 500,
            memory_mib: 256,
            timeout_ms: 0,
            network: false,
            runtime: RuntimeKind::Process,
            runsc_path: "runsc".into(),
            runsc_platform: "ptrace".into(),
            max_output_bytes: 4096,
        }
    }

    /// Runs the shim in-process (as `berth agent-shim` would) and returns its record.
    fn run(dir: &Path, l: &Launch) -> ExitRecord {
        fs::create_dir_all(dir).expect("dir");
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec(l).expect("json"),
        )
        .expect("launch");
        assert_eq!(run_shim(dir), 0);
        read_exit(dir).expect("exit.json")
    }

    #[test]
    fn the_shim_passes_gpus_and_env_and_reports_the_exit_code() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("sbx-1");
        let l = launch(
            "sbx-1",
            &[
                "sh",
                "-c",
                "echo $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES $GREETING $BERTH_SANDBOX_ID; echo oops >&2; exit 7",
            ],
        );
        let record = run(&dir, &l);
        assert_eq!(record.outcome, Outcome::Exited { code: 7 });
        assert_eq!(
            fs::read_to_string(dir.join(files::STDOUT)).expect("stdout"),
            "GPU-a,GPU-b GPU-a,GPU-b hello sbx-1\n"
        );
        assert_eq!(
            fs::read_to_string(dir.join(files::STDERR)).expect("stderr"),
            "oops\n"
        );
        assert!(!record.stdout_truncated);
    }

    #[test]
    fn output_is_capped_and_marked_truncated() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("sbx-2");
        let l = launch("sbx-2", &["sh", "-c", "head -c 100000 /dev/zero"]);
        let record = run(&dir, &l);
        assert_eq!(record.outcome, Outcome::Exited { code: 0 });
        assert!(record.stdout_truncated);
        assert_eq!(
            fs::metadata(dir.join(files::STDOUT)).expect("out").len(),
            4096
        );
    }

    #[test]
    fn a_timeout_kills_the_whole_process_group() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("sbx-3");
        let mut l = launch("sbx-3", &["sh", "-c", "sleep 30 & sleep 30"]);
        l.timeout_ms = 200;
        let started = Instant::now();
        let record = run(&dir, &l);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(
            record.outcome,
            Outcome::Failed {
                reason: "timed out after 200 ms".into()
            }
        );
    }

    #[test]
    fn a_missing_program_is_a_failure_that_names_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("sbx-4");
        let record = run(&dir, &launch("sbx-4", &["/nonexistent/program"]));
        match record.outcome {
            Outcome::Failed { reason } => {
                assert!(reason.contains("/nonexistent/program"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn terminate_stops_a_running_sandbox_and_scan_tracks_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        // The shim runs on a thread here; the runtime only reads the directory.
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["true".into()]).expect("rt");
        let l = launch("sbx-5", &["sleep", "30"]);
        let dir = runtime.dir("sbx-5");
        fs::create_dir_all(&dir).expect("dir");
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec(&l).expect("json"),
        )
        .expect("launch");
        // Launched, no pid file yet: starting, which counts as running.
        assert_eq!(runtime.scan()["sbx-5"].state, LocalState::Running);
        let shim = {
            let dir = dir.clone();
            thread::spawn(move || run_shim(&dir))
        };
        runtime
            .terminate("sbx-5", Duration::from_millis(100), "deleted")
            .expect("terminate");
        assert_eq!(shim.join().expect("shim"), 0);
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
        run(&dir, &launch("sbx-7", &["true"]));
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
    fn a_dead_shim_without_a_record_is_reported_failed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let runtime = Runtime::new(tmp.path().to_path_buf(), vec!["true".into()]).expect("rt");
        let dir = runtime.dir("sbx-6");
        fs::create_dir_all(&dir).expect("dir");
        write_atomic(
            &dir.join(files::LAUNCH),
            &serde_json::to_vec(&launch("sbx-6", &["true"])).expect("json"),
        )
        .expect("launch");
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
