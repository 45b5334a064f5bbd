//! CPU and memory limits for sandboxes, on cgroup v1 (this kind of host) and v2.
//!
//! Every sandbox gets `berth/<id>` in the cpu and memory hierarchies (one directory under
//! the unified hierarchy on v2), created by the shim before the sandbox starts and removed
//! after it ends: `memory.limit_in_bytes` / `memory.max` from the spec's memory, a CFS quota
//! from its milli-CPU, and CPU shares in proportion. gVisor's `runsc` is given the same
//! path as the OCI `cgroupsPath`, finds the directories there (so it does not own them and
//! leaves them behind for the shim to read the OOM count), and puts the sandbox in them; the
//! `process` runtime moves its child in itself.
//!
//! The shim itself, and the `runsc` processes that boot a sandbox, run in the parent
//! `berth` group, whose CPU weight is one ordinary task's: a burst of sandbox starts
//! competes with the agent and the scheduler as one task would, not as hundreds.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
/// The parent group's CPU weight (v1 shares; 1024 is one nice-0 task).
const PARENT_SHARES: u64 = 1024;

/// Which cgroup layout the host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Separate `cpu` and `memory` hierarchies under `/sys/fs/cgroup`.
    V1,
    /// The unified hierarchy at `/sys/fs/cgroup` with the cpu and memory controllers.
    V2,
}

/// The host's layout, or why limits cannot be enforced here.
pub fn detect() -> Result<Hierarchy, String> {
    let root = Path::new(ROOT);
    if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        return if has("cpu") && has("memory") {
            Ok(Hierarchy::V2)
        } else {
            Err(
                "cgroup v2 lacks the cpu or memory controller; sandbox limits are not enforced"
                    .into(),
            )
        };
    }
    if root.join("memory/memory.limit_in_bytes").exists() && root.join("cpu/cpu.shares").exists() {
        return Ok(Hierarchy::V1);
    }
    Err(
        "no cgroup cpu and memory controllers are mounted at /sys/fs/cgroup; sandbox limits \
         are not enforced"
            .into(),
    )
}

/// Checks that this process may create sandbox groups (it must be root, or own `berth`).
pub fn writable(h: &Hierarchy) -> Result<(), String> {
    let parents = parent_dirs(h);
    for p in &parents {
        fs::create_dir_all(p).map_err(|e| {
            format!(
                "cannot create {} ({e}); sandbox CPU and memory limits are not enforced",
                p.display()
            )
        })?;
    }
    Ok(())
}

fn parent_dirs(h: &Hierarchy) -> Vec<PathBuf> {
    match h {
        Hierarchy::V1 => vec![
            Path::new(ROOT).join("cpu/berth"),
            Path::new(ROOT).join("memory/berth"),
        ],
        Hierarchy::V2 => vec![Path::new(ROOT).join("berth")],
    }
}

/// Moves the calling process (the shim) into the parent `berth` group for CPU.
pub fn join_parent(h: &Hierarchy) -> io::Result<()> {
    match h {
        Hierarchy::V1 => {
            let dir = Path::new(ROOT).join("cpu/berth");
            fs::create_dir_all(&dir)?;
            let _ = fs::write(dir.join("cpu.shares"), PARENT_SHARES.to_string());
            fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        }
        Hierarchy::V2 => {
            // No processes in an inner node on v2: shims get a leaf of their own.
            let parent = v2_parent()?;
            let shims = parent.join("shims");
            fs::create_dir_all(&shims)?;
            fs::write(shims.join("cgroup.procs"), std::process::id().to_string())
        }
    }
}

/// `berth/` under the v2 root with the cpu and memory controllers enabled for its children
/// (best effort: a controller the host does not delegate is simply not limited).
fn v2_parent() -> io::Result<PathBuf> {
    let parent = Path::new(ROOT).join("berth");
    fs::create_dir_all(&parent)?;
    let _ = fs::write(
        Path::new(ROOT).join("cgroup.subtree_control"),
        "+cpu +memory",
    );
    let _ = fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory");
    Ok(parent)
}

