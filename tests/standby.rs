//! Standby on `berth dev` (gVisor), through the CLI: a sandbox frozen in place gives back
//! its CPU and keeps its memory on its node, does not run while frozen, and thaws on the
//! same node with the same process counting on; after `--standby-pause-after` the leader
//! pauses it to disk, and it resumes from the checkpoint.

use std::time::Duration;

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::counter::{
    NODE, berth_ok, count, counting_past, node_json, read, running_sandbox,
    same_process_counting_on, sandbox_dir,
};
use common::sandboxes::{exec, gvisor_dev, push_busybox, state_of, wait_for_state};
use common::text;

#[test]
fn a_sandbox_on_standby_holds_memory_not_cpu_stops_counting_and_thaws_in_place() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-standby-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--standby-pause-after", "1h"],
    );
    let id = running_sandbox(&dev, &reference);
    counting_past(&dev, &id, 3);
    let pid = read(&dev, &id, "/tmp/pid");

    let before = count(&dev, &id);
    let out = berth_ok(&dev, &["sandbox", "pause", "--standby", &id]);
    assert!(out.contains("standby"), "{out}");
    let node = node_json(&dev, NODE);
    assert_eq!(node["cpu_milli_allocated"], 0, "{node}");
    assert_eq!(node["memory_mib_allocated"], 256, "{node}");
    let (state, reason) = state_of(&dev, &id);
    assert_eq!(state, "standby", "{reason}");
    // The agent froze it: its directory says so, and no exec is let in meanwhile.
    let sandbox_dir = sandbox_dir(&dir.path().join("state"), NODE, &id);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sandbox_dir.join("standby").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        sandbox_dir.join("standby").exists(),
        "the agent did not freeze it\n{}",
        dev.log_tail()
    );
    let out = exec(&dev, &id, &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("standby"),
        "{}",
        text(&out.stderr)
    );
    let listed = berth_ok(&dev, &["sandbox", "list", "--state", "standby"]);
    assert!(listed.contains(&id), "{listed}");

    // Frozen for two seconds, it would have counted about 20 more if it ran.
    std::thread::sleep(Duration::from_secs(2));
    let out = berth_ok(&dev, &["sandbox", "resume", &id]);
    assert!(out.contains(&format!("running on {NODE}")), "{out}");
    assert!(out.contains("thawed from standby"), "{out}");
    let after = count(&dev, &id);
    assert!(
        after >= before && after < before + 10,
        "it ran while frozen: {before} before, {after} right after the thaw"
    );
    assert!(!sandbox_dir.join("standby").exists());
    same_process_counting_on(&dev, &id, &pid, after);
    let node = node_json(&dev, NODE);
    assert_eq!(node["cpu_milli_allocated"], 2000, "{node}");
}

#[test]
fn a_sandbox_on_standby_long_enough_is_paused_to_disk_and_resumes_from_it() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-standby-pause-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--standby-pause-after", "2s"],
    );
    let id = running_sandbox(&dev, &reference);
    let before = counting_past(&dev, &id, 3);
    let pid = read(&dev, &id, "/tmp/pid");
    berth_ok(&dev, &["sandbox", "pause", "--standby", &id]);
    let (state, reason) = wait_for_state(&dev, &id, "paused", Duration::from_secs(30));
    assert_eq!(state, "paused", "{reason}\n{}", dev.log_tail());
    let node = node_json(&dev, NODE);
    assert_eq!(node["memory_mib_allocated"], 0, "{node}");
    let sandbox_dir = sandbox_dir(&dir.path().join("state"), NODE, &id);
    assert!(sandbox_dir.join("snapshot").is_dir());
    assert!(!sandbox_dir.join("standby").exists());

    let out = berth_ok(&dev, &["sandbox", "resume", &id]);
    assert!(out.contains("snapshot affinity hit"), "{out}");
    same_process_counting_on(&dev, &id, &pid, before);
}

#[test]
fn an_exec_into_an_auto_resume_sandbox_wakes_it_from_standby_and_from_disk() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-auto-resume-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--standby-pause-after", "1h"],
    );
    let shape = ["--image", &reference, "--keep-alive", "--memory", "128Mi"];
    let mut args = shape.to_vec();
    args.push("--auto-resume");
    let id = common::sandboxes::create(&dev, &args);
    let plain = common::sandboxes::create(&dev, &shape);
    for sandbox in [&id, &plain] {
        let (state, reason) = wait_for_state(&dev, sandbox, "running", Duration::from_secs(60));
        assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
        berth_ok(&dev, &["sandbox", "pause", "--standby", sandbox]);
    }
    // Without auto-resume a call is refused, saying how to get one through.
    let out = exec(&dev, &plain, &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("auto_resume"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(state_of(&dev, &plain).0, "standby");

    // With it, the call thaws the sandbox and runs.
    let out = exec(&dev, &id, &["sh", "-c", "echo kept > /tmp/file; echo ok"]);
    assert_eq!(text(&out.stdout).trim(), "ok", "{}", text(&out.stderr));
    assert_eq!(state_of(&dev, &id).0, "running");

    // From disk too: the call restores it, with its files.
    berth_ok(&dev, &["sandbox", "pause", &id]);
    let (state, reason) = wait_for_state(&dev, &id, "paused", Duration::from_secs(30));
    assert_eq!(state, "paused", "{reason}\n{}", dev.log_tail());
    assert_eq!(read(&dev, &id, "/tmp/file"), "kept");
    assert_eq!(state_of(&dev, &id).0, "running");
}
