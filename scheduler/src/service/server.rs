//! Wiring of one scheduler replica: the durable store, the Raft thread, the gRPC server
//! (berth services, gRPC health and reflection) and the `/metrics` endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_net::NetConfig;
use tokio::sync::oneshot;

use berth_proto::pb::v1::admin_service_server::AdminServiceServer;
use berth_proto::pb::v1::node_service_server::NodeServiceServer;
use berth_proto::pb::v1::peer_server::PeerServer;
use berth_proto::pb::v1::sandbox_service_server::SandboxServiceServer;

use tonic::service::interceptor::InterceptedService;

use super::StartError;
use super::api::{AdminApi, NodeApi, PeerApi, SandboxApi, Services};
use super::auth::{Guard, Security};
use super::driver::{self, DriverConfig, ReplicaHandle};
use super::liveness::{self, Liveness, LivenessSettings};
use super::metrics::{self, Metrics};
use super::transport::MAX_PEER_MESSAGE;
use crate::config::{Backend, SchedulerConfig};
use crate::placement::PlacerConfig;
use crate::replication::engine::EngineDisk;
use crate::replication::{Replica, ReplicaConfig, slog_bridge};

/// Largest client message tonic decodes (larger ones get OUT_OF_RANGE from tonic itself);
/// handlers refuse smaller oversized requests with RESOURCE_EXHAUSTED naming the field.
pub use berth_net::MAX_CLIENT_MESSAGE;

/// A running replica.
pub struct Running {
    /// Where gRPC is served.
    pub grpc_address: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_address: SocketAddr,
    /// The replica.
    pub handle: ReplicaHandle,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_task: tokio::task::JoinHandle<std::io::Result<()>>,
    liveness_task: tokio::task::JoinHandle<()>,
    standby_task: tokio::task::JoinHandle<()>,
    retention_task: tokio::task::JoinHandle<()>,
    pools_task: tokio::task::JoinHandle<()>,
    gauges_task: tokio::task::JoinHandle<()>,
    raft: Option<std::thread::JoinHandle<()>>,
    _raft_io: RaftIo,
}

/// The runtime of the Raft transport (the tasks that send to peers): a thread of its own,
/// so heartbeats to followers never wait behind agent streams and API calls on the main
/// runtime ("nothing blocks liveness"; at 10,000 agent streams on 2 cores, sharing the
/// runtime cost leaderships).
struct RaftIo(Option<tokio::runtime::Runtime>);

