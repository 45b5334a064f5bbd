//! The autoscaler's Prometheus metrics, served on `/metrics`.

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every autoscaler metric.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Decisions carried out, by kind (`scale_up`, `scale_down`, `cordon`, `kept`) and
    /// reason (`pending`, `min_nodes`, `headroom`, `idle`, `spot_interruption`, `busy`).
    pub decisions: IntCounterVec,
    /// Nodes per group and state (`provisioning`, `running`, `deleting`, `failed`,
    /// `registered`).
    pub nodes: IntGaugeVec,
    /// $/hour of every node the provider has (running or provisioning).
    pub usd_per_hour: Gauge,
    /// Pending sandboxes by the scheduler's reason.
    pub pending: IntGaugeVec,
    /// Provider errors by class (`stockout`, `quota`, `transient`, `permanent`).
    pub provider_errors: IntCounterVec,
    /// Pending sandboxes the last decision could not serve, by reason.
    pub unmet: IntGaugeVec,
    /// 1 while this instance holds the autoscaler lease.
    pub lease_held: IntGauge,
    /// Groups backing off after provider errors.
    pub groups_backing_off: IntGauge,
    /// Time of the last policy decision, in ms.
    pub decision_ms: Gauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("counter {name}: {e}"))
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("gauge {name}: {e}"))
        };
        let m = Metrics {
            decisions: counter_vec(
                "berth_autoscaler_decisions_total",
                "Autoscaler actions carried out, by kind and reason.",
                &["kind", "reason"],
            ),
            nodes: gauge_vec(
                "berth_autoscaler_nodes",
                "Nodes per node group and state.",
                &["group", "state"],
            ),
            usd_per_hour: Gauge::new(
                "berth_autoscaler_usd_per_hour",
                "Dollars per hour of every node the providers have.",
            )
            .unwrap_or_else(|e| unreachable!("usd_per_hour: {e}")),
            pending: gauge_vec(
                "berth_autoscaler_pending_sandboxes",
                "Pending sandboxes by the scheduler's reason.",
                &["reason"],
            ),
            provider_errors: counter_vec(
                "berth_autoscaler_provider_errors_total",
                "Provider call failures by provider and class.",
                &["provider", "class"],
            ),
            unmet: gauge_vec(
                "berth_autoscaler_unmet_sandboxes",
                "Pending sandboxes the last decision could not serve, by reason.",
                &["reason"],
            ),
            lease_held: IntGauge::new(
                "berth_autoscaler_lease_held",
                "1 while this instance holds the autoscaler lease.",
            )
            .unwrap_or_else(|e| unreachable!("lease_held: {e}")),
            groups_backing_off: IntGauge::new(
                "berth_autoscaler_groups_backing_off",
                "Node groups backing off after provider errors.",
            )
            .unwrap_or_else(|e| unreachable!("groups_backing_off: {e}")),
            decision_ms: Gauge::new(
                "berth_autoscaler_decision_ms",
                "Time of the last policy decision, in ms.",
            )
            .unwrap_or_else(|e| unreachable!("decision_ms: {e}")),
            registry,
        };
        let all: [Box<dyn prometheus::core::Collector>; 9] = [
            Box::new(m.decisions.clone()),
            Box::new(m.nodes.clone()),
            Box::new(m.usd_per_hour.clone()),
            Box::new(m.pending.clone()),
            Box::new(m.provider_errors.clone()),
            Box::new(m.unmet.clone()),
            Box::new(m.lease_held.clone()),
            Box::new(m.groups_backing_off.clone()),
            Box::new(m.decision_ms.clone()),
        ];
        for c in all {
            let _ = m.registry.register(c);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        berth_net::metrics_http::render(&self.registry)
    }

    /// Serves `/metrics` on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        berth_net::metrics_http::serve(self.registry, listener).await
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
