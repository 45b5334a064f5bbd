//! Node vocabulary shared by the agent, the scheduler and the autoscaler.

use std::fmt;

use serde::{Deserialize, Serialize};

/// On-demand or interruptible capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    /// Billed while it runs; not interrupted.
    OnDemand,
    /// Cheaper; the provider may take it back with short notice.
    Spot,
}

impl fmt::Display for CapacityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapacityType::OnDemand => "on-demand",
            CapacityType::Spot => "spot",
        })
    }
}

/// What a node taint does to sandboxes that do not tolerate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaintEffect {
    /// Never place an intolerant sandbox here.
    NoSchedule,
    /// Only when nothing else fits.
    PreferNoSchedule,
}
