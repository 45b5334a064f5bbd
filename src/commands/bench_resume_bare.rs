//! The baselines of `berth bench resume`, measured in the same run on a bare runsc
//! container (a busybox bundle, no berth): `runsc pause`/`resume`, freezing and thawing
//! its processes through the cgroup v1 freezer directly, and `runsc checkpoint`/`restore`
//! of the same memory size.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Times of one bare container's standby and checkpoint cycles.
pub(super) struct Bare {
    pub(super) runsc_pause: Vec<Duration>,
    pub(super) runsc_resume: Vec<Duration>,
    /// Empty when the freezer hierarchy is not mounted or writable.
    pub(super) freezer_thaw: Vec<Duration>,
    pub(super) freezer_freeze: Vec<Duration>,
    pub(super) checkpoint: Vec<Duration>,
    pub(super) restore: Vec<Duration>,
}

struct Container {
    root: PathBuf,
    bundle: PathBuf,
    id: String,
    /// runsc's stderr, and the container's (a detached container keeps it open, so it is
    /// never a pipe this process would wait on).
    log: PathBuf,
}

impl Container {
    fn runsc(&self) -> Command {
        let mut c = Command::new("runsc");
        c.arg(format!("--root={}", self.root.display()))
            .args(["--platform=ptrace", "--ignore-cgroups", "--network=none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
        {
            Ok(f) => c.stderr(f),
            Err(_) => c.stderr(Stdio::null()),
        };
        c
    }

    /// Runs `runsc <args> <id>` and times it.
    fn timed(&self, args: &[&str]) -> Result<Duration, String> {
        let started = Instant::now();
        let status = self
            .runsc()
            .args(args)
            .arg(&self.id)
            .status()
            .map_err(|e| format!("runsc {args:?}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "runsc {args:?} {}: {status} (see {})",
                self.id,
                self.log.display()
            ));
        }
        Ok(started.elapsed())
    }

    fn sandbox_pid(&self) -> Result<u32, String> {
        let out = self
            .runsc()
            .stdout(Stdio::piped())
            .args(["state", &self.id])
            .output()
            .map_err(|e| e.to_string())?;
        // `state` starts nothing that outlives it, so its piped stdout ends with it.
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        v["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| "runsc state has no pid".into())
    }
}

/// A busybox bundle whose process fills `/tmp` (gVisor memory) with `mib` MiB of random
/// bytes, then idles.
fn bundle(dir: &Path, mib: u64) -> Result<PathBuf, String> {
    let bundle = dir.join("bundle");
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(bundle.join("rootfs/tmp")).map_err(|e| e.to_string())?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .map_err(|e| format!("/bin/busybox (apt-get install busybox-static): {e}"))?;
    for link in ["sh", "head", "sleep", "touch"] {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(link));
    }
    // busybox's size suffixes are lower-case.
    let script = format!(
        "head -c {mib}m /dev/urandom > /tmp/blob && touch /tmp/ready; while true; do sleep 1; done"
    );
    let out = Command::new("runsc")
        .args(["spec", "--", "/bin/sh", "-c", &script])
        .current_dir(&bundle)
        .output()
        .map_err(|e| format!("runsc spec: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "runsc spec: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    v["root"]["readonly"] = false.into();
    v["process"]["terminal"] = false.into();
    std::fs::write(&path, v.to_string()).map_err(|e| e.to_string())?;
    Ok(bundle)
}

fn start(c: &Container) -> Result<(), String> {
    c.runsc()
        .arg("run")
        .arg("--detach")
        .arg(format!("--bundle={}", c.bundle.display()))
        .arg(&c.id)
        .status()
        .map_err(|e| e.to_string())
        .and_then(|s| s.success().then_some(()).ok_or(format!("runsc run: {s}")))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let ready = c
            .runsc()
            .args(["exec", &c.id, "/bin/sh", "-c", "test -f /tmp/ready"])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("the bare container never filled its memory".into())
}

/// Every process under `pid` (the sandbox and the ptrace stubs it started), `pid` first.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
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

/// Writes `state` to the freezer and waits until the kernel reports it.
fn set_freezer(group: &Path, state: &str) -> Result<Duration, String> {
    let started = Instant::now();
    std::fs::write(group.join("freezer.state"), state).map_err(|e| e.to_string())?;
    while std::fs::read_to_string(group.join("freezer.state"))
        .map_err(|e| e.to_string())?
        .trim()
        != state
    {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("the freezer did not reach {state}"));
        }
        std::thread::yield_now();
    }
    Ok(started.elapsed())
}

fn freezer_cycles(c: &Container, count: u32) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let base = Path::new("/sys/fs/cgroup/freezer");
    if !base.join("cgroup.procs").exists() {
        return Ok((Vec::new(), Vec::new()));
    }
    let group = base.join(format!("berth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&group).map_err(|e| format!("{}: {e}", group.display()))?;
    for pid in tree(c.sandbox_pid()?) {
        let _ = std::fs::write(group.join("cgroup.procs"), pid.to_string());
    }
    let (mut freeze, mut thaw) = (Vec::new(), Vec::new());
    for _ in 0..count {
        freeze.push(set_freezer(&group, "FROZEN")?);
        thaw.push(set_freezer(&group, "THAWED")?);
    }
    // Hand the processes back and remove the group.
    let procs = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines() {
        let _ = std::fs::write(base.join("cgroup.procs"), pid);
    }
    let _ = std::fs::remove_dir(&group);
    Ok((freeze, thaw))
}

/// Runs the bare baselines for a container of `mib` MiB: `count` standby cycles and
/// `restores` checkpoint/restore cycles.
pub(super) fn measure(dir: &Path, mib: u64, count: u32, restores: u32) -> Result<Bare, String> {
    let c = Container {
        root: dir.join("runsc"),
        bundle: bundle(dir, mib)?,
        id: format!("berth-bench-{}-{mib}", std::process::id()),
        log: dir.join("runsc.log"),
    };
    start(&c)?;
    let mut bare = Bare {
        runsc_pause: Vec::new(),
        runsc_resume: Vec::new(),
        freezer_thaw: Vec::new(),
        freezer_freeze: Vec::new(),
        checkpoint: Vec::new(),
        restore: Vec::new(),
    };
    let result = (|| {
        for _ in 0..count {
            bare.runsc_pause.push(c.timed(&["pause"])?);
            bare.runsc_resume.push(c.timed(&["resume"])?);
        }
        (bare.freezer_freeze, bare.freezer_thaw) = freezer_cycles(&c, count)?;
        let image = dir.join("image");
        let image_arg = format!("--image-path={}", image.display());
        let bundle_arg = format!("--bundle={}", c.bundle.display());
        for _ in 0..restores {
            let _ = std::fs::remove_dir_all(&image);
            bare.checkpoint.push(c.timed(&["checkpoint", &image_arg])?);
            c.timed(&["delete", "--force"])?;
            bare.restore
                .push(c.timed(&["restore", "--detach", &bundle_arg, &image_arg])?);
        }
        Ok::<(), String>(())
    })();
    let _ = c.timed(&["delete", "--force"]);
    result.map(|()| bare)
}
