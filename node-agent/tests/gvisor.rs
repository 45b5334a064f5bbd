//! Sandboxes from real images under gVisor: `runsc run` on an OCI bundle whose root is a
//! host overlay over the cached image, with cgroup limits (v1 on this kind of host); and the
//! process runtime's chroot into the same overlay. Needs root, overlayfs and `runsc`
//! (scripts/test installs it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use berth_node_agent::config::RuntimeKind;
use berth_node_agent::image::testing::{self, TestRegistry};
use berth_node_agent::image::{ImageProcess, ImageSettings, ImageStore, RegistryConfig};
use berth_node_agent::launch::{self, Launch};
use berth_node_agent::metrics::AgentMetrics;
use berth_node_agent::runtime::{Outcome, files, read_exit, write_atomic};

struct Fixture {
    registry: TestRegistry,
    images: ImageStore,
    dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let registry = TestRegistry::start().expect("registry");
    let dir = tempfile::tempdir().expect("tmp");
    let images = ImageStore::open(
        ImageSettings {
            dir: dir.path().join("images"),
            max_bytes: 1 << 30,
            max_concurrent_pulls: 2,
            registries: vec![RegistryConfig {
                host: registry.address.clone(),
                insecure: true,
                ..RegistryConfig::default()
            }],
        },
        Arc::new(AgentMetrics::new()),
    )
    .expect("store");
    Fixture {
        registry,
        images,
        dir,
    }
}

/// Pulls `reference`, resolves `command` against it and runs the shim to the end.
async fn run(
    f: &Fixture,
    id: &str,
    reference: &str,
    command: &[&str],
    memory_mib: u64,
    runtime: RuntimeKind,
) -> (Outcome, String, std::path::PathBuf) {
    let image = f.images.ensure(reference, id).await.expect("pull");
    let command: Vec<String> = command.iter().map(|s| s.to_string()).collect();
    let process = launch::resolve(&command, &BTreeMap::new(), Some(&image)).expect("resolve");
    let launch = Launch {
        sandbox_id: id.into(),
        epoch: 1,
        command: process.argv,
        env: process.env,
        image: reference.into(),
        image_digest: image.digest.clone(),
        rootfs: Some(image.rootfs.clone()),
        workdir: process.workdir,
        uid: process.uid,
        gid: process.gid,
        gpu_uuids: vec![],
        cpu_milli: 500,
        memory_mib,
        timeout_ms: 60_000,
        net: None,
        runtime,
        runsc_path: "runsc".into(),
        runsc_platform: "ptrace".into(),
        max_output_bytes: 1 << 20,
        sandboxd_dir: None,
        keep_alive: false,
        idle_timeout_ms: 0,
        auto_pause_idle_ms: 0,
        snapshot_budget_bytes: 0,
    };
    let dir = f.dir.path().join("sandboxes").join(id);
    std::fs::create_dir_all(&dir).expect("dir");
    write_atomic(
        &dir.join(files::LAUNCH),
        &serde_json::to_vec(&launch).expect("json"),
    )
    .expect("launch");
    let shim_dir = dir.clone();
    let code = tokio::task::spawn_blocking(move || berth_node_agent::shim::run_shim(&shim_dir))
        .await
        .expect("shim");
    assert_eq!(code, 0);
    let out = std::fs::read_to_string(dir.join(files::STDOUT)).unwrap_or_default();
    let record = read_exit(&dir).expect("exit.json");
    let log = std::fs::read_to_string(dir.join(files::SHIM_LOG)).unwrap_or_default();
    let err = std::fs::read_to_string(dir.join(files::STDERR)).unwrap_or_default();
    eprintln!("stderr: {err}\nshim log: {log}");
    (record.outcome, out, dir)
}

async fn busybox(f: &Fixture, user: &str) -> String {
    let reference = format!(
        "{}/busybox-{}:1",
        f.registry.address,
        if user.is_empty() { "root" } else { user }
    );
    let process = ImageProcess {
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "echo FROM_IMAGE=$FROM_IMAGE; pwd; id -u".into(),
        ],
        env: vec!["PATH=/bin".into(), "FROM_IMAGE=yes".into()],
        working_dir: "/home/sandbox".into(),
        user: user.into(),
        ..ImageProcess::default()
    };
    testing::push(
        &reference,
        vec![testing::busybox_layer("berth-busybox").expect("layer")],
        &process,
    )
    .await
    .expect("push");
    reference
}

