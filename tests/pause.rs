//! Pause and resume on `berth dev` (gVisor), through the CLI: a sandbox paused to its
//! node's disk releases the node and comes back with its files, its processes and their
//! memory; a pause survives an agent restart; deleting a paused sandbox removes its
//! snapshot; a GPU sandbox's pause is refused with the reason.

use std::time::{Duration, Instant};

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::counter::{
    COUNTER, NODE, berth_ok, counting_past, node_json, read, running_sandbox,
    same_process_counting_on, sandbox_dir,
};
use common::sandboxes::{create, exec, gvisor_dev, push_busybox, state_of, wait_for_state};
use common::{Dev, text};

#[test]
fn a_paused_sandbox_releases_its_node_and_resumes_with_its_files_processes_and_memory() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-pause-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(dir.path(), &registry, &["--only-node", NODE]);
    let id = running_sandbox(&dev, &reference);
    let before = counting_past(&dev, &id, 5);
    let pid = read(&dev, &id, "/tmp/pid");
    let held = node_json(&dev, NODE);
    assert_eq!(held["cpu_milli_allocated"], 2000, "{held}");

    // Pause: the command waits for the snapshot, and the node holds nothing for it.
    let out = berth_ok(&dev, &["sandbox", "pause", &id]);
    assert!(out.contains("paused"), "{out}");
    let (state, reason) = state_of(&dev, &id);
    assert_eq!(state, "paused", "{reason}");
    assert!(
        reason.contains(&format!("paused to node {NODE}")),
        "{reason}"
    );
    let node = node_json(&dev, NODE);
    assert_eq!(node["cpu_milli_allocated"], 0, "{node}");
    assert_eq!(node["memory_mib_allocated"], 0, "{node}");
    let sandbox_dir = sandbox_dir(&dir.path().join("state"), NODE, &id);
    assert!(
        sandbox_dir.join("snapshot").is_dir(),
        "no snapshot in {}",
        sandbox_dir.display()
    );
    // A paused sandbox takes no exec.
    let out = exec(&dev, &id, &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("paused"),
        "{}",
        text(&out.stderr)
    );
    let listed = dev.berth(&["sandbox", "list", "--state", "paused"]);
    assert!(
        text(&listed.stdout).contains(&id),
        "{}",
        text(&listed.stdout)
    );

    // Resume: the same process, its counter going on from where it was, the file there.
    let out = berth_ok(&dev, &["sandbox", "resume", &id]);
    assert!(out.contains("snapshot affinity hit"), "{out}");
    let after = same_process_counting_on(&dev, &id, &pid, before);
    assert!(
        after > before,
        "the counter did not go on from {before}: {after}"
    );
    assert_eq!(node_json(&dev, NODE)["cpu_milli_allocated"], 2000);
    assert!(
        !sandbox_dir.join("snapshot").exists(),
        "the snapshot outlived the resume"
    );

    // Paused again and deleted: the snapshot goes from the node's disk.
    berth_ok(&dev, &["sandbox", "pause", &id]);
    assert!(sandbox_dir.join("snapshot").is_dir());
    berth_ok(&dev, &["sandbox", "delete", &id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sandbox_dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !sandbox_dir.exists(),
        "a deleted sandbox's snapshot stayed on disk"
    );
}

#[test]
fn a_gpu_sandbox_pause_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let dev = Dev::start(
        dir.path(),
        &[
            "--runtime",
            "process",
            "--no-autoscaler",
            "--only-node",
            NODE,
        ],
    );
    let id = create(&dev, &["--gpu", "L4", "--keep-alive"]);
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
    let out = dev.berth(&["sandbox", "pause", &id]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("FailedPrecondition") || err.contains("failed precondition"),
        "{err}"
    );
    assert!(
        err.contains("gVisor cannot checkpoint GPU state")
            && err.contains("gpu_pause_filesystem_only"),
        "{err}"
    );
    assert_eq!(state_of(&dev, &id).0, "running");
}

