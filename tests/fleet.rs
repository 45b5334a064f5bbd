//! Fleet scale in `scripts/test`: three real replicas and a `berth fleet-emulator` process
//! holding 1,000 agent streams (each its own connection and certificate). It shows that
//! assignments reach only the agent whose node the sandbox is bound to, that an agent that
//! stops reading its stream holds up no other agent, and that a watch served by a follower
//! resumes from `after_revision` with every change since and nothing twice.
//!
//! Counts, not timings: the figures at 10,000 agents are `berth bench fleet`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

const AGENTS: u64 = 1_000;
/// Agents 0..SLOW stop reading their stream once registered.
const SLOW: u64 = 4;
/// Sandboxes pinned to slow agent 0: far more than its stream buffers hold.
const PINNED: u64 = 600;
const SPREAD: u64 = 1_500;
const LABEL: &str = "emulator.berth.dev/agent";

/// The emulator process and its latest report line (parsed as JSON).
struct Emulator {
    child: Child,
    latest: Arc<Mutex<serde_json::Value>>,
}

impl Emulator {
    fn start(cluster: &LocalCluster) -> Emulator {
        let pki = cluster.pki().expect("the cluster runs with TLS");
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["fleet-emulator", "--scheduler"])
            .arg(cluster.endpoints().join(","))
            .args(["--nodes", &AGENTS.to_string(), "--slow", &SLOW.to_string()])
            .args(["--report-every", "200ms", "--pki"])
            .arg(&pki.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the fleet emulator");
        let stdout = child.stdout.take().expect("stdout");
        let latest = Arc::new(Mutex::new(serde_json::Value::Null));
        let sink = latest.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    *sink.lock().expect("lock") = v;
                }
            }
        });
        Emulator { child, latest }
    }

    fn get(&self, field: &str) -> u64 {
        self.latest.lock().expect("lock")[field]
            .as_u64()
            .unwrap_or(0)
    }

    async fn wait_for(&self, field: &str, at_least: u64, within: Duration) {
        let started = Instant::now();
        while self.get(field) < at_least {
            assert!(
                started.elapsed() < within,
                "{field}: {} of {at_least} after {within:?} ({})",
                self.get(field),
                self.latest.lock().expect("lock")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(pin: Option<u64>) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "fleet".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "agent.py".into()],
        resources: Some(pb::Resources {
            cpu_milli: 10,
            memory_mib: 16,
            gpu: None,
        }),
        constraints: pin.map(|i| pb::PlacementConstraints {
            node_labels: [(LABEL.to_string(), i.to_string())].into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads watch events until `done` says so; every event, in order.
async fn collect(
    events: &mut tonic::Streaming<pb::SandboxEvent>,
    mut done: impl FnMut(&[pb::SandboxEvent]) -> bool,
) -> Vec<pb::SandboxEvent> {
    let mut out = Vec::new();
    while !done(&out) {
        let e = tokio::time::timeout(Duration::from_secs(60), events.message())
            .await
            .expect("a watch event within 60 s")
            .expect("the watch stays healthy")
            .expect("the watch stays open");
        out.push(e);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_agents_get_only_their_own_work_a_stalled_one_holds_up_no_one_and_watches_resume()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = LocalCluster::start(
        LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth")),
        dir.path(),
    )
    .expect("start the cluster");
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a leader");
    let emulator = Emulator::start(&cluster);
    emulator
        .wait_for("connected", AGENTS, Duration::from_secs(240))
        .await;

    // Which nodes are the slow agents'.
    let mut client = cluster.client();
    client.deadline = Duration::from_secs(30);
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .nodes;
    assert_eq!(nodes.len() as u64, AGENTS);
    let slow: BTreeSet<String> = nodes
        .iter()
        .filter_map(|n| {
            let i: u64 = n.inventory.as_ref()?.labels.get(LABEL)?.parse().ok()?;
            (i < SLOW).then(|| n.inventory.as_ref().map(|inv| inv.node_id.clone()))?
        })
        .collect();
    assert_eq!(slow.len() as u64, SLOW);

    // A watch on a follower, read up to a revision; then closed.
    let follower = (leader + 1) % cluster.members.len();
    let channel = cluster.admin_channel(&cluster.members[follower].address);
    let mut sandboxes = SandboxServiceClient::new(channel);
    let warm = client.create("warm", spec(None)).await.expect("create");
    let warm_id = warm.sandbox.expect("sandbox").id;
    let mut first = sandboxes
        .watch_sandboxes(pb::WatchSandboxesRequest {
            tenant: "fleet".into(),
            ..Default::default()
        })
        .await
        .expect("watch on a follower")
        .into_inner();
    let seen = collect(&mut first, |e| {
        e.iter()
            .any(|e| e.sandbox.as_ref().is_some_and(|s| s.id == warm_id))
    })
    .await;
    let resume_from = seen.last().expect("an event").revision;
    drop(first);

    // Work for everyone, and far more than its stream holds for the stalled agent 0.
    let mut bound: BTreeMap<String, String> = BTreeMap::new();
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for n in (w..PINNED + SPREAD).step_by(16) {
                let pin = (n < PINNED).then_some(0);
                let r = client
                    .create(&format!("f-{n}"), spec(pin))
                    .await
                    .expect("create");
                let s = r.sandbox.expect("sandbox");
                let node = s.status.map(|st| st.node_id).unwrap_or_default();
                out.push((s.id, node));
            }
            out
        }));
    }
    for t in tasks {
        bound.extend(t.await.expect("creator"));
    }
    assert!(
        bound.values().all(|n| !n.is_empty()),
        "every create is placed at once"
    );
    let to_slow = bound.values().filter(|n| slow.contains(*n)).count() as u64;
    assert!(to_slow >= PINNED);
    // The warm sandbox went to someone too.
    let expected = (PINNED + SPREAD + 1)
        - to_slow
        - u64::from(
            slow.contains(
                &client
                    .get(&warm_id)
                    .await
                    .expect("get")
                    .status
                    .expect("status")
                    .node_id,
            ),
        );
    // Every agent that reads gets exactly its own: none misdelivered, none missing, while
    // agent 0's stream stays stalled with hundreds of assignments behind it.
    emulator
        .wait_for("assignments", expected, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        emulator.get("assignments"),
        expected,
        "no extra assignments"
    );
    assert_eq!(emulator.get("misdelivered"), 0);

    // Delete some, then resume the follower's watch from before all of it.
    let gone: Vec<String> = bound.keys().take(100).cloned().collect();
    for id in &gone {
        assert!(client.delete(id).await.expect("delete"));
    }
    let mut resumed = sandboxes
        .watch_sandboxes(pb::WatchSandboxesRequest {
            tenant: "fleet".into(),
            after_revision: resume_from,
            ..Default::default()
        })
        .await
        .expect("resume the watch on a follower")
        .into_inner();
    let gone_set: BTreeSet<&String> = gone.iter().collect();
    let events = collect(&mut resumed, |events| {
        let upserted: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.kind == pb::sandbox_event::Kind::Upserted as i32)
            .filter_map(|e| e.sandbox.as_ref().map(|s| s.id.as_str()))
            .collect();
        let deleted: BTreeSet<&str> = events
            .iter()
            .filter(|e| e.kind == pb::sandbox_event::Kind::Deleted as i32)
            .filter_map(|e| e.sandbox.as_ref().map(|s| s.id.as_str()))
            .collect();
        bound
            .keys()
            .filter(|id| !gone_set.contains(id))
            .all(|id| upserted.contains(id.as_str()))
            && gone.iter().all(|id| deleted.contains(id.as_str()))
    })
    .await;
    // No gaps: every sandbox created after the revision is there (checked above), each
    // deleted one as DELETED; nothing from before it; nothing twice.
    assert!(events.iter().all(|e| e.revision > resume_from));
    // Nothing twice: each event for a sandbox differs from the one before it, the first
    // stream's last included (what the client saw before it resumed).
    let unrevisioned = |e: &pb::SandboxEvent| {
        let mut e = e.clone();
        e.revision = 0;
        if let Some(s) = e.sandbox.as_mut() {
            s.revision = 0;
        }
        e
    };
    let mut last: BTreeMap<String, pb::SandboxEvent> = seen
        .iter()
        .filter_map(|e| Some((e.sandbox.as_ref()?.id.clone(), unrevisioned(e))))
        .collect();
    for e in &events {
        let id = e.sandbox.as_ref().expect("sandbox").id.clone();
        let now = unrevisioned(e);
        if let Some(prev) = last.insert(id.clone(), now.clone()) {
            assert_ne!(prev, now, "{id} sent twice unchanged");
        }
    }
    for id in &gone {
        assert_eq!(
            last[id].kind,
            pb::sandbox_event::Kind::Deleted as i32,
            "{id}: its last word is DELETED"
        );
    }

    drop(emulator);
    cluster.kill(leader);
}
