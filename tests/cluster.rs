//! Multi-process tests: real `berth scheduler` processes on loopback, each with its own
//! data directory, killed with SIGKILL.
//!
//! These tests assert behaviour (nothing acknowledged is lost, a new leader takes over, a
//! restarted replica catches up), never timings; failover time is measured by
//! `berth bench failover`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use berth_proto::pb::v1 as pb;
use berth_scheduler::convert;
use berth_scheduler::service::client::{Client, local_sandbox_ids};
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

fn cluster(dir: &std::path::Path) -> LocalCluster {
    let cfg = LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth"));
    LocalCluster::start(cfg, dir).expect("start the cluster")
}

fn spec(n: u64) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "acme".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "-c".into(), format!("print({n})")],
        resources: Some(pb::Resources {
            cpu_milli: 250,
            memory_mib: 256,
            gpu: (n % 3 == 0).then(|| pb::GpuRequest {
                options: vec!["H100:1".into()],
                min_memory_mib: 0,
            }),
        }),
        ..Default::default()
    }
}

async fn register_pool(cluster: &LocalCluster) {
    let mut client = cluster.client();
    for i in 0..8 {
        let node =
            berth_scheduler::testing::gpu_node(&format!("gpu-{i}"), berth_proto::GpuModel::H100, 8);
        client
            .register_node(convert::node_inventory_to_pb(&node))
            .await
            .expect("register a node");
    }
}

async fn leader_or_fail(cluster: &mut LocalCluster) -> usize {
    match cluster.wait_for_leader(Duration::from_secs(20)).await {
        Some(i) => i,
        None => panic!(
            "no leader within 20 s; logs:\n{}\n{}\n{}",
            cluster.log_tail(0, 15),
            cluster.log_tail(1, 15),
            cluster.log_tail(2, 15)
        ),
    }
}

/// Acknowledged creates: request id → sandbox id.
type Acked = Arc<Mutex<BTreeMap<String, String>>>;

/// Clients that create sandboxes until told to stop; every acknowledged create is recorded.
fn start_writers(
    client: Client,
    writers: u64,
    deadline: Duration,
    stop: Arc<AtomicBool>,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let mut client = client.clone();
            let stop = stop.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                client.deadline = deadline;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let rid = format!("w{w}-{n}");
                    if let Ok(r) = client.create(&rid, spec(n)).await {
                        if let Some(s) = r.sandbox {
                            acked.lock().await.insert(rid, s.id);
                        }
                    }
                }
            })
        })
        .collect()
}

/// Waits until replica `i`'s applied index reaches `index`.
async fn wait_applied(cluster: &LocalCluster, i: usize, index: u64) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(s) = cluster.status(i).await {
            if s.applied_index >= index {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "replica {} did not apply up to {index} within 30 s; log:\n{}",
        i + 1,
        cluster.log_tail(i, 20)
    );
}

