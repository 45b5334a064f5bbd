//! What the shim runs ([`Launch`], the sandbox directory's `launch.json`), and how an
//! assignment and its image's config become one: the image's entrypoint, cmd, env, working
//! directory and user are used where the spec leaves them out, as OCI runtimes do.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::RuntimeKind;
use crate::image::Image;

/// The PATH a sandbox sees when its image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the shim runs: everything it needs, so it depends on nothing else of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Node epoch the sandbox was assigned in.
    pub epoch: u64,
    /// argv, resolved (the image's entrypoint, then the spec's command or the image's cmd).
    pub command: Vec<String>,
    /// Environment, resolved (the image's, overridden by the spec's).
    pub env: BTreeMap<String, String>,
    /// The image reference as the spec gave it; empty runs on the host's root, read-only.
    #[serde(default)]
    pub image: String,
    /// Its manifest digest.
    #[serde(default)]
    pub image_digest: String,
    /// The image's read-only root filesystem in the node's cache.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Working directory inside the sandbox; empty for the runtime's default.
    #[serde(default)]
    pub workdir: String,
    /// User and group ids the command runs as.
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// UUIDs of the GPUs assigned to it, in order.
    pub gpu_uuids: Vec<String>,
    /// CPU limit.
    pub cpu_milli: u64,
    /// Memory limit.
    pub memory_mib: u64,
    /// Wall-clock limit; 0 for none.
    pub timeout_ms: u64,
    /// Its network beyond loopback, made by the shim; `None` for loopback only.
    #[serde(default)]
    pub net: Option<crate::network::NetPlan>,
    /// Runtime.
    pub runtime: RuntimeKind,
    /// `runsc` binary (gvisor runtime).
    pub runsc_path: String,
    /// `runsc --platform` value (gvisor runtime).
    pub runsc_platform: String,
    /// Cap on each of stdout and stderr, in bytes.
    pub max_output_bytes: u64,
    /// The helper's directory (`<state_dir>/bin`), mounted read-only at `/.berth/bin`; the
    /// helper is then the sandbox's first process and serves exec and file calls. `None`
    /// runs the command directly, with no calls into the sandbox.
    #[serde(default)]
    pub sandboxd_dir: Option<PathBuf>,
    /// Stay up after the command ends (or run none) until stopped or a limit ends it.
    #[serde(default)]
    pub keep_alive: bool,
    /// End it after this long without an exec or file call; 0 for none.
    #[serde(default)]
    pub idle_timeout_ms: u64,
    /// Pause it to disk after this long without an exec or file call; 0 for never.
    #[serde(default)]
    pub auto_pause_idle_ms: u64,
    /// The node's snapshot disk budget (`[agent] snapshot_disk_budget_bytes`; 0 = none):
    /// an automatic pause that would go past it is not taken, and the sandbox runs on.
    #[serde(default)]
    pub snapshot_budget_bytes: u64,
}

impl Launch {
    /// The argv that starts the sandbox under berth-sandboxd (at `helper`, listening on
    /// `socket`), which then runs the command (if any).
    pub fn under_helper(&self, helper: &str, socket: &str) -> Vec<String> {
        let mut argv = vec![
            helper.to_owned(),
            "init".into(),
            "--socket".into(),
            socket.to_owned(),
        ];
        if self.keep_alive {
            argv.push("--keep-alive".into());
        }
        argv.push("--".into());
        argv.extend(self.command.iter().cloned());
        argv
    }
}

/// The process a sandbox runs, from its spec and its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// argv.
    pub argv: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (empty: the runtime's default).
    pub workdir: String,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

/// Combines a spec's command and env with its image's config. `Err` says why it cannot run.
pub fn resolve(
    command: &[String],
    env: &BTreeMap<String, String>,
    image: Option<&Image>,
) -> Result<Process, String> {
    let Some(image) = image else {
        if command.is_empty() {
            return Err("the command is empty and there is no image to take one from".into());
        }
        let mut all = BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned())]);
        all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        return Ok(Process {
            argv: command.to_vec(),
            env: all,
            workdir: String::new(),
            uid: 0,
            gid: 0,
        });
    };
    let p = &image.process;
    let mut argv = p.entrypoint.clone();
    argv.extend(if command.is_empty() {
        p.cmd.clone()
    } else {
        command.to_vec()
    });
    if argv.is_empty() {
        return Err("the image has no entrypoint or cmd, and the spec gives no command".to_owned());
    }
    let mut all = BTreeMap::new();
    for kv in &p.env {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        all.insert(k.to_owned(), v.to_owned());
    }
    all.entry("PATH".to_owned())
        .or_insert_with(|| DEFAULT_PATH.to_owned());
    all.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let (uid, gid) = user_ids(&image.rootfs, &p.user)?;
    let workdir = if p.working_dir.is_empty() {
        "/".to_owned()
    } else {
        p.working_dir.clone()
    };
    Ok(Process {
        argv,
        env: all,
        workdir,
        uid,
        gid,
    })
}

