//! The command lines a shim starts and steers a sandbox with: the sandbox's environment,
//! `runsc run` (or `runsc restore`) on its OCI bundle or a plain process, runsc's global
//! flags, and the container id runsc knows the sandbox by.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::bundle;
use crate::cgroups::SandboxCgroup;
use crate::config::RuntimeKind;
use crate::launch::Launch;

/// The environment the sandbox's process gets: its resolved env plus berth's variables.
pub(crate) fn sandbox_env(launch: &Launch) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    env.extend(launch.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert("BERTH_SANDBOX_ID".into(), launch.sandbox_id.clone());
    // With no GPUs, an empty CUDA_VISIBLE_DEVICES hides every device from CUDA, and
    // "void" hides them from the NVIDIA container runtime.
    let gpus = launch.gpu_uuids.join(",");
    env.insert("CUDA_VISIBLE_DEVICES".into(), gpus.clone());
    env.insert(
        "NVIDIA_VISIBLE_DEVICES".into(),
        if gpus.is_empty() { "void".into() } else { gpus },
    );
    env
}

/// The command line that starts the sandbox under its runtime, on `root` (the merged image
/// root, or `None` for the host's).
pub(crate) fn sandbox_command(
    dir: &Path,
    launch: &Launch,
    root: Option<&Path>,
    cgroup: Option<&SandboxCgroup>,
    netns: Option<&Path>,
    restore: Option<&Path>,
) -> Result<Command, String> {
    let mut launch = launch.clone();
    launch.env = sandbox_env(&launch);
    let work = dir.join("work");
    fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    if launch.sandboxd_dir.is_some() {
        // The helper makes its socket here, as the sandbox's user.
        let run = dir.join(crate::sandboxd::RUN_DIR);
        fs::create_dir_all(&run).map_err(|e| format!("cannot create {}: {e}", run.display()))?;
        let _ = std::os::unix::fs::chown(&run, Some(launch.uid), Some(launch.gid));
    }
    // The process runtime runs the helper on the host, so only without an image root.
    let host_helper = match (&launch.sandboxd_dir, launch.runtime, root) {
        (Some(bin), RuntimeKind::Process, None) => Some(launch.under_helper(
            &bin.join(berth_sandboxd::BINARY).to_string_lossy(),
            &crate::sandboxd::socket(dir).to_string_lossy(),
        )),
        _ => None,
    };
    if let Some(argv) = host_helper {
        launch.command = argv;
    }
    let helper = launch.sandboxd_dir.is_some() && launch.runtime == RuntimeKind::Gvisor;
    if launch.command.is_empty() && !helper {
        return Err("the command is empty".into());
    }
    let (program, args) = launch
        .command
        .split_first()
        .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
    if launch.net.is_some() && launch.runtime == RuntimeKind::Process {
        return Err(
            "a network policy other than none needs the gvisor runtime: the process \
                    runtime does not isolate the network"
                .into(),
        );
    }
    let mut command = match launch.runtime {
        RuntimeKind::Process => match root {
            None => {
                let mut c = Command::new(program);
                c.args(args).current_dir(&work);
                c
            }
            Some(root) => {
                if !nix::unistd::geteuid().is_root() {
                    return Err(
                        "the process runtime runs image sandboxes with chroot, which \
                                needs the agent to run as root"
                            .into(),
                    );
                }
                // util-linux's unshare (no namespaces asked): chroot, then the working
                // directory inside the root, then the image's group and user (supplementary
                // groups dropped). chroot(1) would always land in `/`. It is found on the
                // shim's PATH: the command's own env (the image's PATH) names directories
                // inside the root.
                let unshare = crate::agent::find_program("unshare")
                    .or_else(|| crate::agent::find_program("/usr/bin/unshare"))
                    .ok_or("the process runtime needs unshare (util-linux) on the agent's PATH")?;
                let inside = launch.workdir.trim_start_matches('/');
                let workdir = if !inside.is_empty() && root.join(inside).is_dir() {
                    launch.workdir.as_str()
                } else {
                    "/"
                };
                let mut c = Command::new(unshare);
                c.arg(format!("--root={}", root.display()))
                    .arg(format!("--wd={workdir}"))
                    .arg(format!("--setgid={}", launch.gid))
                    .arg(format!("--setuid={}", launch.uid))
                    .arg("--")
                    .arg(program)
                    .args(args)
                    .current_dir(root);
                c
            }
        },
        RuntimeKind::Gvisor => {
            if root.is_none() {
                launch.workdir = "/tmp".into();
            }
            let bundle = bundle::write_config(
                dir,
                &launch,
                root.unwrap_or(Path::new("/")),
                root.is_none(),
                cgroup.map(SandboxCgroup::oci_path),
                netns,
            )?;
            let mut c = runsc_run_command(&launch)?;
            c.args(runsc_globals(dir, &launch, cgroup.is_some()))
                // An image root is a host overlay already: writes go straight to its upper
                // directory. The host's root gets gVisor's memory-backed overlay.
                .arg(if root.is_some() {
                    "--overlay2=none"
                } else {
                    "--overlay2=root:memory"
                });
            match restore {
                Some(image) => c
                    .arg("restore")
                    .arg(format!("--bundle={}", bundle.display()))
                    .arg(format!("--image-path={}", image.display())),
                None => c.arg("run").arg(format!("--bundle={}", bundle.display())),
            };
            c.arg(container_id(dir, &launch));
            c
        }
    };
    command.env_clear().stdin(Stdio::null());
    if launch.runtime == RuntimeKind::Process {
        command.envs(&launch.env);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so signals reach everything it starts.
        .process_group(0);
    Ok(command)
}

/// The command that runs `runsc run`. With a network, runsc's netstack must see through a
/// check that no longer holds: before it copies the namespace's interfaces, runsc (up to
/// at least 2022-12) calls a namespace the host's if `/proc/sys/net/core/rmem_default`
/// exists, which Linux now shows in every namespace. So `runsc run` gets a private mount
/// namespace with `/proc/sys/net` covered by an empty read-only tmpfs; runsc reads nothing
/// else there, and the sandbox itself never sees host /proc.
pub(crate) fn runsc_run_command(launch: &Launch) -> Result<Command, String> {
    if launch.net.is_none() {
        return Ok(Command::new(&launch.runsc_path));
    }
    let unshare = crate::agent::find_program("unshare")
        .or_else(|| crate::agent::find_program("/usr/bin/unshare"))
        .ok_or("sandbox networks need unshare (util-linux) on the agent's PATH")?;
    let mut c = Command::new(unshare);
    c.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(r#"mount -t tmpfs -o ro,size=4k berth-netcheck /proc/sys/net && exec "$0" "$@""#)
        .arg(&launch.runsc_path);
    Ok(c)
}

/// The sandbox's container id at runsc: its id and a hash of its directory. runsc names
/// its control socket after the container id in the abstract namespace, which every
/// agent on a host shares, so two clusters' (or nodes') `sbx-0000000001` must differ.
pub fn container_id(dir: &Path, launch: &Launch) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same directory gives the same id in every process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("{}-{:08x}", launch.sandbox_id, h.finish() as u32)
}

/// `runsc`'s global flags for this sandbox.
pub(crate) fn runsc_globals(dir: &Path, launch: &Launch, cgroups: bool) -> Vec<String> {
    let mut flags = vec![
        format!("--platform={}", launch.runsc_platform),
        format!("--root={}", dir.join("runsc").display()),
        // gVisor's own network stack, in the sandbox's namespace; never the host's.
        if launch.net.is_some() {
            "--network=sandbox".into()
        } else {
            "--network=none".into()
        },
    ];
    if launch.sandboxd_dir.is_some() {
        // The helper listens on a socket the host can reach; nothing in the sandbox may
        // open host sockets.
        flags.push("--host-uds=create".into());
    }
    if !cgroups {
        flags.push("--ignore-cgroups".into());
    }
    flags
}

/// Runs `runsc kill` (or `delete`) for the sandbox; errors are the shim's log's business.
pub(crate) fn runsc(dir: &Path, launch: &Launch, cgroups: bool, args: &[&str]) {
    let status = Command::new(&launch.runsc_path)
        .args(runsc_globals(dir, launch, cgroups))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status();
    if let Err(e) = status {
        eprintln!("runsc {args:?}: {e}");
    }
}

/// Whether runsc reports the sandbox running (its state file under `--root`).
pub(crate) fn runsc_running(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir.join("runsc")) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.file_name().to_string_lossy().ends_with(".state")
            && fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v["status"] == "running")
    })
}
