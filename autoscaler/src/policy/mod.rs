//! The autoscaler's policy: pure functions of what the scheduler reports and the time.
//!
//! - [`decide`]: one decision round ([`decide::Policy::decide`]): scale-up for pending
//!   demand, `min_nodes` and headroom, with failover past groups backing off; scale-down.
//! - [`backoff`]: how long a group waits after a provider error.
//! - [`limits`]: the caps no scale-up crosses.
//! - [`scale_down`]: which idle nodes go.

pub mod backoff;
pub mod decide;
pub mod limits;
pub mod scale_down;

#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeMap;

    use berth_proto::node::CapacityType;

    use crate::config::NodeGroupConfig;

    /// An on-demand 8×H100 node group.
    pub(crate) fn h100_group(name: &str, min: u32, max: u32, price: f64) -> NodeGroupConfig {
        NodeGroupConfig {
            name: name.into(),
            provider: "local".into(),
            region: "r".into(),
            instance_type: "8xH100".into(),
            gpu_model: Some("H100".into()),
            gpu_count: 8,
            cpu_milli: 64_000,
            memory_mib: 262_144,
            price_per_hour_usd: price,
            capacity_type: CapacityType::OnDemand,
            min_nodes: min,
            max_nodes: max,
            labels: BTreeMap::new(),
        }
    }
}
