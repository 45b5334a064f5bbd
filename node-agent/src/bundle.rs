//! A sandbox's root filesystem and its OCI bundle.
//!
//! **Write layer.** An image sandbox's root is a host overlayfs in its directory:
//! `fs/upper` over the image's cached rootfs (read-only, shared by every sandbox of the
//! image), merged at `fs/merged`. gVisor runs on it with `--overlay2=none`, so every write
//! the sandbox makes lands in `fs/upper` on the host: a checkpoint can carry it, and its
//! changes can be read as an OCI layer diff (overlayfs whiteouts are the OCI ones once
//! renamed), which gVisor's in-memory overlay would hide from the host. With no image, the
//! sandbox sees the host's root read-only under gVisor's memory-backed overlay (dev only).
//!
//! **Bundle.** `bundle/config.json` is an OCI runtime spec (oci-spec's types): the merged
//! root, the resolved process (argv, env, cwd, uid/gid), the default namespaces (the
//! network one being the sandbox's own from [`crate::network`] when it has a network), the sandbox's cgroups
//! path, and its CPU and memory limits. With the helper (`Launch::sandboxd_dir`), its
//! directory is bound read-only at `/.berth/bin`, the sandbox directory's `run/` at
//! `/.berth/run` (where the helper's socket is made), and the process is the helper
//! running the command.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResourcesBuilder, Mount, MountBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::launch::Launch;

/// Where a sandbox's root is assembled.
fn merged(dir: &Path) -> PathBuf {
    dir.join("fs/merged")
}

/// Mounts the sandbox's overlay over its image; returns the merged root.
pub fn mount_rootfs(dir: &Path, lower: &Path) -> Result<PathBuf, String> {
    let upper = dir.join("fs/upper");
    let work = dir.join("fs/work");
    let root = merged(dir);
    for d in [&upper, &work, &root] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| {
        format!(
            "mounting the sandbox's overlay at {} failed ({e}); image sandboxes need root \
             and overlayfs",
            root.display()
        )
    })?;
    Ok(root)
}

/// Unmounts the sandbox's overlay if it is mounted (its upper directory stays).
pub fn unmount_rootfs(dir: &Path) {
    let root = merged(dir);
    if root.exists() {
        let _ = nix::mount::umount2(&root, MntFlags::MNT_DETACH);
    }
}

