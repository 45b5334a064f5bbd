//! The disconnect grace with real processes: an agent frozen (SIGSTOP) past its TTL makes
//! its node Down and its sandboxes Unknown; back within the grace, what it reports stands
//! (still running → Running, ended while it was away → Exited with its code), nothing is
//! Lost; frozen past the grace, they are Lost and the returning agent is told to stop them.
//! An agent killed and restarted with the same state directory within the grace comes back
//! the same way.

use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;

mod common;
use common::agents::*;

/// Freezes the agent until node `id` is Down and `sandbox` is Unknown; returns when the
/// node was seen Down.
async fn freeze_until_unknown(
    client: &mut berth_scheduler::service::client::Client,
    agent: &AgentProcess,
    id: &str,
    sandbox: &str,
) -> Instant {
    agent.pause(true);
    let down = node_in(
        client,
        id,
        pb::NodeStatus::Down,
        Duration::from_millis(TTL_MS + 5_000),
        agent,
    )
    .await;
    let down_at = Instant::now();
    assert!(down.status_reason.contains("no heartbeat"), "{down:?}");
    sandbox_in(client, sandbox, pb::SandboxState::Unknown, agent).await;
    down_at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_agent_back_within_the_grace_has_its_report_stand_and_past_it_loses() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cluster, mut client, agent) = cluster_with_agent(dir.path(), "h100-c").await;
    let first = node_in(
        &client,
        "h100-c",
        pb::NodeStatus::Ready,
        Duration::from_secs(20),
        &agent,
    )
    .await;
    let long = create(
        &mut client,
        "long",
        sandbox_spec("H100:2", &["sleep", "600"]),
    )
    .await;
    let short = create(
        &mut client,
        "short",
        sandbox_spec("H100:1", &["sh", "-c", "sleep 1; exit 3"]),
    )
    .await;
    sandbox_in(&mut client, &long, pb::SandboxState::Running, &agent).await;
    sandbox_in(&mut client, &short, pb::SandboxState::Running, &agent).await;

    // Frozen past the TTL: Down, both Unknown, their GPUs still held. `short` ends while
    // the agent cannot say so.
    let down_at = freeze_until_unknown(&mut client, &agent, "h100-c", &long).await;
    let s = client.get(&short).await.expect("get");
    assert_eq!(state(&s), pb::SandboxState::Unknown, "{s:?}");
    let held = node(&mut client, "h100-c").await.expect("node");
    assert_eq!(gpu_milli_allocated(&held), 3_000, "{held:?}");
    let exit_record = agent.sandbox_dir(&short).join("exit.json");
    wait_for(
        Duration::from_secs(5),
        "the short sandbox ends under its shim",
        &agent,
        || {
            let exit_record = exit_record.clone();
            async move { exit_record.exists().then_some(()) }
        },
    )
    .await;

    // Back well within the grace: the agent's report stands.
    agent.pause(false);
    let running = sandbox_in(&mut client, &long, pb::SandboxState::Running, &agent).await;
    let exited = sandbox_in(&mut client, &short, pb::SandboxState::Exited, &agent).await;
    let back_after = down_at.elapsed();
    eprintln!(
        "back {} ms after the node went down (grace {GRACE_MS} ms)",
        back_after.as_millis()
    );
    assert!(
        back_after < Duration::from_millis(GRACE_MS),
        "{back_after:?}"
    );
    assert_eq!(exited.status.expect("status").exit_code, 3);
    assert_eq!(running.status.expect("status").node_id, "h100-c");
    let back = node_in(
        &client,
        "h100-c",
        pb::NodeStatus::Ready,
        Duration::from_secs(5),
        &agent,
    )
    .await;
    assert!(back.epoch > first.epoch, "re-registered: {back:?}");
    assert_eq!(
        gpu_milli_allocated(&back),
        2_000,
        "short's GPU is free again"
    );

    // Frozen past the grace: Lost, and once back the agent stops it.
    let down_at = freeze_until_unknown(&mut client, &agent, "h100-c", &long).await;
    let lost = sandbox_in(&mut client, &long, pb::SandboxState::Lost, &agent).await;
    assert!(down_at.elapsed() >= Duration::from_millis(GRACE_MS - 500));
    let reason = lost.status.expect("status").reason;
    assert!(
        reason.contains(&format!(
            "node h100-c did not come back within the {GRACE_MS} ms disconnect grace"
        )),
        "{reason}"
    );
    agent.pause(false);
    node_in(
        &client,
        "h100-c",
        pb::NodeStatus::Ready,
        Duration::from_secs(10),
        &agent,
    )
    .await;
    let s = client.get(&long).await.expect("get");
    assert_eq!(state(&s), pb::SandboxState::Lost, "Lost stands: {s:?}");
    let long_exit = agent.sandbox_dir(&long).join("exit.json");
    let long_dir = agent.sandbox_dir(&long);
    wait_for(
        Duration::from_secs(20),
        "the lost sandbox is stopped",
        &agent,
        || {
            let (dir, exit) = (long_dir.clone(), long_exit.clone());
            async move { (!dir.exists() || exit.exists()).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_restarted_within_the_grace_readopts_its_unknown_sandbox() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cluster, mut client, mut agent) = cluster_with_agent(dir.path(), "h100-d").await;
    let marker = dir.path().join("runs.txt");
    let script = format!("echo started >> {}; sleep 600", marker.display());
    let id = create(
        &mut client,
        "job",
        sandbox_spec("H100:1", &["sh", "-c", &script]),
    )
    .await;
    sandbox_in(&mut client, &id, pb::SandboxState::Running, &agent).await;

    // Killed long enough for its node to go Down: Unknown, not Lost.
    agent.kill();
    node_in(
        &client,
        "h100-d",
        pb::NodeStatus::Down,
        Duration::from_millis(TTL_MS + 5_000),
        &agent,
    )
    .await;
    sandbox_in(&mut client, &id, pb::SandboxState::Unknown, &agent).await;

    // Restarted with the same state directory: it re-adopts the sandbox, which ran once.
    agent.start();
    let running = sandbox_in(&mut client, &id, pb::SandboxState::Running, &agent).await;
    assert_eq!(running.status.expect("status").node_id, "h100-d");
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs, "started\n", "the sandbox ran more than once");
    // It stays Running past where the grace would have ended.
    tokio::time::sleep(Duration::from_millis(GRACE_MS)).await;
    let s = client.get(&id).await.expect("get");
    assert_eq!(state(&s), pb::SandboxState::Running, "{s:?}");
}
