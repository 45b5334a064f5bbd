//! The node agent's Prometheus metrics, served on `[agent] metrics_address` at `/metrics`
//! (by `berth_net::metrics_http`, as the scheduler's are). A per-agent registry: `berth dev`
//! runs several agents in one process.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric an agent exports.
pub struct AgentMetrics {
    registry: Registry,
    /// Image pulls by result (`ok`, `error`).
    pub pulls: IntCounterVec,
    /// Pulls running now.
    pub pulls_in_flight: IntGauge,
    /// Blob bytes fetched from registries.
    pub pull_bytes: IntCounter,
    /// Sandboxes whose image was already on the node.
    pub image_cache_hits: IntCounter,
    /// Sandboxes whose image had to be pulled.
    pub image_cache_misses: IntCounter,
    /// Bytes the image cache holds.
    pub image_cache_bytes: IntGauge,
    /// Images the cache holds.
    pub image_cache_images: IntGauge,
    /// Images evicted to keep the cache under its limit.
    pub image_evictions: IntCounter,
    /// Assigned sandboxes waiting for a pull or a start slot.
    pub starts_queued: IntGauge,
    /// Sandboxes being started now (shim launched, runtime not yet running it).
    pub starts_in_flight: IntGauge,
    /// Sandboxes started, by result (`ok`, `error`).
    pub starts: IntCounterVec,
    /// Seconds from an assignment arriving to its sandbox running.
    pub start_seconds: Histogram,
    /// Seconds from a resume's assignment arriving to its sandbox running again.
    pub resume_seconds: Histogram,
    /// Seconds between consecutive heartbeats sent.
    pub heartbeat_gap_seconds: Histogram,
    /// The longest gap between heartbeats sent, in milliseconds, since the agent started.
    pub heartbeat_gap_max_ms: IntGauge,
    /// CPU the node's sandboxes used over the last usage sample, in milli-cores (a node
    /// total: per-sandbox figures go to the scheduler, not to labels here).
    pub sandbox_cpu_milli: IntGauge,
    /// Memory charged to the node's sandboxes at the last usage sample.
    pub sandbox_memory_bytes: IntGauge,
    /// Sandboxes in the last usage sample.
    pub sandboxes_sampled: IntGauge,
}

fn must<T>(what: &str, r: prometheus::Result<T>) -> T {
    // Names and help strings are constants of this file; building them cannot fail.
    r.unwrap_or_else(|e| unreachable!("metric {what}: {e}"))
}

impl AgentMetrics {
    /// Creates and registers every metric.
    pub fn new() -> AgentMetrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = must(name, IntCounter::new(name, help));
            must(name, registry.register(Box::new(c.clone())));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(name, IntGauge::new(name, help));
            must(name, registry.register(Box::new(g.clone())));
            g
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = must(name, IntCounterVec::new(Opts::new(name, help), &[label]));
            must(name, registry.register(Box::new(c.clone())));
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = must(
                name,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
            );
            must(name, registry.register(Box::new(h.clone())));
            h
        };
        let seconds = prometheus::exponential_buckets(0.005, 2.0, 14).unwrap_or_default();
        AgentMetrics {
            pulls: counter_vec(
                "berth_agent_image_pulls_total",
                "Image pulls by result.",
                "result",
            ),
            pulls_in_flight: gauge(
                "berth_agent_image_pulls_in_flight",
                "Image pulls running now.",
            ),
            pull_bytes: counter(
                "berth_agent_image_pull_bytes_total",
                "Blob bytes fetched from registries.",
            ),
            image_cache_hits: counter(
                "berth_agent_image_cache_hits_total",
                "Sandboxes whose image was already on the node.",
            ),
            image_cache_misses: counter(
                "berth_agent_image_cache_misses_total",
                "Sandboxes whose image had to be pulled.",
            ),
            image_cache_bytes: gauge(
                "berth_agent_image_cache_bytes",
                "Bytes the image cache holds.",
            ),
            image_cache_images: gauge("berth_agent_image_cache_images", "Images the cache holds."),
            image_evictions: counter(
                "berth_agent_image_evictions_total",
                "Images evicted to keep the cache under its limit.",
            ),
            starts_queued: gauge(
                "berth_agent_starts_queued",
                "Assigned sandboxes waiting for a pull or a start slot.",
            ),
            starts_in_flight: gauge(
                "berth_agent_starts_in_flight",
                "Sandboxes being started now.",
            ),
            starts: counter_vec(
                "berth_agent_starts_total",
                "Sandbox starts by result.",
                "result",
            ),
            start_seconds: histogram(
                "berth_agent_start_seconds",
                "Seconds from an assignment arriving to its sandbox running.",
                seconds.clone(),
            ),
            resume_seconds: histogram(
                "berth_agent_resume_seconds",
                "Seconds from a resume's assignment arriving to its sandbox running again.",
                seconds.clone(),
            ),
            heartbeat_gap_seconds: histogram(
                "berth_agent_heartbeat_gap_seconds",
                "Seconds between consecutive heartbeats sent.",
                seconds,
            ),
            heartbeat_gap_max_ms: gauge(
                "berth_agent_heartbeat_gap_max_ms",
                "The longest gap between heartbeats sent since the agent started, in ms.",
            ),
            sandbox_cpu_milli: gauge(
                "berth_agent_sandbox_cpu_millicores",
                "CPU the node's sandboxes used over the last usage sample, in milli-cores.",
            ),
            sandbox_memory_bytes: gauge(
                "berth_agent_sandbox_memory_bytes",
                "Memory charged to the node's sandboxes at the last usage sample.",
            ),
            sandboxes_sampled: gauge(
                "berth_agent_sandboxes_sampled",
                "Sandboxes in the last usage sample.",
            ),
            registry,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        berth_net::metrics_http::render(&self.registry)
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}
