//! Node agents as real processes against a real three-replica scheduler cluster: liveness
//! (a killed agent's node goes Down and its sandboxes Unknown, keeping their GPUs; past the
//! disconnect grace they are Lost, and its GPUs stay unused until it re-registers) and
//! re-adoption (an agent restarted while a sandbox runs picks it up again; the sandbox runs
//! once and its final status arrives). `tests/disconnect.rs` brings agents back within the
//! grace.
//!
//! Agents here use the `process` runtime so the tests are about the agent, not gVisor;
//! `tests/dev.rs` runs sandboxes under runsc.

use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;

mod common;
use common::agents::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_past_the_grace_loses_its_sandboxes_and_its_gpus_wait_for_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cluster, mut client, mut agent) = cluster_with_agent(dir.path(), "h100-a").await;
    let first = node_in(
        &client,
        "h100-a",
        pb::NodeStatus::Ready,
        Duration::from_secs(20),
        &agent,
    )
    .await;

    // All eight GPUs taken by a running sandbox.
    let created = client
        .create("big", sandbox_spec("H100:8", &["sleep", "600"]))
        .await
        .expect("create");
    let big = created.sandbox.expect("sandbox").id;
    sandbox_in(&mut client, &big, pb::SandboxState::Running, &agent).await;

    agent.kill();
    let killed = Instant::now();
    let down = node_in(
        &client,
        "h100-a",
        pb::NodeStatus::Down,
        Duration::from_millis(TTL_MS + 5_000),
        &agent,
    )
    .await;
    let down_at = Instant::now();
    eprintln!(
        "node down {} ms after the kill (ttl {TTL_MS} ms): {}",
        killed.elapsed().as_millis(),
        down.status_reason
    );
    assert!(down.status_reason.contains("no heartbeat"), "{down:?}");
    // Unknown first: it keeps its eight GPUs for the grace, and nothing else is placed on
    // the Down node.
    let unknown = sandbox_in(&mut client, &big, pb::SandboxState::Unknown, &agent).await;
    let reason = unknown.status.expect("status").reason;
    assert!(reason.contains("node h100-a is down"), "{reason}");
    let waiting = client
        .create("after", sandbox_spec("H100:1", &["echo", "placed"]))
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    let held = node(&mut client, "h100-a").await.expect("node");
    assert_eq!(gpu_milli_allocated(&held), 8_000, "{held:?}");
    let s = client.get(&waiting).await.expect("get");
    assert_eq!(state(&s), pb::SandboxState::Pending, "{s:?}");

    // The agent stays away past the grace: Lost, with its GPUs free in the books, but the
    // node is Down: still nothing is placed there.
    let lost = sandbox_in(&mut client, &big, pb::SandboxState::Lost, &agent).await;
    let waited = down_at.elapsed();
    eprintln!(
        "lost {} ms after the node went down (grace {GRACE_MS} ms)",
        waited.as_millis()
    );
    assert!(
        waited >= Duration::from_millis(GRACE_MS - 500),
        "lost after {waited:?}, before the grace ended"
    );
    let reason = lost.status.expect("status").reason;
    assert!(
        reason.contains(&format!(
            "node h100-a did not come back within the {GRACE_MS} ms disconnect grace"
        )),
        "{reason}"
    );
    let freed = node(&mut client, "h100-a").await.expect("node");
    assert_eq!(gpu_milli_allocated(&freed), 0, "{freed:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = client.get(&waiting).await.expect("get");
    assert_eq!(state(&s), pb::SandboxState::Pending, "{s:?}");
    assert!(s.status.expect("status").node_id.is_empty());

    // It re-registers with a new epoch; the pending sandbox runs there, and the sandbox the
    // scheduler gave up on is stopped, not left running.
    agent.start();
    let back = node_in(
        &client,
        "h100-a",
        pb::NodeStatus::Ready,
        Duration::from_secs(20),
        &agent,
    )
    .await;
    assert!(
        back.epoch > first.epoch,
        "{} !> {}",
        back.epoch,
        first.epoch
    );
    let done = sandbox_in(&mut client, &waiting, pb::SandboxState::Exited, &agent).await;
    assert_eq!(done.status.expect("status").node_id, "h100-a");
    let old = agent.sandbox_dir(&big);
    wait_for(
        Duration::from_secs(20),
        "the lost sandbox is stopped",
        &agent,
        || {
            let old = old.clone();
            async move { (!old.exists() || old.join("exit.json").exists()).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_agent_readopts_a_running_sandbox_which_runs_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cluster, mut client, mut agent) = cluster_with_agent(dir.path(), "h100-b").await;
    let marker = dir.path().join("runs.txt");
    let script = format!("echo started >> {}; sleep 3; echo done", marker.display());
    let id = client
        .create("job", sandbox_spec("H100:1", &["sh", "-c", &script]))
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    sandbox_in(&mut client, &id, pb::SandboxState::Running, &agent).await;

    agent.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.start();

    let finished = sandbox_in(&mut client, &id, pb::SandboxState::Exited, &agent).await;
    let status = finished.status.expect("status");
    assert_eq!(status.exit_code, 0);
    assert_eq!(status.node_id, "h100-b");
    assert_eq!(
        status.gpu_uuids.len(),
        1,
        "GetSandbox names the GPU it ran on"
    );
    assert!(
        status.gpu_uuids[0].starts_with("GPU-"),
        "{:?}",
        status.gpu_uuids
    );
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs, "started\n", "the sandbox ran more than once");
    // Its output survives the agent restart and is served through the scheduler.
    let mut stream = client.read_logs(&id, false).await.expect("logs");
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.expect("chunk") {
        out.extend(chunk.data);
    }
    assert_eq!(String::from_utf8_lossy(&out), "done\n");
}
