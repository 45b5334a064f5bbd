//! Standby: a gVisor sandbox frozen in place through the cgroup v1 freezer, and thawed.
//!
//! The sandbox's processes (runsc's sandbox process and its ptrace stubs, found from runsc's
//! state file under the sandbox's `runsc/` root) are moved into `freezer/berth/<cid>`, and
//! the group is set FROZEN: the kernel stops them where they are, their memory stays
//! resident, and they use no CPU. Thawing writes THAWED. Measured on this kind of host
//! (`berth bench resume`), either takes about 3 ms, against 30–50 ms for `runsc pause` and
//! `runsc resume` (a CLI call each). The gofer is left out: it only serves file calls, which
//! a frozen sandbox makes none of.
//!
//! The `standby` file in the sandbox's directory is the record that it is frozen: written
//! before the freeze and removed after the thaw, so an agent that restarts finds the
//! sandbox on standby (and the shim, which reads it, neither counts frozen time toward the
//! session limit nor takes it for idle). The group stays for the sandbox's life, its
//! processes in it thawed, so a second freeze has nothing to move; the shim removes it
//! when the sandbox ends.
//!
//! cgroup v2's `cgroup.freeze` is not wired: on a v2-only host a standby is refused with
//! the reason, and the scheduler takes the sandbox back to Running.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::runtime::{files, write_atomic};

/// Where the v1 freezer hierarchy is mounted.
const FREEZER: &str = "/sys/fs/cgroup/freezer";
/// Longest wait for the kernel to report a freezer state.
const SETTLE: Duration = Duration::from_secs(5);

/// Whether the sandbox in `dir` is on standby (frozen, or being frozen).
pub fn is_standby(dir: &Path) -> bool {
    dir.join(files::STANDBY).exists()
}

/// When the sandbox in `dir` was frozen (Unix ms), from its `standby` file.
pub fn frozen_since(dir: &Path) -> Option<u64> {
    fs::read_to_string(dir.join(files::STANDBY))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Freezes the sandbox in `dir`, known to runsc as `cid`.
pub fn freeze(dir: &Path, cid: &str, now_unix_ms: u64) -> Result<(), String> {
    let base = Path::new(FREEZER);
    if !base.join("cgroup.procs").exists() {
        return Err(format!(
            "standby needs the cgroup v1 freezer, and {FREEZER} is not mounted here \
             (cgroup v2's cgroup.freeze is not supported yet)"
        ));
    }
    let pid = sandbox_pid(dir)?;
    let group = group(cid);
    fs::create_dir_all(&group).map_err(|e| format!("{}: {e}", group.display()))?;
    write_atomic(
        &dir.join(files::STANDBY),
        now_unix_ms.to_string().as_bytes(),
    )
    .map_err(|e| format!("writing the standby record: {e}"))?;
    for p in process_tree(pid) {
        // A stub that exits meanwhile cannot be moved; it needs no freezing.
        let _ = fs::write(group.join("cgroup.procs"), p.to_string());
    }
    if let Err(e) = set_state(&group, "FROZEN") {
        let _ = set_state(&group, "THAWED");
        let _ = fs::remove_file(dir.join(files::STANDBY));
        return Err(e);
    }
    Ok(())
}

/// Thaws the sandbox in `dir` (a no-op when it is not frozen).
pub fn thaw(dir: &Path, cid: &str) -> Result<(), String> {
    let group = group(cid);
    if group.join("freezer.state").exists() {
        set_state(&group, "THAWED")?;
    }
    match fs::remove_file(dir.join(files::STANDBY)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing the standby record: {e}")),
    }
}

/// Removes the sandbox's freezer group once its processes are gone (best effort).
pub fn remove_group(cid: &str) {
    let _ = fs::remove_dir(group(cid));
}

fn group(cid: &str) -> PathBuf {
    Path::new(FREEZER).join("berth").join(cid)
}

/// The runsc sandbox process's pid, from its state file under `dir/runsc`.
fn sandbox_pid(dir: &Path) -> Result<u32, String> {
    let root = dir.join("runsc");
    let entries = fs::read_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".state") {
            continue;
        }
        let state: serde_json::Value = fs::read(e.path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(pid) = state["sandbox"]["pid"].as_u64().filter(|p| *p > 1) {
            return u32::try_from(pid).map_err(|_| format!("runsc state pid {pid}"));
        }
    }
    Err(format!(
        "no running gVisor sandbox under {} (standby needs the gvisor runtime)",
        root.display()
    ))
}

/// `pid` and its descendants, from /proc.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // The command name is in parentheses and may hold spaces: the parent pid is
            // the second field after the last ')'.
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((p, ppid))
        })
        .collect();
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// Writes `state` to a freezer group and waits until the kernel reports it there.
pub fn set_state(group: &Path, state: &str) -> Result<(), String> {
    let started = Instant::now();
    let file = group.join("freezer.state");
    fs::write(&file, state).map_err(|e| format!("{}: {e}", file.display()))?;
    loop {
        let now = fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if now.trim() == state {
            return Ok(());
        }
        if started.elapsed() > SETTLE {
            return Err(format!(
                "the freezer did not reach {state} in {} s (it reads {})",
                SETTLE.as_secs(),
                now.trim()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}
