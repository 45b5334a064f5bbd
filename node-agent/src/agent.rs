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

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_net::{NetConfig, Tls};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_server::AgentServiceServer;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;

use crate::assignment::Assignments;
use crate::config::{AgentConfig, RuntimeKind};
use crate::image::{ImageSettings, ImageStore};
use crate::inventory::{self, GpuSource};
use crate::metrics::AgentMetrics;
use crate::monitor::Monitor;
use crate::reports::{Reports, StreamClosed, message, report_of};
use crate::runtime::{LocalState, PauseMode, Runtime};
use crate::service::AgentApi;
use crate::snapshot::{SnapshotSettings, Snapshots};
use crate::standby::StandbyWorker;
use crate::starter::Starter;

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
    if let Err(why) = crate::cgroups::detect().and_then(|h| crate::cgroups::writable(&h)) {
        tracing::warn!("{why}");
    }
    // Like the scheduler's data_dir, relative to the working directory.
    let state_dir = PathBuf::from(&cfg.state_dir);
    let runtime = Runtime::new(state_dir.join("sandboxes"), opts.shim.clone())
        .map_err(io_error(format!("state_dir {}", state_dir.display())))?;
    let sandboxd_dir = crate::sandboxd::install(&state_dir)
        .map(Some)
        .map_err(io_error(format!(
            "state_dir {}: installing berth-sandboxd",
            state_dir.display()
        )))?;
    let assignments = Assignments::new(&cfg, sandboxd_dir).await;
    let run_dir = PathBuf::from(&cfg.network.run_dir);
    tokio::task::spawn_blocking(move || {
        let n = crate::network::sweep_stale(&run_dir);
        if n > 0 {
            tracing::info!(
                slots = n,
                "took back sandbox network slots whose shims are gone"
            );
        }
    });
    let tls = crate::identity::prepare(&cfg).await?;
    let renewal = tls.clone().map(|t| crate::identity::spawn_renewal(&cfg, t));
    let metrics = Arc::new(AgentMetrics::new());
    let images = ImageStore::open(
        ImageSettings {
            dir: cfg.image_cache_path(),
            max_bytes: cfg.image_cache_max_bytes,
            max_concurrent_pulls: cfg.max_concurrent_pulls,
            registries: cfg.registries_resolved(&opts.config_dir),
        },
        metrics.clone(),
    )
    .map_err(io_error(format!(
        "image_cache_dir {}",
        cfg.image_cache_path().display()
    )))?;
    let snapshots = Snapshots::new(
        runtime.clone(),
        images.clone(),
        SnapshotSettings {
            repository: cfg.snapshot_repository.clone(),
            max_bytes: cfg.snapshot_max_bytes,
            work_dir: cfg.image_cache_path().join("snapshot-work"),
        },
    );
    let mut gpus = GpuSource::open(&cfg, &opts.config_dir);
    let inventory = gpus.read()?;
    let metrics_server = if cfg.metrics_address.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.metrics_address)
            .await
            .map_err(io_error(format!("metrics_address {}", cfg.metrics_address)))?;
        tracing::info!(node = %cfg.node_id, address = %listener.local_addr().map_err(io_error("metrics_address"))?, "agent metrics on /metrics");
        let registry = metrics.registry().clone();
        Some(tokio::spawn(berth_net::metrics_http::serve(
            registry, listener,
        )))
    };

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
            .add_service(InterceptedService::new(
                AgentServiceServer::new(AgentApi::new(runtime.clone(), snapshots)),
                replicas_only(tls.clone()),
            ))
            .serve_with_incoming_shutdown(berth_net::incoming(listener, tls.clone()), async move {
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
    let monitor = Monitor::start(runtime.clone(), images.clone()).await;
    let starter = Starter::new(
        runtime.clone(),
        images.clone(),
        metrics.clone(),
        cfg.max_concurrent_starts,
    )
    .nudging(monitor.nudger());
    let inventory =
        crate::inventory_feed::spawn(&cfg, gpus, inventory, &advertised, images.clone());
    let usage = crate::usage::spawn(
        runtime.clone(),
        &monitor,
        metrics.clone(),
        Duration::from_millis(cfg.usage_interval_ms),
    );
    let standby = StandbyWorker::spawn(runtime.clone(), monitor.nudger());
    let mut agent = Agent {
        cfg,
        inventory,
        standby,
        runtime,
        starter,
        monitor,
        metrics,
        sequence: 0,
        last_heartbeat: None,
        assignments,
        usage,
        tls,
        reports: Reports::default(),
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
            () = tokio::time::sleep(jittered(backoff)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    if opts.stop_sandboxes_on_exit {
        agent.stop_everything().await;
    }
    let _ = stop_server.send(());
    let _ = server.await;
    if let Some(r) = renewal {
        r.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    tracing::info!(node = %agent.cfg.node_id, "agent stopped");
    Ok(())
}

enum SessionEnd {
    Shutdown,
    NotLeader(Option<String>),
    Broken(String),
}

impl From<StreamClosed> for SessionEnd {
    fn from(_: StreamClosed) -> SessionEnd {
        SessionEnd::Broken("the stream closed".into())
    }
}

struct Agent {
    cfg: AgentConfig,
    /// The node's inventory as it should be registered (GPUs, cached images).
    inventory: watch::Receiver<pb::NodeInventory>,
    runtime: Runtime,
    starter: Starter,
    monitor: Monitor,
    metrics: Arc<AgentMetrics>,
    sequence: u64,
    last_heartbeat: Option<Instant>,
    /// What an assignment becomes.
    assignments: Assignments,
    /// Each interval's usage figures, from [`crate::usage`].
    usage: watch::Receiver<Vec<pb::SandboxUsage>>,
    /// This node's certificate (`None`: insecure).
    tls: Option<Tls>,
    /// What was said of failed pauses.
    reports: Reports,
    /// Freezes and thaws, in order, off the session loop.
    standby: StandbyWorker,
}

/// The agent's own server (logs, exec, files) takes only replicas of its cluster: they
/// have already checked the tenant.
fn replicas_only(
    tls: Option<Tls>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request: tonic::Request<()>| {
        let Some(tls) = &tls else {
            return Ok(request);
        };
        let own = tls.identity();
        match request
            .extensions()
            .get::<berth_net::PeerInfo>()
            .and_then(|p| p.identity.clone())
        {
            Some(id)
                if matches!(id.role, berth_net::Role::Replica(_))
                    && id.trust_domain == own.trust_domain =>
            {
                Ok(request)
            }
            Some(id) => Err(tonic::Status::permission_denied(format!(
                "{id} may not call this node's agent; only replicas of cluster {:?} may",
                own.trust_domain
            ))),
            None => Err(tonic::Status::unauthenticated(
                "the node agent needs a replica's client certificate",
            )),
        }
    }
}

/// A wait drawn from [backoff / 2, backoff]: a whole fleet that lost its leader at once
/// reconnects spread out rather than in one wave.
fn jittered(backoff: Duration) -> Duration {
    use std::hash::BuildHasher;
    let draw = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    backoff / 2 + backoff.mul_f64((draw % 1_000) as f64 / 2_000.0)
}

fn channel(address: &str, tls: Option<&Tls>) -> Result<Channel, berth_net::NetError> {
    berth_net::channel(
        address,
        &NetConfig::agent().with_tls(tls, berth_net::Expect::AnyReplica),
    )
}

impl Agent {
    async fn session(&mut self, target: &str) -> SessionEnd {
        let channel = match channel(target, self.tls.as_ref()) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Broken(e.to_string()),
        };
        let local = self.monitor.current();
        let running = local
            .iter()
            .map(|(id, s)| {
                let r = report_of(id, &s.state);
                pb::ObservedSandbox {
                    sandbox_id: id.clone(),
                    state: r.state,
                    exit_code: r.exit_code,
                    reason: r.reason,
                    epoch: s.launch.epoch,
                    snapshot_bytes: r.snapshot_bytes,
                    snapshot_filesystem_only: r.snapshot_filesystem_only,
                }
            })
            .collect();
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1_024);
        let mut inventory = self.inventory.clone();
        let register = message(pb::agent_message::Message::Register(pb::Register {
            inventory: Some(inventory.borrow_and_update().clone()),
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
            readopted = local.values().filter(|s| s.state.runs()).count(),
            stop = ack.stop_sandbox_ids.len(),
            "registered"
        );
        for id in &ack.stop_sandbox_ids {
            tracing::info!(sandbox = %id, "the scheduler does not have this sandbox; stopping it");
            self.stop(id, STOP_GRACE, "the scheduler no longer has it");
        }
        // Everything else: tell the new session where it stands (idempotent).
        let mut sent: BTreeMap<String, LocalState> = BTreeMap::new();
        let mut snapshots = self.monitor.subscribe();
        let first = snapshots.borrow_and_update().clone();
        if let Err(end) = self
            .reports
            .send_changes(&self.monitor, &tx, &first, &mut sent)
            .await
            .map_err(SessionEnd::from)
        {
            return end;
        }
        let heartbeat_every = Duration::from_millis(ack.heartbeat_interval_ms.clamp(50, 60_000));
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        loop {
            tokio::select! {
                biased;
                _ = heartbeat.tick() => {
                    self.sequence += 1;
                    self.note_heartbeat();
                    let hb = message(pb::agent_message::Message::Heartbeat(pb::Heartbeat {
                        epoch,
                        sequence: self.sequence,
                    }));
                    if tx.send(hb).await.is_err() {
                        return SessionEnd::Broken("the stream closed".into());
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
                            match assign.restore {
                                Some(from) => self.resume(&sandbox, assign.epoch, &from, &client),
                                None if !sent.contains_key(&sandbox.id) => {
                                    self.starter.submit(self.assignments.request_of(&sandbox, assign.epoch));
                                }
                                // Assigned again while it is here: on standby, that thaws it,
                                // and its state is reported afresh now. A freeze and thaw
                                // quicker than the monitor's look leave it unchanged there,
                                // and nothing else would report it (the thaw is done, on the
                                // worker, within milliseconds of the report).
                                None => {
                                    self.standby.request(&sandbox.id, false);
                                    sent.remove(&sandbox.id);
                                    let now = self.monitor.current();
                                    if let Err(end) = self.reports.send_changes(&self.monitor, &tx, &now, &mut sent).await.map_err(SessionEnd::from) {
                                        return end;
                                    }
                                }
                            }
                        }
                        Some(pb::scheduler_message::Message::Pause(p)) if p.standby => {
                            self.standby.request(&p.sandbox_id, true);
                        }
                        Some(pb::scheduler_message::Message::Pause(p)) => {
                            let mode = if p.filesystem_only { PauseMode::FilesystemOnly } else { PauseMode::Memory };
                            tracing::info!(sandbox = %p.sandbox_id, mode = mode.as_str(), "pausing");
                            if let Err(e) = self.runtime.pause(&p.sandbox_id, mode) {
                                tracing::warn!(sandbox = %p.sandbox_id, error = %e, "could not ask for a pause");
                            }
                        }
                        Some(pb::scheduler_message::Message::Terminate(t)) => {
                            let grace = Duration::from_millis(if t.grace_ms == 0 { 10_000 } else { t.grace_ms.min(600_000) });
                            self.stop(&t.sandbox_id, grace, &t.reason);
                        }
                        Some(pb::scheduler_message::Message::NotLeader(nl)) => {
                            return SessionEnd::NotLeader((!nl.leader_address.is_empty()).then_some(nl.leader_address));
                        }
                        Some(pb::scheduler_message::Message::Heartbeat(h)) => {
                            // The leader lengthened (or shortened) the interval for the fleet's size.
                            let every = Duration::from_millis(h.interval_ms.clamp(50, 60_000));
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        }
                        Some(pb::scheduler_message::Message::RegisterAck(_)) | None => {}
                    }
                }
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Broken("the monitor stopped".into());
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Err(end) = self.reports.send_changes(&self.monitor, &tx, &snapshot, &mut sent).await.map_err(SessionEnd::from) {
                        return end;
                    }
                }
                changed = self.usage.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let sandboxes = self.usage.borrow_and_update().clone();
                    // Never waits: a report that finds the stream full is dropped, and the
                    // next interval's replaces it.
                    let _ = tx.try_send(message(pb::agent_message::Message::Usage(
                        pb::UsageReport { sandboxes },
                    )));
                }
                changed = inventory.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let fresh = inventory.borrow_and_update().clone();
                    let m = message(pb::agent_message::Message::Inventory(pb::InventoryUpdate {
                        inventory: Some(fresh),
                    }));
                    if tx.send(m).await.is_err() {
                        return SessionEnd::Broken("the stream closed".into());
                    }
                }
            }
        }
    }

    fn note_heartbeat(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last_heartbeat.replace(now) {
            let gap = now - last;
            self.metrics
                .heartbeat_gap_seconds
                .observe(gap.as_secs_f64());
            let ms = gap.as_millis() as i64;
            if ms > self.metrics.heartbeat_gap_max_ms.get() {
                self.metrics.heartbeat_gap_max_ms.set(ms);
            }
        }
    }

    /// Resumes a sandbox from its snapshot: restored here when this node holds it, or
    /// started from the snapshot fetched (through the scheduler) from the node that does.
    fn resume(
        &self,
        sandbox: &pb::Sandbox,
        epoch: u64,
        from: &pb::RestoreFrom,
        client: &NodeServiceClient<Channel>,
    ) {
        let mut request = self.assignments.request_of(sandbox, epoch);
        if from.node_id == self.cfg.node_id {
            self.starter.resume(request.launch);
            return;
        }
        request.snapshot_from = Some(crate::starter::SnapshotSource {
            client: client.clone(),
            node_id: self.cfg.node_id.clone(),
            holder: from.node_id.clone(),
            bytes: from.bytes,
        });
        self.starter.submit(request);
    }

    /// Stops a sandbox wherever it is: waiting to start, or running.
    fn stop(&self, id: &str, grace: Duration, reason: &str) {
        self.starter.cancel(id, reason);
        if let Err(e) = self.runtime.terminate(id, grace, reason) {
            tracing::warn!(sandbox = %id, error = %e, "could not stop sandbox");
        }
        self.monitor.doom(id);
    }

    /// Stops every sandbox and waits (bounded) for them to end.
    async fn stop_everything(&self) {
        let local = self.runtime.scan();
        let running: Vec<&String> = local
            .iter()
            .filter(|(_, s)| s.state.runs())
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
                .filter(|s| s.state.runs())
                .count();
            if still == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