async fn assert_holds_all(cluster: &LocalCluster, i: usize, acked: &BTreeMap<String, String>) {
    let held: BTreeSet<String> =
        local_sandbox_ids(&cluster.members[i].address, cluster.admin_tls())
            .await
            .expect("list the replica's sandboxes")
            .into_iter()
            .collect();
    let missing: Vec<&String> = acked.values().filter(|id| !held.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "replica {} lost {} of {} acknowledged creates, e.g. {:?}",
        i + 1,
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_loses_no_acknowledged_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster(dir.path());
    let old_leader = leader_or_fail(&mut cluster).await;
    register_pool(&cluster).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers = start_writers(
        cluster.client(),
        6,
        Duration::from_secs(20),
        stop.clone(),
        acked.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before_kill = acked.lock().await.len();
    assert!(
        before_kill > 0,
        "no create was acknowledged before the kill"
    );

    cluster.kill(old_leader);
    let new_leader = leader_or_fail(&mut cluster).await;
    assert_ne!(new_leader, old_leader, "a killed replica cannot lead");
    // Writers keep going against the new leader.
    let count_at_takeover = acked.lock().await.len();
    let started = Instant::now();
    while acked.lock().await.len() <= count_at_takeover + 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no progress after the new leader took over; log:\n{}",
            cluster.log_tail(new_leader, 20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer task");
    }
    let acked = acked.lock().await.clone();
    assert!(
        acked.len() > before_kill,
        "no create acknowledged after the kill"
    );

    // Every live replica holds every acknowledged create.
    let commit = cluster
        .status(new_leader)
        .await
        .expect("leader status")
        .commit_index;
    for i in 0..cluster.members.len() {
        if i == old_leader {
            continue;
        }
        wait_applied(&cluster, i, commit).await;
        assert_holds_all(&cluster, i, &acked).await;
    }

    // The killed replica restarts from its disk and catches up.
    cluster.restart(old_leader).expect("restart");
    wait_applied(&cluster, old_leader, commit).await;
    assert_holds_all(&cluster, old_leader, &acked).await;
    let status = cluster.status(old_leader).await.expect("status");
    assert_eq!(status.leader_id, cluster.members[new_leader].id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_every_replica_keeps_every_acknowledged_create() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster(dir.path());
    leader_or_fail(&mut cluster).await;
    register_pool(&cluster).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let writers = start_writers(
        cluster.client(),
        4,
        Duration::from_secs(2),
        stop.clone(),
        acked.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Kill everything while creates are in flight: what was acknowledged must survive.
    for i in 0..cluster.members.len() {
        cluster.kill(i);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().await.clone();
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the restart"
    );

    for i in 0..cluster.members.len() {
        cluster.restart(i).expect("restart");
    }
    let leader = leader_or_fail(&mut cluster).await;
    // A new write commits, so everything before it is applied everywhere it is applied.
    let mut client = cluster.client();
    client
        .create("after-restart", spec(1))
        .await
        .expect("a create after the restart");
    let commit = cluster.status(leader).await.expect("status").commit_index;
    for i in 0..cluster.members.len() {
        wait_applied(&cluster, i, commit).await;
        assert_holds_all(&cluster, i, &acked).await;
    }
    // Retrying an acknowledged create returns the original sandbox.
    let (rid, id) = acked.iter().next().expect("one acked create");
    let again = client.create(rid, spec(0)).await.expect("retry");
    assert!(again.deduplicated);
    assert_eq!(again.sandbox.map(|s| s.id).as_deref(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_added_later_catches_up_by_snapshot_and_can_replace_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = cluster(dir.path());
    leader_or_fail(&mut cluster).await;
    register_pool(&cluster).await;
    let mut client = cluster.client();
    let mut acked = BTreeMap::new();
    for n in 0..50 {
        let rid = format!("before-{n}");
        let r = client.create(&rid, spec(n)).await.expect("create");
        acked.insert(rid, r.sandbox.expect("sandbox").id);
    }

    // A fourth replica starts empty and joins as a learner; the leader's log starts after
    // the bootstrap snapshot, so it can only catch up through a snapshot transfer.
    let new = cluster.add_member().expect("start a fourth replica");
    let address = cluster.members[new].address.clone();
    let id = cluster.members[new].id;
    let r = client
        .add_peer(id, &address, true)
        .await
        .expect("add learner");
    assert!(
        r.replicas.iter().any(|p| p.id == id && p.role == "learner"),
        "{:?}",
        r.replicas
    );
    let leader = leader_or_fail(&mut cluster).await;
    let commit = cluster.status(leader).await.expect("status").commit_index;
    wait_applied(&cluster, new, commit).await;
    assert_holds_all(&cluster, new, &acked).await;

    // Promote it, then remove an original replica: the cluster keeps serving.
    client.add_peer(id, &address, false).await.expect("promote");
    let victim = (0..3).find(|i| *i != leader).expect("a follower");
    let r = client
        .remove_peer(cluster.members[victim].id)
        .await
        .expect("remove a replica");
    assert_eq!(r.replicas.len(), 3, "{:?}", r.replicas);
    assert!(
        r.replicas
            .iter()
            .all(|p| p.id != cluster.members[victim].id)
    );
    cluster.kill(victim);
    let r = client
        .create("after-membership", spec(7))
        .await
        .expect("create");
    acked.insert("after-membership".into(), r.sandbox.expect("sandbox").id);
    let commit = cluster.status(leader).await.expect("status").commit_index;
    wait_applied(&cluster, new, commit).await;
    assert_holds_all(&cluster, new, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_knows_no_leader_answers_unavailable() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut cluster = cluster(dir.path());
    let leader = leader_or_fail(&mut cluster).await;
    // Two of three gone: the survivor loses (or never had) a leader and cannot elect one.
    let survivor = (leader + 1) % 3;
    for i in 0..3 {
        if i != survivor {
            cluster.kill(i);
        }
    }
    let address = cluster.members[survivor].address.clone();
    let channel = cluster.admin_channel(&address);
    let mut raw = pb::sandbox_service_client::SandboxServiceClient::new(channel);
    let request = pb::CreateSandboxRequest {
        request_id: "no-leader".into(),
        spec: Some(spec(1)),
    };
    let started = Instant::now();
    // At first it may still name the dead leader (FAILED_PRECONDITION with a hint); once
    // its election timeout passes it knows none.
    let status = loop {
        let status = raw
            .create_sandbox(request.clone())
            .await
            .expect_err("no quorum, no create");
        if status.code() == tonic::Code::Unavailable {
            break status;
        }
        assert!(berth_net::is_not_leader(&status), "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {status:?} after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.message().contains("no leader is known yet"),
        "{status:?}"
    );
    assert!(berth_net::is_not_leader(&status));
    assert_eq!(
        status
            .metadata()
            .get(berth_net::LEADER_METADATA)
            .and_then(|v| v.to_str().ok()),
        Some("")
    );
    // The leader-following client retries it until its deadline, then reports it.
    let mut client = cluster.client_of(vec![address]);
    client.deadline = Duration::from_millis(1_500);
    let tried = Instant::now();
    let err = client
        .create("no-leader", spec(1))
        .await
        .expect_err("no leader");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(tried.elapsed() >= Duration::from_millis(1_500), "retried");
}