/// `user`, `uid`, `user:group` or `uid:gid`, looked up in the image's `/etc/passwd` and
/// `/etc/group` where it is a name.
fn user_ids(rootfs: &Path, user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str, field: usize| -> Option<(u32, Option<u32>)> {
        let text = fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|line| {
            let parts: Vec<&str> = line.split(':').collect();
            (parts.first() == Some(&name)).then(|| {
                let id = parts.get(field).and_then(|s| s.parse().ok());
                let primary = parts.get(3).and_then(|s| s.parse().ok());
                id.map(|id| (id, primary))
            })?
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, lookup_primary(rootfs, n)),
        Err(_) => lookup("etc/passwd", u, 2)
            .ok_or_else(|| format!("the image's user {u:?} is not in its /etc/passwd"))?,
    };
    let gid = match g {
        None => primary.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("etc/group", g, 2)
                .map(|(id, _)| id)
                .ok_or_else(|| format!("the image's group {g:?} is not in its /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

fn lookup_primary(rootfs: &Path, uid: u32) -> Option<u32> {
    let text = fs::read_to_string(rootfs.join("etc/passwd")).ok()?;
    text.lines().find_map(|line| {
        let parts: Vec<&str> = line.split(':').collect();
        (parts.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| parts.get(3)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageProcess;

    fn image(rootfs: &Path, process: ImageProcess) -> Image {
        Image {
            digest: "sha256:00".into(),
            rootfs: rootfs.to_path_buf(),
            process,
        }
    }

    #[test]
    fn the_spec_overrides_cmd_but_keeps_the_entrypoint_and_env_layers() {
        let tmp = tempfile::tempdir().expect("tmp");
        fs::create_dir_all(tmp.path().join("etc")).expect("etc");
        fs::write(
            tmp.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nsandbox:x:1000:1001::/home:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(tmp.path().join("etc/group"), "staff:x:50:\n").expect("group");
        let img = image(
            tmp.path(),
            ImageProcess {
                entrypoint: vec!["/bin/tini".into(), "--".into()],
                cmd: vec!["python".into()],
                env: vec!["PATH=/opt/bin".into(), "LANG=C".into()],
                working_dir: "/work".into(),
                user: "sandbox".into(),
            },
        );
        let env = BTreeMap::from([("LANG".to_string(), "C.UTF-8".to_string())]);
        let p = resolve(&[], &env, Some(&img)).expect("image defaults");
        assert_eq!(p.argv, ["/bin/tini", "--", "python"]);
        assert_eq!(p.env["PATH"], "/opt/bin");
        assert_eq!(p.env["LANG"], "C.UTF-8");
        assert_eq!((p.workdir.as_str(), p.uid, p.gid), ("/work", 1000, 1001));
        let p = resolve(&["sh".into()], &BTreeMap::new(), Some(&img)).expect("override");
        assert_eq!(p.argv, ["/bin/tini", "--", "sh"]);
        let mut named = img.clone();
        named.process.user = "1000:staff".into();
        let p = resolve(&[], &BTreeMap::new(), Some(&named)).expect("uid:group");
        assert_eq!((p.uid, p.gid), (1000, 50));
        named.process.user = "nobody".into();
        let err = resolve(&[], &BTreeMap::new(), Some(&named)).expect_err("unknown user");
        assert!(err.contains("nobody"), "{err}");
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let img = image(tmp.path(), ImageProcess::default());
        assert!(resolve(&[], &BTreeMap::new(), Some(&img)).is_err());
        assert!(resolve(&[], &BTreeMap::new(), None).is_err());
        let p = resolve(&["true".into()], &BTreeMap::new(), None).expect("host");
        assert_eq!(p.env["PATH"], DEFAULT_PATH);
    }
}
