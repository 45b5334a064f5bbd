//! `berth agent` processes (process runtime, static 8×H100 inventory) against a real
//! three-replica scheduler cluster with a short TTL and disconnect grace, and the polling
//! helpers the agent tests share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

/// Silence after which a node is Down.
pub(crate) const TTL_MS: u64 = 1_500;
/// How long a Down node's sandboxes stay Unknown before they are Lost.
pub(crate) const GRACE_MS: u64 = 4_000;

fn cluster(dir: &Path) -> LocalCluster {
    let mut cfg = LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth"));
    cfg.extra = format!(
        "[scheduler.liveness]\nheartbeat_interval_ms = 250\nnode_ttl_ms = {TTL_MS}\n\
         leader_grace_ms = {TTL_MS}\nnode_disconnect_grace_ms = {GRACE_MS}\n"
    );
    LocalCluster::start(cfg, dir).expect("start the cluster")
}

/// A cluster with a leader, a client of it, and a started agent for `node`.
pub(crate) async fn cluster_with_agent(
    dir: &Path,
    node: &str,
) -> (LocalCluster, Client, AgentProcess) {
    let mut cluster = cluster(dir);
    cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .expect("a leader");
    let client = cluster.client();
    let mut agent = AgentProcess::new(dir, node, &cluster);
    agent.start();
    (cluster, client, agent)
}

/// A `berth agent` process for one node with a static 8×H100 inventory.
pub(crate) struct AgentProcess {
    config: PathBuf,
    log: PathBuf,
    pub(crate) state_dir: PathBuf,
    child: Option<Child>,
}

impl AgentProcess {
    pub(crate) fn new(dir: &Path, node: &str, cluster: &LocalCluster) -> AgentProcess {
        let schedulers = cluster.endpoints();
        let tls = match cluster.pki() {
            None => "[agent.tls]\ninsecure = true\n".to_string(),
            Some(pki) => {
                let s = pki
                    .issue(&format!("node/{node}"))
                    .expect("node certificate");
                format!(
                    "[agent.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                    s.ca, s.cert, s.key
                )
            }
        };
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
                 runtime = \"process\"\nstate_dir = {:?}\nreserved_cpu_milli = 0\nreserved_memory_mib = 0\n{tls}",
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

    pub(crate) fn start(&mut self) {
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
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`pause`) or SIGCONT: the agent freezes with its connections open, as a
    /// starved or suspended one does; its sandboxes' shims run on.
    pub(crate) fn pause(&self, pause: bool) {
        use nix::sys::signal::{Signal, kill};
        let signal = if pause {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        if let Some(c) = &self.child {
            kill(nix::unistd::Pid::from_raw(c.id() as i32), signal).expect("signal the agent");
        }
    }

    /// Makes the agent start without a certificate and obtain one with the join token
    /// `token` (its certificate and key files are removed; `join_token_file` is set).
    /// Returns the certificate's path.
    pub(crate) fn join_with(&self, token: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).expect("agent config");
        let table: toml::Table = toml::from_str(&text).expect("agent config toml");
        let tls = &table["agent"]["tls"];
        let cert = PathBuf::from(tls["cert"].as_str().expect("agent.tls.cert"));
        let _ = std::fs::remove_file(&cert);
        let _ = std::fs::remove_file(tls["key"].as_str().expect("agent.tls.key"));
        let token_file = self.config.with_extension("join-token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");
        let text = text.replacen(
            "[agent.tls]",
            &format!(
                "join_token_file = {:?}\n[agent.tls]",
                token_file.display().to_string()
            ),
            1,
        );
        std::fs::write(&self.config, text).expect("agent config");
        cert
    }

    /// Waits for the agent process to exit on its own; its status, if within `within`.
    pub(crate) fn wait_exit(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        let child = self.child.as_mut()?;
        while started.elapsed() < within {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// Runs the agent's sandboxes under gVisor instead of as plain processes.
    pub(crate) fn use_gvisor(&self) {
        let text = std::fs::read_to_string(&self.config).expect("agent config");
        let text = text.replacen("runtime = \"process\"", "runtime = \"gvisor\"", 1);
        std::fs::write(&self.config, text).expect("agent config");
    }

    /// The directory of a sandbox in the agent's state.
    pub(crate) fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandboxes").join(id)
    }

    pub(crate) fn log_tail(&self) -> String {
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

pub(crate) async fn nodes(client: &mut Client) -> Vec<pb::Node> {
    client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("list nodes")
        .nodes
}

pub(crate) async fn node(client: &mut Client, id: &str) -> Option<pb::Node> {
    nodes(client)
        .await
        .into_iter()
        .find(|n| n.inventory.as_ref().is_some_and(|i| i.node_id == id))
}

/// Milli-GPU allocated on a node, summed over its GPUs.
pub(crate) fn gpu_milli_allocated(node: &pb::Node) -> u32 {
    node.gpu_allocations.iter().map(|a| a.allocated_milli).sum()
}

/// Waits until node `id` is in `status`, and returns it.
pub(crate) async fn node_in(
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
pub(crate) async fn wait_for<T, F, Fut>(
    limit: Duration,
    what: &str,
    agent: &AgentProcess,
    mut check: F,
) -> T
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

pub(crate) fn state(s: &pb::Sandbox) -> pb::SandboxState {
    s.status
        .as_ref()
        .and_then(|st| pb::SandboxState::try_from(st.state).ok())
        .unwrap_or(pb::SandboxState::Unspecified)
}

pub(crate) fn sandbox_spec(gpu: &str, command: &[&str]) -> pb::SandboxSpec {
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

/// Creates a sandbox and returns its id.
pub(crate) async fn create(client: &mut Client, request_id: &str, spec: pb::SandboxSpec) -> String {
    client
        .create(request_id, spec)
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id
}

/// Waits (up to 20 s) until sandbox `id` is in `want`, and returns it.
pub(crate) async fn sandbox_in(
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
