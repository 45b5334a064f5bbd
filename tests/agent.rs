//! Node agents as real processes against a real three-replica scheduler cluster: liveness
//! (a killed agent's node goes Down, its sandboxes Lost, its GPUs unused until it
//! re-registers) and re-adoption (an agent restarted while a sandbox runs picks it up
//! again; the sandbox runs once and its final status arrives).
//!
//! Agents here use the `process` runtime so the tests are about the agent, not gVisor;
//! `tests/dev.rs` runs sandboxes under runsc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

const TTL_MS: u64 = 1_500;

fn cluster(dir: &Path) -> LocalCluster {
    let mut cfg = LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth"));
    cfg.extra = format!(
        "[scheduler.liveness]\nheartbeat_interval_ms = 250\nnode_ttl_ms = {TTL_MS}\nleader_grace_ms = {TTL_MS}\n"
    );
    LocalCluster::start(cfg, dir).expect("start the cluster")
}

/// A cluster with a leader, a client of it, and a started agent for `node`.
async fn cluster_with_agent(dir: &Path, node: &str) -> (LocalCluster, Client, AgentProcess) {
    let mut cluster = cluster(dir);
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a leader");
    let client = cluster.client();
    let mut agent = AgentProcess::new(dir, node, &cluster.endpoints());
    agent.start();
    (cluster, client, agent)
}

/// A `berth agent` process for one node with a static 8×H100 inventory.
struct AgentProcess {
    config: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    fn new(dir: &Path, node: &str, schedulers: &[String]) -> AgentProcess {
        let inventory = dir.join("8xh100.toml");
        std::fs::write(
            &inventory,
            "[[gpus]]\nproduct_name = \"NVIDIA H100 80GB HBM3\"\ncount = 8\n",
        )
        .expect("inventory");
        let state_dir = dir.join(format!("agent-{node}"));
        let config = dir.join(format!("agent-{node}.toml"));
        let list: Vec<String> = schedulers.iter().map(|s| format!("{s:?}")).collect();
        std::fs::write(
            &config,
            format!(
                "[agent]\nnode_id = {node:?}\nschedulers = [{}]\nprovider = \"aws\"\nregion = \"us-east-1\"\n\
                 instance_type = \"p5.48xlarge\"\ninventory = {{ static = \"8xh100.toml\" }}\n\
                 runtime = \"process\"\nstate_dir = {:?}\nreserved_cpu_milli = 0\nreserved_memory_mib = 0\n",
                list.join(", "),
                state_dir.display().to_string(),
            ),
        )
        .expect("agent config");
        AgentProcess {
            log: dir.join(format!("agent-{node}.log")),
            config,
            state_dir,
            child: None,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["--log-level", "info", "agent", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the agent");
        self.child = Some(child);
    }

    /// `kill -9`: the agent dies, the sandboxes' shims do not.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
        // Stop sandboxes left running by a killed agent.
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("sandboxes")) {
            for e in entries.flatten() {
                let _ = std::fs::write(e.path().join("terminate"), "0\ntest over\n");
            }
        }
    }
}

async fn nodes(client: &mut Client) -> Vec<pb::Node> {
    client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .nodes
}

async fn node(client: &mut Client, id: &str) -> Option<pb::Node> {
    nodes(client)
        .await
        .into_iter()
        .find(|n| n.inventory.as_ref().is_some_and(|i| i.node_id == id))
}

/// Waits until node `id` is in `status`, and returns it.
async fn node_in(
    client: &Client,
    id: &str,
    status: pb::NodeStatus,
    limit: Duration,
    agent: &AgentProcess,
) -> pb::Node {
    wait_for(limit, &format!("node {id} {status:?}"), agent, || {
        let mut client = client.clone();
        async move {
            node(&mut client, id)
                .await
                .filter(|n| n.status == status as i32)
        }
    })
    .await
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
async fn wait_for<T, F, Fut>(limit: Duration, what: &str, agent: &AgentProcess, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < limit,
            "{what} within {limit:?}; agent log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state(s: &pb::Sandbox) -> pb::SandboxState {
    s.status
        .as_ref()
        .and_then(|st| pb::SandboxState::try_from(st.state).ok())
        .unwrap_or(pb::SandboxState::Unspecified)
}

fn sandbox_spec(gpu: &str, command: &[&str]) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "acme".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        resources: Some(pb::Resources {
            cpu_milli: 1_000,
            memory_mib: 512,
            gpu: Some(pb::GpuRequest {
                options: vec![gpu.into()],
                min_memory_mib: 0,
            }),
        }),
        ..Default::default()
    }
}

async fn sandbox_in(
    client: &mut Client,
    id: &str,
    want: pb::SandboxState,
    agent: &AgentProcess,
) -> pb::Sandbox {
    let id = id.to_owned();
    wait_for(
        Duration::from_secs(20),
        &format!("sandbox {id} {want:?}"),
        agent,
        || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let s = client.get(&id).await.ok()?;
                (state(&s) == want).then_some(s)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_is_marked_down_and_its_gpus_wait_for_it_to_reregister() {
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
    eprintln!(
        "node down {} ms after the kill (ttl {TTL_MS} ms): {}",
        killed.elapsed().as_millis(),
        down.status_reason
    );
    assert!(down.status_reason.contains("no heartbeat"), "{down:?}");
    let lost = sandbox_in(&mut client, &big, pb::SandboxState::Lost, &agent).await;
    let reason = lost.status.expect("status").reason;
    assert!(reason.contains("h100-a"), "{reason}");

    // Its GPUs are free in the books, but the node is Down: nothing is placed there.
    let waiting = client
        .create("after", sandbox_spec("H100:1", &["echo", "placed"]))
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    tokio::time::sleep(Duration::from_secs(1)).await;
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
    let old = agent.state_dir.join("sandboxes").join(&big);
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
