//! The per-sandbox shim: `berth agent-shim DIR`, the berth binary itself, started by the
//! agent in its own process group and never waited on for the sandbox's sake.
//!
//! It assembles the sandbox's root (see [`crate::bundle`]), creates its cgroups
//! ([`crate::cgroups`]), starts it (a gVisor OCI bundle through `runsc run`, or a plain
//! process, chrooted into the image's root when there is one), writes `started` once the
//! runtime runs it, copies its stdout and stderr into files with a size cap, enforces the
//! timeout, obeys a `terminate` request, and finally writes `exit.json`. Because the shim,
//! not the agent, is the sandbox's parent, an agent can crash or restart while sandboxes
//! keep running (the containerd-shim pattern).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::bundle;
use crate::cgroups::{self, SandboxCgroup};
use crate::checkpoint::{self, PauseMode};
use crate::config::RuntimeKind;
use crate::freezer;
use crate::launch::Launch;
use crate::runtime::{ExitRecord, Outcome, files, read_exit, unix_ms, write_atomic};
use crate::shim_command::{container_id, runsc, runsc_globals, runsc_running, sandbox_command};

/// How long the shim waits after SIGTERM before SIGKILL when a timeout fires.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// How often the shim looks at the activity file for the idle limit.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// How often the shim looks at its child, the clock and the terminate file.
const SHIM_POLL: Duration = Duration::from_millis(25);

/// How the sandbox's run ended: for good, or paused to disk.
enum Ended {
    Outcome(Outcome),
    Paused {
        mode: PauseMode,
        /// Run time so far, toward the session limit.
        ran_ms: u64,
    },
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
    if read_exit(dir).is_some() {
        // Already decided (the agent recorded a failure before starting it).
        return 0;
    }
    if let Err(e) = write_atomic(
        &dir.join(files::PID),
        std::process::id().to_string().as_bytes(),
    ) {
        eprintln!("berth agent-shim: writing the pid file: {e}");
    }
    let stdout_truncated = Arc::new(AtomicBool::new(false));
    let stderr_truncated = Arc::new(AtomicBool::new(false));
    let outcome = match supervise(dir, &launch, &stdout_truncated, &stderr_truncated) {
        Ended::Paused { mode, ran_ms } => {
            return match checkpoint::record_paused(dir, mode, ran_ms) {
                Ok(r) => {
                    eprintln!("paused ({}, {} bytes)", mode.as_str(), r.bytes);
                    0
                }
                Err(e) => {
                    eprintln!("berth agent-shim: writing paused.json: {e}");
                    1
                }
            };
        }
        Ended::Outcome(outcome) => outcome,
    };
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
) -> Ended {
    let cgroup = match cgroups::detect() {
        Ok(h) => {
            if let Err(e) = cgroups::join_parent(&h) {
                eprintln!("could not join the berth cgroup: {e}");
            }
            let name = container_id(dir, launch);
            match SandboxCgroup::create(&h, &name, launch.cpu_milli, launch.memory_mib) {
                Ok(g) => Some(g),
                Err(e) => {
                    eprintln!("cgroups not writable ({e}); limits are not enforced");
                    None
                }
            }
        }
        Err(why) => {
            eprintln!("{why}");
            None
        }
    };
    let root = match &launch.rootfs {
        Some(lower) => match bundle::mount_rootfs(dir, lower) {
            Ok(root) => Some(root),
            Err(reason) => return Ended::Outcome(Outcome::Failed { reason }),
        },
        None => None,
    };
    let net = match &launch.net {
        Some(plan) => match crate::network::SandboxNet::create(plan, dir) {
            Ok(net) => Some(net),
            Err(why) => {
                if root.is_some() {
                    bundle::unmount_rootfs(dir);
                }
                return Ended::Outcome(Outcome::Failed {
                    reason: format!("could not set up the sandbox's network: {why}"),
                });
            }
        },
        None => None,
    };
    let outcome = run(
        dir,
        launch,
        root.as_deref(),
        cgroup.as_ref(),
        net.as_ref().map(|n| n.netns_path()).as_deref(),
        stdout_truncated,
        stderr_truncated,
    );
    if launch.runtime == RuntimeKind::Gvisor {
        runsc(
            dir,
            launch,
            cgroup.is_some(),
            &["delete", "--force", &container_id(dir, launch)],
        );
    }
    drop(net);
    if root.is_some() {
        bundle::unmount_rootfs(dir);
    }
    let oom = cgroup
        .as_ref()
        .filter(|g| g.oom_killed())
        .map(SandboxCgroup::memory_mib);
    drop(cgroup);
    let outcome = match outcome {
        Ended::Outcome(o) => o,
        paused => return paused,
    };
    Ended::Outcome(match (oom, outcome) {
        (_, Outcome::Failed { reason }) if reason.starts_with("terminated") => {
            Outcome::Failed { reason }
        }
        (Some(mib), _) => Outcome::Failed {
            reason: format!(
                "out of memory: the sandbox went over its memory limit of {mib} MiB and was killed"
            ),
        },
        (None, outcome) => outcome,
    })
}

