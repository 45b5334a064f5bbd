//! The agent loop: register with the scheduler leader, heartbeat, run what it assigns, and
//! report how each sandbox ends.
//!
//! One session is one `NodeService.Connect` stream to the replica that leads. A session
//! starts with `Register` (inventory, and every sandbox found in the state directory with
//! its state), so a restarted agent re-adopts sandboxes that kept running under their
//! shims; the scheduler answers with the node's new epoch and the sandboxes it no longer
//! wants. After that the agent re-sends the status of everything it has (reports are
//! idempotent), heartbeats, and reconciles: an assignment it already has is not started
//! twice, a termination of something already finished is a no-op. When the stream breaks
//! or the replica stops leading, the agent reconnects, following the leader hint, with
//! capped exponential backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_net::NetConfig;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_server::AgentServiceServer;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;

use crate::config::{AgentConfig, RuntimeKind};
use crate::inventory::{self, GpuSource};
use crate::logs::Logs;
use crate::runtime::{ExitRecord, Launch, LocalState, Outcome, Runtime, cgroup_v2, unix_ms};

/// Finished sandboxes whose output is kept (for `berth sandbox logs`), newest first.
const MAX_FINISHED_KEPT: usize = 1_000;
/// How long a finished sandbox's output is kept.
const FINISHED_RETENTION: Duration = Duration::from_secs(3_600);
/// How often the agent looks at its sandboxes.
const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// Grace period for sandboxes the scheduler does not know.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// How the agent process is wired (what the config file does not say).
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The config file's folder (relative paths resolve against it).
    pub config_dir: PathBuf,
    /// The program and arguments that run the shim on a sandbox directory.
    pub shim: Vec<OsString>,
    /// On shutdown, stop every sandbox too (`berth dev`); a production agent leaves them
    /// running for the next agent to re-adopt.
    pub stop_sandboxes_on_exit: bool,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configured runtime is not usable here.
    #[error("{0}")]
    Runtime(String),
    /// The inventory could not be read.
    #[error("inventory: {0}")]
    Inventory(#[from] inventory::InventoryError),
    /// Local I/O (state directory, listener).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Looks for an executable on PATH (or at a path).
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    cfg: AgentConfig,
    opts: AgentOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    if cfg.runtime == RuntimeKind::Gvisor && find_program(&cfg.runsc_path).is_none() {
        return Err(AgentError::Runtime(format!(
            "agent.runtime = \"gvisor\" but agent.runsc_path {:?} was not found; install gVisor \
             (apt-get install runsc) or set runtime = \"process\" (no isolation)",
            cfg.runsc_path
        )));
    }
    if let Err(why) = cgroup_v2() {
        tracing::warn!("{why}");
    }
    // Like the scheduler's data_dir, relative to the working directory.
    let state_dir = PathBuf::from(&cfg.state_dir);
    let runtime = Runtime::new(state_dir.join("sandboxes"), opts.shim.clone())
        .map_err(io_error(format!("state_dir {}", state_dir.display())))?;
    let mut gpus = GpuSource::open(&cfg, &opts.config_dir);
    let inventory = gpus.read()?;

    let listener = tokio::net::TcpListener::bind(&cfg.listen_address)
        .await
        .map_err(io_error(format!("listen_address {}", cfg.listen_address)))?;
    let bound: SocketAddr = listener.local_addr().map_err(io_error("listen_address"))?;
    let advertised = if cfg.advertise_address.is_empty() {
        bound.to_string()
    } else {
        cfg.advertise_address.clone()
    };
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        berth_net::server(&NetConfig::agent_server())
            .add_service(AgentServiceServer::new(Logs::new(runtime.clone())))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_stopped.await;
            }),
    );
    tracing::info!(
        node = %cfg.node_id,
        runtime = ?cfg.runtime,
        gpus = inventory.gpus.len(),
        inventory = %inventory.source.as_str(),
        logs = %advertised,
        "agent started"
    );
    let mut agent = Agent {
        inventory: inventory::to_pb(&cfg, &inventory, &advertised),
        cfg,
        gpus,
        runtime,
        doomed: BTreeSet::new(),
        sequence: 0,
        last_scan: BTreeMap::new(),
    };
    tokio::pin!(shutdown);
    let mut endpoint = 0usize;
    let mut hint: Option<String> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let target = hint
            .take()
            .unwrap_or_else(|| agent.cfg.schedulers[endpoint % agent.cfg.schedulers.len()].clone());
        let started = Instant::now();
        let end = tokio::select! {
            () = &mut shutdown => SessionEnd::Shutdown,
            end = agent.session(&target) => end,
        };
        match end {
            SessionEnd::Shutdown => break,
            SessionEnd::NotLeader(Some(leader)) if leader != target => {
                tracing::info!(%target, %leader, "following the leader hint");
                hint = Some(leader);
                continue;
            }
            SessionEnd::NotLeader(_) => {
                endpoint += 1;
            }
            SessionEnd::Broken(why) => {
                tracing::warn!(scheduler = %target, %why, "scheduler session ended; reconnecting");
                endpoint += 1;
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_MIN;
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    if opts.stop_sandboxes_on_exit {
        agent.stop_everything().await;
    }
    let _ = stop_server.send(());
    let _ = server.await;
    tracing::info!(node = %agent.cfg.node_id, "agent stopped");
    Ok(())
}

enum SessionEnd {
    Shutdown,
    NotLeader(Option<String>),
    Broken(String),
}

struct Agent {
    cfg: AgentConfig,
    gpus: GpuSource,
    inventory: pb::NodeInventory,
    runtime: Runtime,
    /// Sandboxes the scheduler no longer has: their directories go once they end.
    doomed: BTreeSet<String>,
    sequence: u64,
    /// The previous look at the sandboxes (finished ones are not read again).
    last_scan: BTreeMap<String, crate::runtime::LocalSandbox>,
}

fn channel(address: &str) -> Result<Channel, berth_net::NetError> {
    berth_net::channel(address, &NetConfig::agent())
}

fn message(m: pb::agent_message::Message) -> pb::AgentMessage {
    pb::AgentMessage { message: Some(m) }
}

/// A sandbox's local state as a status report (state, exit code, reason).
fn report_of(state: &LocalState) -> (pb::SandboxState, i32, String) {
    match state {
        LocalState::Running => (pb::SandboxState::Running, 0, String::new()),
        LocalState::Finished(ExitRecord {
            outcome: Outcome::Exited { code },
            ..
        }) => (pb::SandboxState::Exited, *code, String::new()),
        LocalState::Finished(ExitRecord {
            outcome: Outcome::Failed { reason },
            ..
        }) => (pb::SandboxState::Failed, 0, reason.clone()),
    }
}

fn status_message(id: &str, state: &LocalState) -> pb::AgentMessage {
    let (state, exit_code, reason) = report_of(state);
    message(pb::agent_message::Message::SandboxStatus(
        pb::SandboxStatusUpdate {
            sandbox_id: id.to_owned(),
            state: state as i32,
            exit_code,
            reason,
            at_unix_ms: unix_ms(),
        },
    ))
}

impl Agent {
    /// The launch record of an assignment.
    fn launch_of(&self, sandbox: &pb::Sandbox, epoch: u64) -> Launch {
        let spec = sandbox.spec.clone().unwrap_or_default();
        let resources = spec.resources.clone().unwrap_or_default();
        let gpu_uuids = sandbox
            .status
            .as_ref()
            .map(|s| s.gpu_uuids.clone())
            .unwrap_or_default();
        Launch {
            sandbox_id: sandbox.id.clone(),
            epoch,
            command: spec.command,
            env: spec.env.into_iter().collect(),
            gpu_uuids,
            cpu_milli: resources.cpu_milli,
            memory_mib: resources.memory_mib,
            timeout_ms: spec.timeout_ms,
            network: spec.network,
            runtime: self.cfg.runtime,
            runsc_path: self.cfg.runsc_path.clone(),
            runsc_platform: self.cfg.runsc_platform.clone(),
            max_output_bytes: self.cfg.max_output_bytes,
        }
    }

    async fn session(&mut self, target: &str) -> SessionEnd {
        let channel = match channel(target) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Broken(e.to_string()),
        };
        let local = self.runtime.scan_cached(&self.last_scan);
        let running = local
            .iter()
            .map(|(id, s)| {
                let (state, exit_code, reason) = report_of(&s.state);
                pb::ObservedSandbox {
                    sandbox_id: id.clone(),
                    state: state as i32,
                    exit_code,
                    reason,
                    epoch: s.launch.epoch,
                }
            })
            .collect();
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1_024);
        let register = message(pb::agent_message::Message::Register(pb::Register {
            inventory: Some(self.inventory.clone()),
            running,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }));
        if tx.send(register).await.is_err() {
            return SessionEnd::Broken("internal channel closed".into());
        }
        let mut client = NodeServiceClient::new(channel);
        let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return SessionEnd::Broken(status.to_string()),
        };
        let ack = match inbound.next().await {
            Some(Ok(pb::SchedulerMessage {
                message: Some(pb::scheduler_message::Message::RegisterAck(ack)),
            })) => ack,
            Some(Ok(pb::SchedulerMessage {
                message: Some(pb::scheduler_message::Message::NotLeader(nl)),
            })) => {
                return SessionEnd::NotLeader(
                    (!nl.leader_address.is_empty()).then_some(nl.leader_address),
                );
            }
            Some(Ok(_)) => return SessionEnd::Broken("unexpected first message".into()),
            Some(Err(status)) => return SessionEnd::Broken(status.to_string()),
            None => return SessionEnd::Broken("the scheduler closed the stream".into()),
        };
        let epoch = ack.epoch;
        tracing::info!(
            scheduler = %target,
            epoch,
            readopted = local.values().filter(|s| s.state == LocalState::Running).count(),
            stop = ack.stop_sandbox_ids.len(),
            "registered"
        );
        for id in &ack.stop_sandbox_ids {
            tracing::info!(sandbox = %id, "the scheduler does not have this sandbox; stopping it");
            if let Err(e) = self
                .runtime
                .terminate(id, STOP_GRACE, "the scheduler no longer has it")
            {
                tracing::warn!(sandbox = %id, error = %e, "could not stop sandbox");
            }
            self.doomed.insert(id.clone());
        }
        // Everything else: tell the new session where it stands (idempotent).
        let mut reported: BTreeMap<String, LocalState> = BTreeMap::new();
        for (id, s) in &local {
            if self.doomed.contains(id) {
                continue;
            }
            if tx.send(status_message(id, &s.state)).await.is_err() {
                return SessionEnd::Broken("the stream closed".into());
            }
            reported.insert(id.clone(), s.state.clone());
        }
        let heartbeat_every = Duration::from_millis(ack.heartbeat_interval_ms.clamp(50, 60_000));
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut monitor = tokio::time::interval(MONITOR_EVERY);
        monitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let refresh_every = Duration::from_secs(self.cfg.inventory_refresh_s.max(1));
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    self.sequence += 1;
                    let hb = message(pb::agent_message::Message::Heartbeat(pb::Heartbeat {
                        epoch,
                        sequence: self.sequence,
                    }));
                    if tx.send(hb).await.is_err() {
                        return SessionEnd::Broken("the stream closed".into());
                    }
                }
                _ = monitor.tick() => {
                    for m in self.monitor(&mut reported) {
                        if tx.send(m).await.is_err() {
                            return SessionEnd::Broken("the stream closed".into());
                        }
                    }
                }
                _ = refresh.tick() => {
                    if let Some(m) = self.refresh_inventory() {
                        if tx.send(m).await.is_err() {
                            return SessionEnd::Broken("the stream closed".into());
                        }
                    }
                }
                next = inbound.next() => {
                    let m = match next {
                        Some(Ok(m)) => m,
                        Some(Err(status)) => return SessionEnd::Broken(status.to_string()),
                        None => return SessionEnd::Broken("the scheduler closed the stream".into()),
                    };
                    match m.message {
                        Some(pb::scheduler_message::Message::Assign(assign)) => {
                            let Some(sandbox) = assign.sandbox else { continue };
                            if let Some(reply) = self.assign(&sandbox, assign.epoch, &mut reported) {
                                if tx.send(reply).await.is_err() {
                                    return SessionEnd::Broken("the stream closed".into());
                                }
                            }
                        }
                        Some(pb::scheduler_message::Message::Terminate(t)) => {
                            let grace = Duration::from_millis(if t.grace_ms == 0 { 10_000 } else { t.grace_ms.min(600_000) });
                            if let Err(e) = self.runtime.terminate(&t.sandbox_id, grace, &t.reason) {
                                tracing::warn!(sandbox = %t.sandbox_id, error = %e, "could not stop sandbox");
                            }
                            self.doomed.insert(t.sandbox_id);
                        }
                        Some(pb::scheduler_message::Message::NotLeader(nl)) => {
                            return SessionEnd::NotLeader((!nl.leader_address.is_empty()).then_some(nl.leader_address));
                        }
                        Some(pb::scheduler_message::Message::RegisterAck(_)) | None => {}
                    }
                }
            }
        }
    }

    /// Starts an assigned sandbox (once) and says so.
    fn assign(
        &mut self,
        sandbox: &pb::Sandbox,
        epoch: u64,
        reported: &mut BTreeMap<String, LocalState>,
    ) -> Option<pb::AgentMessage> {
        let launch = self.launch_of(sandbox, epoch);
        match self.runtime.start(&launch) {
            Ok(started) => {
                if started {
                    tracing::info!(
                        sandbox = %sandbox.id,
                        gpus = launch.gpu_uuids.len(),
                        runtime = ?launch.runtime,
                        "sandbox started"
                    );
                }
                if reported.contains_key(&sandbox.id) {
                    return None;
                }
                reported.insert(sandbox.id.clone(), LocalState::Running);
                Some(status_message(&sandbox.id, &LocalState::Running))
            }
            Err(e) => {
                tracing::warn!(sandbox = %sandbox.id, error = %e, "could not start sandbox");
                let state = LocalState::Finished(ExitRecord {
                    outcome: Outcome::Failed {
                        reason: format!("the agent could not start it: {e}"),
                    },
                    finished_unix_ms: unix_ms(),
                    stdout_truncated: false,
                    stderr_truncated: false,
                });
                reported.insert(sandbox.id.clone(), state.clone());
                Some(status_message(&sandbox.id, &state))
            }
        }
    }

    /// Reports sandboxes that ended, and cleans up what is no longer needed.
    fn monitor(&mut self, reported: &mut BTreeMap<String, LocalState>) -> Vec<pb::AgentMessage> {
        let mut out = Vec::new();
        let local = self.runtime.scan_cached(&self.last_scan);
        let mut finished: Vec<(u64, &String)> = Vec::new();
        for (id, s) in &local {
            if let LocalState::Finished(record) = &s.state {
                if self.doomed.contains(id) {
                    if let Err(e) = self.runtime.remove(id) {
                        tracing::warn!(sandbox = %id, error = %e, "could not remove sandbox directory");
                    }
                    continue;
                }
                finished.push((record.finished_unix_ms, id));
            }
            if reported.get(id) != Some(&s.state) && !self.doomed.contains(id) {
                if let LocalState::Finished(record) = &s.state {
                    tracing::info!(sandbox = %id, outcome = ?record.outcome, "sandbox ended");
                }
                out.push(status_message(id, &s.state));
                reported.insert(id.clone(), s.state.clone());
            }
        }
        self.doomed.retain(|id| local.contains_key(id));
        self.last_scan = local.clone();
        // Keep the newest finished sandboxes' output for a while.
        finished.sort_unstable_by(|a, b| b.cmp(a));
        let now = unix_ms();
        for (i, (at, id)) in finished.into_iter().enumerate() {
            let old = now.saturating_sub(at) > FINISHED_RETENTION.as_millis() as u64;
            if i >= MAX_FINISHED_KEPT || old {
                let _ = self.runtime.remove(id);
                reported.remove(id);
            }
        }
        out
    }

    /// Re-reads the inventory; a message when it changed.
    fn refresh_inventory(&mut self) -> Option<pb::AgentMessage> {
        let fresh = match self.gpus.read() {
            Ok(inv) => inv,
            Err(e) => {
                tracing::warn!(error = %e, "inventory refresh failed; keeping the last one");
                return None;
            }
        };
        let pb = inventory::to_pb(&self.cfg, &fresh, &self.inventory.agent_address);
        if pb == self.inventory {
            return None;
        }
        tracing::info!("inventory changed; re-registering it");
        self.inventory = pb.clone();
        Some(message(pb::agent_message::Message::Inventory(
            pb::InventoryUpdate {
                inventory: Some(pb),
            },
        )))
    }

    /// Stops every sandbox and waits (bounded) for them to end.
    async fn stop_everything(&self) {
        let local = self.runtime.scan();
        let running: Vec<&String> = local
            .iter()
            .filter(|(_, s)| s.state == LocalState::Running)
            .map(|(id, _)| id)
            .collect();
        if running.is_empty() {
            return;
        }
        tracing::info!(count = running.len(), "stopping sandboxes");
        for id in &running {
            let _ =
                self.runtime
                    .terminate(id, Duration::from_secs(2), "the agent is shutting down");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let still = self
                .runtime
                .scan()
                .values()
                .filter(|s| s.state == LocalState::Running)
                .count();
            if still == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
