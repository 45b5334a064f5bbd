//! Prometheus metrics of a scheduler replica, served as text on `/metrics` by
//! `berth_net::metrics_http` (re-exported here as [`render`] and [`serve`]), which the
//! autoscaler uses for its own metrics too.
//!
//! Names start with `berth_`; every metric is registered once in a per-process registry
//! (tests start several replicas in one process, so the global registry is not used).

use std::net::SocketAddr;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// Every metric a replica exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Current Raft term.
    pub term: IntGauge,
    /// Commit index.
    pub commit_index: IntGauge,
    /// Applied index.
    pub applied_index: IntGauge,
    /// 1 on the leader.
    pub is_leader: IntGauge,
    /// Leader changes seen.
    pub leader_changes: IntCounter,
    /// Proposals by kind (create_batch, bind, command, membership).
    pub proposals: IntCounterVec,
    /// Sandboxes per create batch.
    pub batch_size: Histogram,
    /// Time to apply one Ready's committed entries.
    pub apply_seconds: Histogram,
    /// Time to place one create batch (per batch).
    pub placement_seconds: Histogram,
    /// Time from a create's arrival to its answer (leader only).
    pub create_seconds: Histogram,
    /// Creates refused before proposal, by reason.
    pub creates_refused: IntCounterVec,
    /// Creates waiting for the leader's batcher.
    pub create_queue: IntGauge,
    /// Nodes whose agent streams wait on the change feed.
    pub feed_nodes: IntGauge,
    /// Heartbeats received from agents.
    pub heartbeats: IntCounter,
    /// Sandboxes by state.
    pub sandboxes: IntGaugeVec,
    /// Milli-GPU allocated by model.
    pub gpu_allocated_milli: IntGaugeVec,
    /// Milli-GPU in the pool by model.
    pub gpu_total_milli: IntGaugeVec,
    /// Nodes by status.
    pub nodes: IntGaugeVec,
    /// Invariant violations found by the periodic checker (must stay 0).
    pub invariant_violations: IntCounter,
    /// Nodes this replica marked Down for missed heartbeats (as leader).
    pub nodes_marked_down: IntCounter,
    /// Sandboxes this replica lost as leader because their node did not come back within
    /// the disconnect grace.
    pub sandboxes_lost_after_grace: IntCounter,
    /// Agent streams open on this replica.
    pub agent_streams: IntGauge,
    /// The longest gap between two heartbeats of one node seen by this replica, in ms.
    pub heartbeat_gap_max_ms: IntGauge,
    /// Raft messages dropped because a peer's queue was full or it was unreachable.
    pub peer_messages_dropped: IntCounterVec,
    /// Snapshots taken or installed.
    pub log_entries_in_memory: IntGauge,
    /// Calls refused by authentication or authorisation, by service and gRPC code.
    pub auth_denials: IntCounterVec,
    /// Seconds until this replica's certificate expires (0 when insecure).
    pub cert_expiry_seconds: IntGauge,
    /// Resumes placed (as leader) on the node holding their snapshot (`hit`) or elsewhere
    /// (`miss`: the snapshot moves).
    pub snapshot_affinity: IntCounterVec,
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    // Names and buckets are constants of this file; building them cannot fail.
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| unreachable!("histogram {name}: {e}"))
}

fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.000_05, 2.0, 18).unwrap_or_default()
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("gauge {name}: {e}"))
        };
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("counter {name}: {e}"))
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("gauge {name}: {e}"))
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("counter {name}: {e}"))
        };
        let m = Metrics {
            term: gauge("berth_raft_term", "Current Raft term."),
            commit_index: gauge("berth_raft_commit_index", "Raft commit index."),
            applied_index: gauge("berth_raft_applied_index", "Raft applied index."),
            is_leader: gauge("berth_raft_is_leader", "1 when this replica is the leader."),
            leader_changes: counter(
                "berth_raft_leader_changes_total",
                "Leader changes seen by this replica.",
            ),
            proposals: counter_vec(
                "berth_raft_proposals_total",
                "Raft proposals by kind.",
                "kind",
            ),
            batch_size: histogram(
                "berth_create_batch_size",
                "Sandboxes per create batch (one Raft entry).",
                prometheus::exponential_buckets(1.0, 2.0, 14).unwrap_or_default(),
            ),
            apply_seconds: histogram(
                "berth_apply_seconds",
                "Time to apply the committed entries of one Raft Ready.",
                latency_buckets(),
            ),
            placement_seconds: histogram(
                "berth_placement_batch_seconds",
                "Time to place one create batch against the leader's view.",
                latency_buckets(),
            ),
            create_seconds: histogram(
                "berth_create_seconds",
                "Time from a create reaching the leader to its answer (committed and applied).",
                latency_buckets(),
            ),
            creates_refused: counter_vec(
                "berth_creates_refused_total",
                "Creates refused before being proposed, by reason.",
                "reason",
            ),
            create_queue: gauge(
                "berth_create_queue_depth",
                "Creates waiting for the leader's batcher.",
            ),
            feed_nodes: gauge(
                "berth_feed_nodes",
                "Nodes whose agent streams wait on this replica's change feed.",
            ),
            heartbeats: counter(
                "berth_agent_heartbeats_total",
                "Heartbeats received from node agents.",
            ),
            sandboxes: gauge_vec("berth_sandboxes", "Sandboxes by state.", "state"),
            gpu_allocated_milli: gauge_vec(
                "berth_gpu_allocated_milli",
                "Milli-GPU allocated, by model.",
                "model",
            ),
            gpu_total_milli: gauge_vec(
                "berth_gpu_total_milli",
                "Milli-GPU in the pool (healthy GPUs on registered nodes), by model.",
                "model",
            ),
            nodes: gauge_vec("berth_nodes", "Nodes by status.", "status"),
            nodes_marked_down: counter(
                "berth_nodes_marked_down_total",
                "Nodes this replica marked Down as leader because their heartbeats stopped.",
            ),
            sandboxes_lost_after_grace: counter(
                "berth_sandboxes_lost_after_grace_total",
                "Unknown sandboxes this replica lost as leader because their node did not \
                 come back within the disconnect grace.",
            ),
            agent_streams: gauge(
                "berth_agent_streams",
                "Node agent streams open on this replica.",
            ),
            heartbeat_gap_max_ms: gauge(
                "berth_node_heartbeat_gap_max_ms",
                "The longest gap between two heartbeats of one node seen by this replica, in ms.",
            ),
            invariant_violations: counter(
                "berth_invariant_violations_total",
                "State invariant violations found by the periodic checker (must stay 0).",
            ),
            peer_messages_dropped: counter_vec(
                "berth_peer_messages_dropped_total",
                "Raft messages dropped on the way to a peer, by peer id.",
                "peer",
            ),
            log_entries_in_memory: gauge(
                "berth_raft_log_entries",
                "Uncompacted Raft log entries held in memory.",
            ),
            auth_denials: IntCounterVec::new(
                Opts::new(
                    "berth_auth_denials_total",
                    "Calls refused for a missing or insufficient identity, by service and code.",
                ),
                &["service", "code"],
            )
            .unwrap_or_else(|e| unreachable!("counter berth_auth_denials_total: {e}")),
            cert_expiry_seconds: gauge(
                "berth_tls_cert_expiry_seconds",
                "Seconds until this replica's certificate expires (0 when insecure).",
            ),
            snapshot_affinity: counter_vec(
                "berth_snapshot_affinity_total",
                "Resumes placed on the node holding their snapshot (hit) or elsewhere (miss).",
                "result",
            ),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.term.clone()),
            Box::new(m.commit_index.clone()),
            Box::new(m.applied_index.clone()),
            Box::new(m.is_leader.clone()),
            Box::new(m.leader_changes.clone()),
            Box::new(m.proposals.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.apply_seconds.clone()),
            Box::new(m.placement_seconds.clone()),
            Box::new(m.create_seconds.clone()),
            Box::new(m.creates_refused.clone()),
            Box::new(m.create_queue.clone()),
            Box::new(m.feed_nodes.clone()),
            Box::new(m.heartbeats.clone()),
            Box::new(m.sandboxes.clone()),
            Box::new(m.gpu_allocated_milli.clone()),
            Box::new(m.gpu_total_milli.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.invariant_violations.clone()),
            Box::new(m.nodes_marked_down.clone()),
            Box::new(m.sandboxes_lost_after_grace.clone()),
            Box::new(m.agent_streams.clone()),
            Box::new(m.heartbeat_gap_max_ms.clone()),
            Box::new(m.peer_messages_dropped.clone()),
            Box::new(m.log_entries_in_memory.clone()),
            Box::new(m.auth_denials.clone()),
            Box::new(m.cert_expiry_seconds.clone()),
            Box::new(m.snapshot_affinity.clone()),
        ];
        for c in collectors {
            // Each name is registered once, into a fresh registry.
            let _ = m.registry.register(c);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }

    /// Serves `/metrics` on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        serve(self.registry, listener).await
    }
}

pub use berth_net::metrics_http::{render, serve};

use std::collections::BTreeMap;

use crate::model::NodeStatus;
use crate::state::State;

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Binds the metrics address (port 0 picks a free one) and returns the bound address.
pub async fn bind(address: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Sets the node and GPU gauges from a state (a pass over the nodes).
pub fn publish_pool(metrics: &Metrics, state: &State) {
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let mut allocated: BTreeMap<String, u64> = BTreeMap::new();
    let mut nodes: BTreeMap<&'static str, i64> = BTreeMap::new();
    for record in state.nodes().values() {
        *nodes.entry(node_status_name(record.status)).or_default() += 1;
        for (i, gpu) in record.spec.gpus.iter().enumerate() {
            let model = gpu.model.to_string();
            *total.entry(model.clone()).or_default() += 1000;
            *allocated.entry(model).or_default() +=
                u64::from(record.gpu_milli_allocated.get(i).copied().unwrap_or(0));
        }
    }
    for (model, milli) in total {
        metrics
            .gpu_total_milli
            .with_label_values(&[model.as_str()])
            .set(milli as i64);
    }
    for (model, milli) in allocated {
        metrics
            .gpu_allocated_milli
            .with_label_values(&[model.as_str()])
            .set(milli as i64);
    }
    for (status, n) in nodes {
        metrics.nodes.with_label_values(&[status]).set(n);
    }
}

fn node_status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Ready => "ready",
        NodeStatus::Cordoned => "cordoned",
        NodeStatus::Draining => "draining",
        NodeStatus::Down => "down",
    }
}