/// A sandbox's CPU time so far (nanoseconds) and memory charged now (bytes), from its
/// groups `berth/<name>`: two small reads, no process spawned. `None` when the groups are
/// not there (the sandbox has ended, or cgroups are not writable here).
pub fn read_usage(h: &Hierarchy, name: &str) -> Option<(u64, u64)> {
    let read = |path: PathBuf| fs::read_to_string(path).ok();
    match h {
        Hierarchy::V1 => {
            let cpu = read(
                Path::new(ROOT)
                    .join("cpuacct/berth")
                    .join(name)
                    .join("cpuacct.usage"),
            )?;
            let mem = read(
                Path::new(ROOT)
                    .join("memory/berth")
                    .join(name)
                    .join("memory.usage_in_bytes"),
            )?;
            Some((cpu.trim().parse().ok()?, mem.trim().parse().ok()?))
        }
        Hierarchy::V2 => {
            let dir = Path::new(ROOT).join("berth").join(name);
            let stat = read(dir.join("cpu.stat"))?;
            let usec: u64 = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?;
            let mem = read(dir.join("memory.current"))?;
            Some((usec.saturating_mul(1_000), mem.trim().parse().ok()?))
        }
    }
}

/// One sandbox's groups; removed on drop.
#[derive(Debug)]
pub struct SandboxCgroup {
    hierarchy: Hierarchy,
    id: String,
    dirs: Vec<PathBuf>,
    memory_mib: u64,
}

impl SandboxCgroup {
    /// Creates `berth/<id>` with the limits (0 = none).
    pub fn create(h: &Hierarchy, id: &str, cpu_milli: u64, memory_mib: u64) -> io::Result<Self> {
        let mut group = SandboxCgroup {
            hierarchy: h.clone(),
            id: id.to_owned(),
            dirs: Vec::new(),
            memory_mib,
        };
        match h {
            Hierarchy::V1 => {
                let cpu = Path::new(ROOT).join("cpu/berth").join(id);
                let memory = Path::new(ROOT).join("memory/berth").join(id);
                fs::create_dir_all(&cpu)?;
                group.dirs.push(cpu.clone());
                fs::create_dir_all(&memory)?;
                group.dirs.push(memory.clone());
                // Where usage is read (the same directory as cpu's where they share a
                // mount); best effort, as only usage depends on it.
                let cpuacct = Path::new(ROOT).join("cpuacct/berth").join(id);
                if cpuacct != cpu && fs::create_dir_all(&cpuacct).is_ok() {
                    group.dirs.push(cpuacct);
                }
                if cpu_milli > 0 {
                    fs::write(cpu.join("cpu.cfs_period_us"), "100000")?;
                    fs::write(cpu.join("cpu.cfs_quota_us"), (cpu_milli * 100).to_string())?;
                    fs::write(
                        cpu.join("cpu.shares"),
                        (cpu_milli * 1024 / 1000).max(2).to_string(),
                    )?;
                }
                if memory_mib > 0 {
                    fs::write(
                        memory.join("memory.limit_in_bytes"),
                        (memory_mib << 20).to_string(),
                    )?;
                }
            }
            Hierarchy::V2 => {
                let dir = v2_parent()?.join(id);
                fs::create_dir_all(&dir)?;
                group.dirs.push(dir.clone());
                if cpu_milli > 0 {
                    fs::write(dir.join("cpu.max"), format!("{} 100000", cpu_milli * 100))?;
                }
                if memory_mib > 0 {
                    fs::write(dir.join("memory.max"), (memory_mib << 20).to_string())?;
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                }
            }
        }
        Ok(group)
    }

    /// The OCI `linux.cgroupsPath` naming these groups.
    pub fn oci_path(&self) -> String {
        format!("/berth/{}", self.id)
    }

    /// Moves a process in (the `process` runtime; runsc does this itself).
    pub fn add(&self, pid: u32) -> io::Result<()> {
        for dir in &self.dirs {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer acted in this group.
    pub fn oom_killed(&self) -> bool {
        let (dir, file) = match self.hierarchy {
            Hierarchy::V1 => (self.dirs.get(1), "memory.oom_control"),
            Hierarchy::V2 => (self.dirs.first(), "memory.events"),
        };
        let Some(text) = dir.and_then(|d| fs::read_to_string(d.join(file)).ok()) else {
            return false;
        };
        text.lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0)
    }

    /// The memory limit, for messages.
    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // runsc may have left its own sub-groups (none today); take them first.
            if let Ok(entries) = fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = fs::remove_dir(e.path());
                    }
                }
            }
            let _ = fs::remove_dir(dir);
        }
    }
}