impl RaftIo {
    fn start(id: u64) -> Result<RaftIo, StartError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raft-io-{id}"))
            .enable_all()
            .build()
            .map_err(io("starting the Raft transport runtime".into()))?;
        Ok(RaftIo(Some(rt)))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for RaftIo {
    fn drop(&mut self) {
        // Dropping a runtime inside another one's task would panic; this does not block.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Running {
    /// Waits until the server stops or the Raft thread fails; returns why.
    pub async fn wait(&mut self) -> Result<(), StartError> {
        loop {
            if let Some(fatal) = self.handle.fatal() {
                return Err(StartError::Stopped(fatal));
            }
            if self.server.is_finished() {
                return Err(StartError::Stopped("the gRPC server stopped".into()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops serving, then stops the Raft thread.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
        self.metrics_task.abort();
        self.liveness_task.abort();
        self.standby_task.abort();
        self.retention_task.abort();
        self.pools_task.abort();
        self.gauges_task.abort();
        self.handle.shutdown();
        if let Some(raft) = self.raft.take() {
            let _ = tokio::task::spawn_blocking(move || raft.join()).await;
        }
    }
}

/// Refreshes the pool gauges (nodes by status, GPUs by model: a pass over the nodes) every
/// second from the applied-state copy, off the Raft thread.
async fn pool_gauges(handle: ReplicaHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let metrics = handle.metrics().clone();
        let _ = handle
            .read(false, move |v| {
                super::metrics::publish_pool(&metrics, v.state)
            })
            .await;
    }
}

/// The replica settings a config implies.
pub fn replica_config(cfg: &SchedulerConfig) -> ReplicaConfig {
    let mut r = ReplicaConfig::new(cfg.node_id);
    r.election_tick = cfg.raft.election_ticks;
    r.heartbeat_tick = cfg.raft.heartbeat_ticks;
    r.snapshot_every_entries = cfg.raft.snapshot_every_entries;
    r.max_inflight_msgs = cfg.raft.max_inflight_messages;
    r.max_size_per_msg = cfg.raft.max_message_bytes;
    r.placer = PlacerConfig {
        policy: cfg.placement.policy,
        allow_gpu_upgrade: cfg.placement.allow_gpu_upgrade,
        image_rule: cfg.placement.image_affinity,
        ..PlacerConfig::default()
    };
    r.placement_seed = cfg.placement.seed;
    r
}

/// An `io::Error` about `what`, for `map_err`.
fn io(what: String) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Io { what, source }
}

/// Starts a replica: opens its data directory, starts Raft, binds and serves gRPC and
/// metrics. Must run inside a tokio runtime.
pub async fn start(cfg: &SchedulerConfig) -> Result<Running, StartError> {
    if cfg.backend == Backend::Etcd {
        return Err(StartError::Config {
            field: "scheduler.backend",
            message: "\"etcd\" is not built yet; use \"raft\" (the embedded default)".into(),
        });
    }
    let tls = berth_net::Tls::load(&cfg.tls).map_err(|e| StartError::Config {
        field: "scheduler.tls",
        message: e.to_string(),
    })?;
    let ca = if cfg.auth.ca_key.is_empty() {
        None
    } else {
        Some(
            berth_net::tls::pki::Ca::load(Path::new(&cfg.tls.ca), Path::new(&cfg.auth.ca_key))
                .map_err(|message| StartError::Config {
                    field: "scheduler.auth.ca_key",
                    message,
                })?,
        )
    };
    match &tls {
        Some(tls) => tls.spawn_reloader(),
        None => tracing::warn!(
            "scheduler.tls.insecure = true: no TLS and NO AUTHENTICATION; anyone who can \
             reach this replica's port is an admin"
        ),
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen_address)
        .await
        .map_err(io(format!(
            "scheduler.listen_address {}",
            cfg.listen_address
        )))?;
    let grpc_address = listener
        .local_addr()
        .map_err(io("scheduler.listen_address".into()))?;
    let (metrics_listener, metrics_address) =
        metrics::bind(&cfg.metrics_address)
            .await
            .map_err(io(format!(
                "scheduler.metrics_address {}",
                cfg.metrics_address
            )))?;

    let founders: BTreeMap<u64, String> = cfg
        .peers
        .iter()
        .map(|p| (p.id, p.address.clone()))
        .collect();
    let replica_cfg = replica_config(cfg);
    let join = cfg.join;
    let data_dir = Path::new(&cfg.data_dir).to_path_buf();
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let log_level = if tracing::enabled!(tracing::Level::DEBUG) {
        slog::Level::Debug
    } else {
        slog::Level::Info
    };
    let open = move || {
        let disk = EngineDisk::open(&data_dir).map_err(|e| {
            StartError::Replica(format!("scheduler.data_dir {}: {e}", data_dir.display()))
        })?;
        Replica::open(
            replica_cfg,
            disk,
            &founders,
            !join,
            incarnation,
            &slog_bridge::logger(log_level),
        )
        .map_err(|e| {
            StartError::Replica(format!(
                "opening the replica in {}: {e}",
                data_dir.display()
            ))
        })
    };
    let metrics = Metrics::new();
    let driver_cfg = DriverConfig {
        tick: Duration::from_millis(cfg.raft.tick_ms),
        max_batch: cfg.batching.max_batch_sandboxes,
        max_batch_wait: Duration::from_micros(cfg.batching.max_batch_wait_us),
        max_queued_creates: cfg.batching.max_queued_creates,
        cluster_id: cfg.cluster_id.clone(),
        tls: tls.clone(),
    };
    let raft_io = RaftIo::start(cfg.node_id)?;
    let (handle, raft) = driver::spawn(
        open,
        cfg.node_id,
        driver_cfg,
        metrics.clone(),
        raft_io.handle(),
    )?;
    let liveness = Liveness::new(LivenessSettings {
        heartbeat_interval: Duration::from_millis(cfg.liveness.heartbeat_interval_ms),
        node_ttl: Duration::from_millis(cfg.liveness.node_ttl_ms),
        leader_grace: Duration::from_millis(cfg.liveness.leader_grace_ms),
        disconnect_grace: Duration::from_millis(cfg.liveness.node_disconnect_grace_ms),
        max_heartbeats_per_second: cfg.liveness.max_heartbeats_per_second,
    });
    let liveness_task = tokio::spawn(liveness::run_checker(handle.clone(), liveness.clone()));
    let standby_task = tokio::spawn(super::standby::run_pauser(
        handle.clone(),
        cfg.sessions.standby_pause_after_ms,
        cfg.sessions.gpu_pause_filesystem_only,
    ));
    let retention_task = tokio::spawn(super::retention::run_expirer(
        handle.clone(),
        cfg.sessions.clone(),
    ));
    let pools_task = tokio::spawn(super::pools::run_keeper(handle.clone()));
    let gauges_task = tokio::spawn(pool_gauges(handle.clone()));
    let services = Services::new(
        handle.clone(),
        cfg.cluster_id.clone(),
        liveness,
        cfg.sessions.clone(),
        tls.as_ref(),
        Security::new(&cfg.auth, ca),
    );
    let peers_of = handle.clone();
    let guard = Guard::new(
        tls.is_some(),
        &cfg.cluster_id,
        metrics.clone(),
        std::sync::Arc::new(move || peers_of.peers().keys().copied().collect()),
    );
    if let Some(tls) = &tls {
        let gauge = metrics.cert_expiry_seconds.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            loop {
                gauge.set(tls.not_after() - berth_net::tls::pki::unix_now());
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SandboxServiceServer<SandboxApi>>()
        .await;
    health_reporter
        .set_serving::<AdminServiceServer<AdminApi>>()
        .await;
    health_reporter
        .set_serving::<NodeServiceServer<NodeApi>>()
        .await;
    health_reporter.set_serving::<PeerServer<PeerApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_proto::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Replica(format!("gRPC reflection: {e}")))?;
    let (stop, stopped) = oneshot::channel::<()>();
    let router = berth_net::server(&NetConfig::replica_server())
        .add_service(InterceptedService::new(
            SandboxServiceServer::new(services.sandbox)
                .max_decoding_message_size(MAX_CLIENT_MESSAGE),
            {
                let g = guard.clone();
                move |r| g.sandbox(r)
            },
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::new(services.admin).max_decoding_message_size(MAX_CLIENT_MESSAGE),
            {
                let g = guard.clone();
                move |r| g.admin(r)
            },
        ))
        .add_service(InterceptedService::new(
            NodeServiceServer::new(services.node).max_decoding_message_size(MAX_CLIENT_MESSAGE),
            {
                let g = guard.clone();
                move |r| g.node(r)
            },
        ))
        .add_service(InterceptedService::new(
            PeerServer::new(services.peer)
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
            move |r| guard.peer(r),
        ))
        .add_service(health)
        .add_service(reflection);
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        berth_net::incoming(listener, tls.clone()),
        async move {
            let _ = stopped.await;
        },
    ));
    let metrics_task = tokio::spawn(metrics.serve(metrics_listener));
    tracing::info!(
        id = cfg.node_id,
        grpc = %grpc_address,
        metrics = %metrics_address,
        data_dir = %cfg.data_dir,
        peers = cfg.peers.len(),
        "scheduler replica started"
    );
    Ok(Running {
        grpc_address,
        metrics_address,
        handle,
        stop: Some(stop),
        server,
        metrics_task,
        liveness_task,
        standby_task,
        retention_task,
        pools_task,
        gauges_task,
        raft: Some(raft),
        _raft_io: raft_io,
    })
}
