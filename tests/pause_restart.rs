//! Pause and resume across agent restarts, with a real `berth agent` process under gVisor
//! and a three-replica cluster: a pause asked for while the agent is down is carried out when
//! it comes back, a paused sandbox survives the agent's restart, and after resume its
//! process goes on counting where it stopped. Deleting it removes the snapshot from disk.

use std::time::Duration;

use berth_proto::pb::v1 as pb;

mod common;
use common::agents::*;

/// Prints 1, 2, 3, ... one a line, every 100 ms, keeping the count in the shell's memory.
const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";

/// The numbers the counter printed so far.
fn printed(agent: &AgentProcess, id: &str) -> Vec<u64> {
    std::fs::read_to_string(agent.sandbox_dir(id).join("stdout"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn printed_past(agent: &AgentProcess, id: &str, n: u64) -> Vec<u64> {
    wait_for(
        Duration::from_secs(20),
        &format!("{id} counting past {n}"),
        agent,
        || async move {
            let seen = printed(agent, id);
            (seen.last().copied().unwrap_or(0) > n).then_some(seen)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pause_survives_agent_restarts_and_the_process_counts_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_cluster, mut client, mut agent) = cluster_with_agent(dir.path(), "pause-a").await;
    // Restart it under gVisor (the helper cluster starts process-runtime agents).
    agent.kill();
    agent.use_gvisor();
    agent.start();
    let mut spec = sandbox_spec("H100:1", &["sh", "-c", COUNTER]);
    spec.resources = Some(pb::Resources {
        cpu_milli: 1_000,
        memory_mib: 256,
        gpu: None,
    });
    spec.keep_alive = true;
    let id = create(&mut client, "counter", spec).await;
    sandbox_in(&mut client, &id, pb::SandboxState::Running, &agent).await;
    printed_past(&agent, &id, 3).await;

    // Asked to pause while its agent is away: the pause waits for the agent's return.
    agent.kill();
    let pausing = client.pause(&id, false).await.expect("pause");
    assert_eq!(state(&pausing), pb::SandboxState::Pausing, "{pausing:?}");
    agent.start();
    let paused = sandbox_in(&mut client, &id, pb::SandboxState::Paused, &agent).await;
    let reason = paused.status.expect("status").reason;
    assert!(reason.contains("paused to node pause-a"), "{reason}");
    let before = printed(&agent, &id);
    let last = *before.last().expect("it counted");
    assert!(agent.sandbox_dir(&id).join("snapshot").is_dir());

    // Restarted while paused: it stays paused, snapshot and all.
    agent.kill();
    agent.start();
    node_in(
        &client,
        "pause-a",
        pb::NodeStatus::Ready,
        Duration::from_secs(20),
        &agent,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = client.get(&id).await.expect("get");
    assert_eq!(state(&still), pb::SandboxState::Paused, "{still:?}");
    assert!(agent.sandbox_dir(&id).join("snapshot").is_dir());
    assert_eq!(printed(&agent, &id), before, "it ran while paused");

    // Resumed: the same process, counting on from where it stopped, never from 1 again.
    client.resume(&id).await.expect("resume");
    sandbox_in(&mut client, &id, pb::SandboxState::Running, &agent).await;
    let after = printed_past(&agent, &id, last + 3).await;
    let expected: Vec<u64> = (1..=after.len() as u64).collect();
    assert_eq!(after, expected, "the count is not one unbroken run");
    assert!(!agent.sandbox_dir(&id).join("snapshot").exists());

    // Paused again and deleted: its directory, snapshot included, goes.
    client.pause(&id, false).await.expect("pause");
    sandbox_in(&mut client, &id, pb::SandboxState::Paused, &agent).await;
    assert!(client.delete(&id).await.expect("delete"));
    let gone = agent.sandbox_dir(&id);
    wait_for(
        Duration::from_secs(20),
        "the deleted sandbox's directory removed",
        &agent,
        || {
            let gone = gone.clone();
            async move { (!gone.exists()).then_some(()) }
        },
    )
    .await;
}