/// Writes `bundle/config.json` for `launch` on `root`; returns the bundle directory.
pub fn write_config(
    dir: &Path,
    launch: &Launch,
    root: &Path,
    readonly: bool,
    cgroups_path: Option<String>,
    netns: Option<&Path>,
) -> Result<PathBuf, String> {
    let bundle = dir.join("bundle");
    fs::create_dir_all(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let spec = spec(dir, launch, root, readonly, cgroups_path, netns)
        .map_err(|e| format!("config.json: {e}"))?;
    spec.save(bundle.join("config.json"))
        .map_err(|e| format!("writing config.json: {e}"))?;
    Ok(bundle)
}

fn bind(source: &Path, destination: &str, readonly: bool) -> Result<Mount, oci_spec::OciSpecError> {
    let mut options = vec!["rbind".to_owned()];
    if readonly {
        options.push("ro".into());
    }
    MountBuilder::default()
        .destination(destination)
        .typ("bind")
        .source(source)
        .options(options)
        .build()
}

fn spec(
    dir: &Path,
    launch: &Launch,
    root: &Path,
    readonly: bool,
    cgroups_path: Option<String>,
    netns: Option<&Path>,
) -> Result<Spec, oci_spec::OciSpecError> {
    let mut spec = Spec::default();
    let mut args = launch.command.clone();
    if let Some(bin) = &launch.sandboxd_dir {
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(bind(bin, berth_sandboxd::BIN_DIR, true)?);
        mounts.push(bind(
            &dir.join(crate::sandboxd::RUN_DIR),
            berth_sandboxd::RUN_DIR,
            false,
        )?);
        spec.set_mounts(Some(mounts));
        args = launch.under_helper(
            &format!("{}/{}", berth_sandboxd::BIN_DIR, berth_sandboxd::BINARY),
            &format!("{}/{}", berth_sandboxd::RUN_DIR, berth_sandboxd::SOCKET),
        );
    }
    spec.set_root(Some(
        RootBuilder::default()
            .path(root)
            .readonly(readonly)
            .build()?,
    ));
    spec.set_hostname(Some("sandbox".into()));
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(args));
    process.set_env(Some(
        launch.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    ));
    process.set_cwd(PathBuf::from(if launch.workdir.is_empty() {
        "/"
    } else {
        &launch.workdir
    }));
    process.set_user(
        UserBuilder::default()
            .uid(launch.uid)
            .gid(launch.gid)
            .build()?,
    );
    process.set_no_new_privileges(Some(true));
    spec.set_process(Some(process));
    let mut linux = spec.linux().clone().unwrap_or_default();
    if let Some(path) = netns {
        // The sandbox's own namespace, made by the shim, instead of a new empty one.
        let mut namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(path.to_path_buf())
                .build()?,
        );
        linux.set_namespaces(Some(namespaces));
    }
    let mut resources = LinuxResourcesBuilder::default();
    if launch.memory_mib > 0 {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit((launch.memory_mib << 20) as i64)
                .build()?,
        );
    }
    if launch.cpu_milli > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota((launch.cpu_milli * 100) as i64)
                .period(100_000u64)
                .shares((launch.cpu_milli * 1024 / 1000).max(2))
                .build()?,
        );
    }
    linux.set_resources(Some(resources.build()?));
    linux.set_cgroups_path(cgroups_path.map(PathBuf::from));
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeKind;
    use std::collections::BTreeMap;

    #[test]
    fn the_bundle_carries_the_process_limits_and_namespaces() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut launch = Launch {
            sandbox_id: "sbx-1".into(),
            epoch: 1,
            command: vec!["sh".into(), "-c".into(), "true".into()],
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            image: "127.0.0.1:5000/busybox:1".into(),
            image_digest: String::new(),
            rootfs: None,
            workdir: "/work".into(),
            uid: 1000,
            gid: 1000,
            gpu_uuids: vec![],
            cpu_milli: 250,
            memory_mib: 64,
            timeout_ms: 0,
            net: None,
            runtime: RuntimeKind::Gvisor,
            runsc_path: "runsc".into(),
            runsc_platform: "ptrace".into(),
            max_output_bytes: 4096,
            sandboxd_dir: None,
            keep_alive: false,
            idle_timeout_ms: 0,
            auto_pause_idle_ms: 0,
            snapshot_budget_bytes: 0,
        };
        let bundle = write_config(
            tmp.path(),
            &launch,
            Path::new("/r"),
            false,
            Some("/berth/sbx-1".into()),
            None,
        )
        .expect("config");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        assert_eq!(json["root"]["path"], "/r");
        assert_eq!(json["process"]["args"][2], "true");
        assert_eq!(json["process"]["env"][0], "A=1");
        assert_eq!(json["process"]["cwd"], "/work");
        assert_eq!(json["process"]["user"]["uid"], 1000);
        assert_eq!(json["linux"]["cgroupsPath"], "/berth/sbx-1");
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 25_000);
        // Exactly one network namespace, at `path` or new.
        let has_netns = |j: &serde_json::Value, path: Option<&str>| {
            let nets: Vec<&serde_json::Value> = j["linux"]["namespaces"]
                .as_array()
                .expect("namespaces")
                .iter()
                .filter(|n| n["type"] == "network")
                .collect();
            nets.len() == 1 && nets[0]["path"].as_str() == path
        };
        assert!(has_netns(&json, None));
        launch.command = vec!["true".into()];
        let netns = Path::new("/run/netns/berth-3");
        let bundle = write_config(
            tmp.path(),
            &launch,
            Path::new("/r"),
            true,
            None,
            Some(netns),
        )
        .expect("config");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(bundle.join("config.json")).expect("read"))
                .expect("json");
        assert!(has_netns(&json, Some("/run/netns/berth-3")));
        assert_eq!(json["root"]["readonly"], true);
    }
}
