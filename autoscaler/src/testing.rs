//! Fixtures for tests of the autoscaler and of what drives it (the simulator, the
//! integration tests): not for production configs.

use std::collections::BTreeMap;

use berth_proto::node::CapacityType;

use crate::config::NodeGroupConfig;

/// An on-demand 8×H100 node group.
pub fn h100_group(name: &str, min: u32, max: u32, price: f64) -> NodeGroupConfig {
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
