//! Snapshot retention on `berth dev` (gVisor), through the CLI: a paused sandbox whose
//! snapshot outlives `[scheduler.sessions] snapshot_retention_ms` (`--snapshot-retention`)
//! is failed with a reason naming the field, and its node deletes the snapshot.

use std::time::{Duration, Instant};

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::counter::{NODE, berth_ok, sandbox_dir};
use common::sandboxes::{create, gvisor_dev, push_busybox, state_of, wait_for_state};

#[test]
fn a_paused_sandbox_past_its_snapshot_retention_fails_and_its_snapshot_is_deleted() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-retention-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--snapshot-retention", "2s"],
    );
    let id = create(
        &dev,
        &["--image", &reference, "--keep-alive", "--memory", "128Mi"],
    );
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());

    berth_ok(&dev, &["sandbox", "pause", &id]);
    let paused_at = Instant::now();
    let (state, reason) = state_of(&dev, &id);
    assert_eq!(state, "paused", "{reason}");
    let snapshot = sandbox_dir(&dir.path().join("state"), NODE, &id).join("snapshot");
    assert!(snapshot.is_dir(), "no snapshot at {}", snapshot.display());

    // The leader looks every second: failed between 2 and about 3 s after the pause.
    let (state, reason) = wait_for_state(&dev, &id, "failed", Duration::from_secs(10));
    assert_eq!(state, "failed", "{reason}\n{}", dev.log_tail());
    assert!(
        paused_at.elapsed() >= Duration::from_millis(1_500),
        "failed after {:?}, before its retention",
        paused_at.elapsed()
    );
    assert!(
        reason.contains("its snapshot was kept for 2000 ms")
            && reason.contains("snapshot_retention_ms"),
        "{reason}"
    );

    // Off the node's snapshot index, so its agent is told to delete it from disk.
    let deadline = Instant::now() + Duration::from_secs(10);
    while snapshot.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !snapshot.exists(),
        "an expired snapshot stayed on disk\n{}",
        dev.log_tail()
    );
    let (state, reason) = state_of(&dev, &id);
    assert!(
        state == "failed" && reason.contains("snapshot_retention_ms"),
        "the agent's report of the ended directory replaced the reason: {state} {reason}"
    );
}