fn run(
    dir: &Path,
    launch: &Launch,
    root: Option<&Path>,
    cgroup: Option<&SandboxCgroup>,
    netns: Option<&Path>,
    stdout_truncated: &Arc<AtomicBool>,
    stderr_truncated: &Arc<AtomicBool>,
) -> Ended {
    // Resuming a paused sandbox: from its memory image, or afresh on its kept files.
    let resuming = checkpoint::read_paused(dir);
    let image = dir.join(files::SNAPSHOT);
    let restore = resuming
        .as_ref()
        .filter(|r| r.mode == PauseMode::Memory && launch.runtime == RuntimeKind::Gvisor)
        .map(|_| image.as_path());
    if restore.is_some() {
        // What runsc kept of the checkpointed container.
        runsc(
            dir,
            launch,
            cgroup.is_some(),
            &["delete", "--force", &container_id(dir, launch)],
        );
    }
    let mut command = match sandbox_command(dir, launch, root, cgroup, netns, restore) {
        Ok(c) => c,
        Err(reason) => return Ended::Outcome(Outcome::Failed { reason }),
    };
    let ran_before = resuming.as_ref().map_or(0, |r| r.ran_ms);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = match (launch.runtime, root) {
                (RuntimeKind::Gvisor, _) => launch.runsc_path.as_str(),
                (RuntimeKind::Process, Some(_)) => "chroot",
                (RuntimeKind::Process, None) => launch.command[0].as_str(),
            };
            return Ended::Outcome(Outcome::Failed {
                reason: format!("could not start {what}: {e}"),
            });
        }
    };
    let gvisor = launch.runtime == RuntimeKind::Gvisor;
    if let (Some(group), false) = (cgroup, gvisor) {
        if let Err(e) = group.add(child.id()) {
            eprintln!("could not move the sandbox into its cgroup: {e}");
        }
    }
    let mut marked_started = false;
    let mark_started = || {
        let _ = write_atomic(&dir.join(files::STARTED), unix_ms().to_string().as_bytes());
    };
    if !gvisor {
        mark_started();
        marked_started = true;
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
    // Paused time does not count toward the session limit.
    let mut deadline = (launch.timeout_ms > 0)
        .then(|| started + Duration::from_millis(launch.timeout_ms.saturating_sub(ran_before)));
    let cgroups = cgroup.is_some();
    let pid = child.id();
    let stop = |sig: Signal| {
        signal_pid(pid, sig);
        if gvisor {
            let name = if sig == Signal::SIGKILL {
                "KILL"
            } else {
                "TERM"
            };
            runsc(
                dir,
                launch,
                cgroups,
                &["kill", "--all", &container_id(dir, launch), name],
            );
        }
    };
    // Once set: why it is being stopped, and when SIGKILL follows.
    let mut stopping: Option<(String, Instant)> = None;
    // Once set: it was paused to disk (its runtime is ending).
    let mut paused: Option<PauseMode> = None;
    // The idle limits count from the last call, paused time included.
    let started_unix_ms = resuming
        .as_ref()
        .map_or_else(unix_ms, |r| r.last_activity_unix_ms.max(r.taken_unix_ms));
    // Auto-pause counts from this run's start at the earliest: a resume is not idle time.
    let mut run_started_unix_ms = unix_ms();
    let mut resume_pending = resuming.is_some();
    let mut next_idle_check = started;
    // Whether an automatic pause was passed over for the snapshot budget (said once).
    let mut budget_warned = false;
    // On standby (frozen by the agent): time the session limit does not count.
    let mut was_frozen = false;
    let mut last_round = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
        let frozen = gvisor && freezer::is_standby(dir);
        let round = Instant::now();
        if frozen {
            if let Some(d) = deadline.as_mut() {
                *d += round.saturating_duration_since(last_round);
            }
        } else if was_frozen {
            // Thawed: a resume, which is not idle time for auto-pause.
            run_started_unix_ms = unix_ms();
        }
        was_frozen = frozen;
        last_round = round;
        if !marked_started && (!gvisor || runsc_running(dir)) {
            if resume_pending {
                // Restored: the helper listens again, and the pause record goes before
                // `started` appears, so the agent never sees a running sandbox as paused
                // (and refuse the next pause); the image goes after.
                checkpoint::wake_helper(dir);
                checkpoint::forget_pause(dir);
            }
            mark_started();
            marked_started = true;
            if resume_pending {
                resume_pending = false;
                checkpoint::resumed(dir);
            }
        }
        let now = Instant::now();
        match &stopping {
            Some((_, kill_at)) if now >= *kill_at => stop(Signal::SIGKILL),
            Some(_) => {}
            None if paused.is_some() => {}
            None if frozen => {
                // Frozen, it cannot be stopped or paused: to stop it (asked to, or idle past
                // its limit, which counts frozen time), it is thawed, and the next round
                // stops it.
                let idle_check = now >= next_idle_check;
                if idle_check {
                    next_idle_check = now + IDLE_CHECK;
                }
                let idle = launch.idle_timeout_ms > 0
                    && idle_check
                    && idle_past_limit(dir, launch.idle_timeout_ms, started_unix_ms).is_some();
                if idle || dir.join(files::TERMINATE).exists() {
                    if let Err(e) = freezer::thaw(dir, &container_id(dir, launch)) {
                        eprintln!("could not thaw the sandbox to stop it: {e}");
                    }
                }
            }
            None => {
                let idle_check = now >= next_idle_check;
                if idle_check {
                    next_idle_check = now + IDLE_CHECK;
                }
                let idle = (launch.idle_timeout_ms > 0 && idle_check)
                    .then(|| idle_past_limit(dir, launch.idle_timeout_ms, started_unix_ms))
                    .flatten();
                let auto_pause = launch.auto_pause_idle_ms > 0
                    && idle_check
                    && marked_started
                    && idle_past_limit(dir, launch.auto_pause_idle_ms, run_started_unix_ms)
                        .is_some()
                    && auto_pause_fits(dir, launch, &mut budget_warned);
                let pause = checkpoint::requested(dir)
                    .or(auto_pause.then_some(PauseMode::Memory))
                    .filter(|_| marked_started);
                if let Some(mode) = pause {
                    match pause_now(dir, launch, cgroups, mode) {
                        Ok(()) => {
                            if mode == PauseMode::FilesystemOnly {
                                stop(Signal::SIGKILL);
                            }
                            paused = Some(mode);
                        }
                        Err(why) => {
                            eprintln!("pause failed; the sandbox keeps running: {why}");
                            let _ = write_atomic(&dir.join(files::PAUSE_FAILED), why.as_bytes());
                            let _ = fs::remove_file(dir.join(files::PAUSE));
                            checkpoint::wake_helper(dir);
                        }
                    }
                } else if deadline.is_some_and(|d| now >= d) {
                    stop(Signal::SIGTERM);
                    stopping = Some((
                        format!(
                            "timed out: reached its session limit (timeout_ms = {})",
                            launch.timeout_ms
                        ),
                        now + TIMEOUT_GRACE,
                    ));
                } else if let Some(reason) = idle {
                    stop(Signal::SIGTERM);
                    stopping = Some((reason, now + TIMEOUT_GRACE));
                } else if let Some((grace, reason)) = read_terminate(dir) {
                    stop(Signal::SIGTERM);
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
    if gvisor {
        freezer::remove_group(&container_id(dir, launch));
    }
    for c in copiers {
        let _ = c.join();
    }
    if let Some(mode) = paused.filter(|_| stopping.is_none()) {
        let ran_ms = ran_before + started.elapsed().as_millis() as u64;
        return Ended::Paused { mode, ran_ms };
    }
    Ended::Outcome(match (status, stopping) {
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
    })
}

/// Gets the sandbox out of the way of its pause: the helper lets go of its socket, then
/// (memory mode) `runsc checkpoint` saves it and stops it. Filesystem-only, the caller
/// stops it; its write layer is what is kept.
fn pause_now(dir: &Path, launch: &Launch, cgroups: bool, mode: PauseMode) -> Result<(), String> {
    if launch.runtime != RuntimeKind::Gvisor {
        return Err("the process runtime cannot checkpoint a sandbox; pause needs gvisor".into());
    }
    let _ = fs::remove_file(dir.join(files::PAUSE_FAILED));
    let cut = checkpoint::quiesce_helper(dir)?;
    if cut > 0 {
        eprintln!("pausing: {cut} calls in flight were ended");
    }
    if mode == PauseMode::Memory {
        let globals = runsc_globals(dir, launch, cgroups);
        checkpoint::runsc_checkpoint(
            dir,
            &launch.runsc_path,
            &globals,
            &container_id(dir, launch),
        )?;
    }
    Ok(())
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

/// Why the sandbox is idle past its limit, if it is: no exec or file call (the agent's
/// `activity` file) since `idle_ms` ago, counting from its start.
/// Whether the node's snapshot budget has room for this sandbox's automatic pause (its
/// memory limit, as a checkpoint is about the memory in use); says so once when not, and
/// the sandbox runs on (its idle limit, if any, still ends it).
fn auto_pause_fits(dir: &Path, launch: &Launch, warned: &mut bool) -> bool {
    let need = launch.memory_mib.saturating_mul(1 << 20);
    let fits = checkpoint::fits_budget(dir, launch.snapshot_budget_bytes, need);
    if !fits && !*warned {
        eprintln!(
            "automatic pause not taken: the node's snapshots and this one ({need} bytes) would \
             pass [agent] snapshot_disk_budget_bytes ({}); the sandbox keeps running",
            launch.snapshot_budget_bytes
        );
        *warned = true;
    }
    fits
}

fn idle_past_limit(dir: &Path, idle_ms: u64, started_unix_ms: u64) -> Option<String> {
    let last = fs::read_to_string(dir.join(files::ACTIVITY))
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .max(started_unix_ms);
    let quiet = unix_ms().saturating_sub(last);
    (quiet >= idle_ms)
        .then(|| format!("idle: no exec or file call for {quiet} ms (idle_timeout_ms = {idle_ms})"))
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
    signal_pid(child.id(), sig);
}

fn signal_pid(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(pid as i32);
    let _ = killpg(pid, sig);
    let _ = kill(pid, sig);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::launch;

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
                reason: "timed out: reached its session limit (timeout_ms = 200)".into()
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
}