#[test]
fn a_sandbox_resumes_on_another_node_when_its_own_is_cordoned() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-move-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let (first, second) = ("gcp-euw4-g2-0", "gcp-euw4-g2-1");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", first, "--only-node", second],
    );
    let id = running_sandbox(&dev, &reference);
    let before = counting_past(&dev, &id, 5);
    let pid = read(&dev, &id, "/tmp/pid");
    let out = dev.berth(&["sandbox", "get", &id, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let from = v["status"]["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let to = if from == first { second } else { first };
    berth_ok(&dev, &["sandbox", "pause", &id]);

    // Its node is cordoned: it resumes on the other, fetching the snapshot through the
    // scheduler, with its files, its process and its count.
    berth_ok(&dev, &["node", "cordon", &from]);
    let said = berth_ok(&dev, &["sandbox", "resume", &id]);
    assert!(said.contains(&format!("running on {to}")), "{said}");
    assert!(
        said.contains(&format!(
            "snapshot affinity missed: its snapshot is on {from}, and that node is cordoned; \
             {to} fetches it"
        )),
        "{said}"
    );
    let after = same_process_counting_on(&dev, &id, &pid, before);
    assert!(after > before, "{before} then {after}");
    // The leader counted the miss (which replica leads is not known here: sum them).
    let misses: f64 = (0..3)
        .map(|i| {
            let text = common::metrics_at(&format!("127.0.0.1:{}", dev.metrics_port + i));
            text.lines()
                .find(|l| l.starts_with("berth_snapshot_affinity_total{result=\"miss\"}"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(misses, 1.0, "berth_snapshot_affinity_total miss");

    // The holder lets its copy go once the sandbox runs elsewhere.
    let old = sandbox_dir(&dir.path().join("state"), &from, &id);
    let deadline = Instant::now() + Duration::from_secs(20);
    while old.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!old.exists(), "{} stayed", old.display());
}

#[test]
fn a_filesystem_only_pause_of_a_gpu_sandbox_keeps_its_files_and_restarts_its_processes() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-fs-pause-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--gpu-pause-filesystem-only"],
    );
    let id = create(
        &dev,
        &[
            "--image",
            &reference,
            "--keep-alive",
            "--gpu",
            "L4",
            "--memory",
            "256Mi",
        ],
    );
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
    // On the root filesystem (gVisor's /tmp is memory, which this mode does not keep).
    let out = exec(
        &dev,
        &id,
        &["sh", "-c", &format!("echo kept > /kept; {COUNTER}")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    counting_past(&dev, &id, 2);
    let pid = read(&dev, &id, "/tmp/pid");

    berth_ok(&dev, &["sandbox", "pause", &id]);
    let (state, reason) = state_of(&dev, &id);
    assert_eq!(state, "paused");
    assert!(
        reason.contains("files only; processes restart on resume"),
        "{reason}"
    );
    assert_eq!(node_json(&dev, NODE)["gpus"][0]["allocated_milli"], 0);

    let out = dev.berth(&["sandbox", "resume", &id]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("its processes restart"), "{said}");
    assert_eq!(read(&dev, &id, "/kept"), "kept");
    // The counter's shell did not come back: its pid names no process now.
    let out = exec(
        &dev,
        &id,
        &["sh", "-c", &format!("kill -0 {pid} && echo alive")],
    );
    assert!(
        !text(&out.stdout).contains("alive"),
        "the old process survived"
    );
    assert_eq!(node_json(&dev, NODE)["gpus"][0]["allocated_milli"], 1000);
}

#[test]
fn an_idle_sandbox_with_auto_pause_pauses_itself_and_resumes_with_its_memory() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-auto-pause-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(dir.path(), &registry, &["--only-node", NODE]);
    let id = create(
        &dev,
        &["--image", &reference, "--keep-alive", "--auto-pause", "2s"],
    );
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
    let out = exec(&dev, &id, &["sh", "-c", COUNTER]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = counting_past(&dev, &id, 3);
    let pid = read(&dev, &id, "/tmp/pid");
    // Calls keep it awake; two seconds without one and it pauses itself.
    let (state, reason) = wait_for_state(&dev, &id, "paused", Duration::from_secs(30));
    assert_eq!(state, "paused", "{reason}\n{}", dev.log_tail());
    berth_ok(&dev, &["sandbox", "resume", &id]);
    assert_eq!(read(&dev, &id, "/tmp/pid"), pid);
    assert!(counting_past(&dev, &id, before) > before);
}