fn needs_root() -> bool {
    if !nix_is_root() {
        eprintln!("SKIP: gVisor image sandboxes need root (overlayfs, cgroups)");
        return false;
    }
    true
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn an_image_sandbox_sees_the_image_and_gvisors_kernel_and_its_writes_land_on_the_host() {
    if !needs_root() {
        return;
    }
    let f = fixture().await;
    let reference = busybox(&f, "").await;
    let (outcome, out, dir) = run(
        &f,
        "sbx-img-1",
        &reference,
        &[
            "sh",
            "-c",
            "cat /etc/os-release; uname -r; id -u; echo hi > /root/written",
        ],
        128,
        RuntimeKind::Gvisor,
    )
    .await;
    assert_eq!(outcome, Outcome::Exited { code: 0 }, "{out}");
    assert!(out.contains("NAME=\"berth-busybox\""), "{out}");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let kernel = out.lines().nth(2).unwrap_or_default();
    assert!(!kernel.is_empty() && kernel != host_kernel.trim(), "{out}");
    assert_eq!(out.lines().nth(3), Some("0"), "{out}");
    // The write layer is a host directory: the change is there after the sandbox ended
    // (gVisor keeps /tmp in its own tmpfs; everything else goes to the upper directory).
    assert_eq!(
        std::fs::read_to_string(dir.join("fs/upper/root/written")).expect("upper"),
        "hi\n"
    );
    assert!(
        !Path::new(
            &f.images
                .ensure(&reference, "x")
                .await
                .expect("img")
                .rootfs
                .join("root/written")
        )
        .exists(),
        "the shared image was written"
    );
}

#[tokio::test]
async fn the_images_cmd_env_and_working_dir_are_used_when_the_spec_has_none() {
    if !needs_root() {
        return;
    }
    let f = fixture().await;
    let reference = busybox(&f, "sandbox").await;
    let (outcome, out, _) = run(&f, "sbx-img-2", &reference, &[], 128, RuntimeKind::Gvisor).await;
    assert_eq!(outcome, Outcome::Exited { code: 0 }, "{out}");
    assert_eq!(out, "FROM_IMAGE=yes\n/home/sandbox\n1000\n");
}

#[tokio::test]
async fn a_sandbox_over_its_memory_limit_is_killed_and_reported_out_of_memory() {
    if !needs_root() {
        return;
    }
    let f = fixture().await;
    let reference = busybox(&f, "").await;
    let (outcome, out, _) = run(
        &f,
        "sbx-oom-1",
        &reference,
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/null bs=256M count=2; echo survived",
        ],
        64,
        RuntimeKind::Gvisor,
    )
    .await;
    match outcome {
        Outcome::Failed { reason } => {
            assert!(
                reason.starts_with("out of memory") && reason.contains("64 MiB"),
                "{reason}"
            )
        }
        other => panic!("{other:?}: {out}"),
    }
    assert!(!out.contains("survived"), "{out}");
}

#[tokio::test]
async fn the_process_runtime_chroots_into_the_image_as_its_user_and_writes_to_the_upper_dir() {
    if !needs_root() {
        return;
    }
    let f = fixture().await;
    let reference = busybox(&f, "sandbox").await;
    let (outcome, out, dir) = run(
        &f,
        "sbx-proc-1",
        &reference,
        &[
            "sh",
            "-c",
            "cat /etc/os-release; id -u; pwd; echo hi > /tmp/written",
        ],
        128,
        RuntimeKind::Process,
    )
    .await;
    assert_eq!(outcome, Outcome::Exited { code: 0 }, "{out}");
    assert!(
        out.contains("NAME=\"berth-busybox\""),
        "the image's file: {out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[lines.len() - 2..], ["1000", "/home/sandbox"], "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("fs/upper/tmp/written")).expect("upper"),
        "hi\n"
    );
    let image = f.images.ensure(&reference, "x").await.expect("img");
    assert!(
        !image.rootfs.join("tmp/written").exists(),
        "the shared image was written"
    );
}
