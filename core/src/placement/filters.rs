//! Feasibility filters: each a type with one job and one reason a user can read.
//!
//! The chain runs cheapest first; a node is rejected by the first filter it fails, and the
//! reason is counted in the sandbox's explanation. The constraint filters are shared with
//! `apply`, which re-checks them when it binds, so there is one definition of "fits".

use std::fmt;

use berth_proto::node::TaintEffect;

use super::view::NodeView;
use crate::model::{NodeSpec, SandboxSpec};

/// Why a node was rejected for a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Cordoned, draining or down.
    NodeNotReady,
    /// Provider not in the allow-list.
    ProviderNotAllowed,
    /// Region not in the allow-list.
    RegionNotAllowed,
    /// On-demand vs spot mismatch.
    CapacityTypeMismatch,
    /// A required label is missing or different.
    LabelMismatch,
    /// A NoSchedule taint is not tolerated.
    TaintNotTolerated,
    /// Not enough free CPU.
    InsufficientCpu,
    /// Not enough free memory.
    InsufficientMemory,
    /// No GPU of an accepted model.
    GpuModelMismatch,
    /// GPUs of the model exist, but none has enough memory.
    GpuMemoryTooSmall,
    /// Not enough fully free GPUs (whole-GPU requests).
    InsufficientFreeGpus,
    /// No GPU with enough free share (fractional requests).
    InsufficientGpuShare,
    /// The tenant's GPU quota for the model would be exceeded.
    TenantGpuQuota,
    /// A resume's snapshot cannot be restored here: another runtime (runsc version or
    /// platform) took it.
    SnapshotIncompatible,
}

impl Reason {
    /// Stable machine name (metrics labels, the wire's `FilterCount.reason`).
    pub fn name(self) -> &'static str {
        match self {
            Reason::NodeNotReady => "node_not_ready",
            Reason::ProviderNotAllowed => "provider_not_allowed",
            Reason::RegionNotAllowed => "region_not_allowed",
            Reason::CapacityTypeMismatch => "capacity_type_mismatch",
            Reason::LabelMismatch => "label_mismatch",
            Reason::TaintNotTolerated => "taint_not_tolerated",
            Reason::InsufficientCpu => "insufficient_cpu",
            Reason::InsufficientMemory => "insufficient_memory",
            Reason::GpuModelMismatch => "gpu_model_mismatch",
            Reason::GpuMemoryTooSmall => "gpu_memory_too_small",
            Reason::InsufficientFreeGpus => "insufficient_free_gpus",
            Reason::InsufficientGpuShare => "insufficient_gpu_share",
            Reason::TenantGpuQuota => "tenant_gpu_quota",
            Reason::SnapshotIncompatible => "snapshot_incompatible",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::NodeNotReady => "node not ready",
            Reason::ProviderNotAllowed => "provider not allowed",
            Reason::RegionNotAllowed => "region not allowed",
            Reason::CapacityTypeMismatch => "capacity type mismatch",
            Reason::LabelMismatch => "required label missing",
            Reason::TaintNotTolerated => "taint not tolerated",
            Reason::InsufficientCpu => "insufficient CPU",
            Reason::InsufficientMemory => "insufficient memory",
            Reason::GpuModelMismatch => "no GPU of the requested model",
            Reason::GpuMemoryTooSmall => "GPU memory too small",
            Reason::InsufficientFreeGpus => "not enough free GPUs",
            Reason::InsufficientGpuShare => "no GPU with enough free share",
            Reason::TenantGpuQuota => "tenant GPU quota reached",
            Reason::SnapshotIncompatible => "runtime differs from the snapshot's",
        })
    }
}

/// A check of a sandbox against a node's inventory (not its free resources).
pub trait SpecFilter: Sync {
    /// `Err` with the reason when the node is not acceptable.
    fn check(&self, spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason>;
}

/// Provider and region allow-lists.
pub struct LocationFilter;

impl SpecFilter for LocationFilter {
    fn check(&self, spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason> {
        let c = &spec.constraints;
        if !c.providers.is_empty() && !c.providers.contains(&node.provider) {
            return Err(Reason::ProviderNotAllowed);
        }
        if !c.regions.is_empty() && !c.regions.contains(&node.region) {
            return Err(Reason::RegionNotAllowed);
        }
        Ok(())
    }
}

/// Spot vs on-demand.
pub struct CapacityTypeFilter;

impl SpecFilter for CapacityTypeFilter {
    fn check(&self, spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason> {
        match spec.constraints.capacity_type {
            Some(wanted) if wanted != node.capacity_type => Err(Reason::CapacityTypeMismatch),
            _ => Ok(()),
        }
    }
}

/// Required node labels.
pub struct LabelFilter;

impl SpecFilter for LabelFilter {
    fn check(&self, spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason> {
        let ok = spec
            .constraints
            .node_labels
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v));
        if ok {
            Ok(())
        } else {
            Err(Reason::LabelMismatch)
        }
    }
}

/// NoSchedule taints must be tolerated.
pub struct TaintFilter;

impl SpecFilter for TaintFilter {
    fn check(&self, spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason> {
        let blocked = node
            .taints
            .iter()
            .any(|t| t.effect == TaintEffect::NoSchedule && !spec.constraints.tolerates(t));
        if blocked {
            Err(Reason::TaintNotTolerated)
        } else {
            Ok(())
        }
    }
}

/// The inventory filters, cheapest first. Shared by placement and by `apply`.
pub static SPEC_FILTERS: &[&dyn SpecFilter] = &[
    &LocationFilter,
    &CapacityTypeFilter,
    &LabelFilter,
    &TaintFilter,
];

/// Runs [`SPEC_FILTERS`].
pub fn check_spec(spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Reason> {
    SPEC_FILTERS.iter().try_for_each(|f| f.check(spec, node))
}

/// Whether the node takes new sandboxes at all.
pub fn check_ready(node: &NodeView) -> Result<(), Reason> {
    if node.ready {
        Ok(())
    } else {
        Err(Reason::NodeNotReady)
    }
}

/// Free CPU and memory.
pub fn check_cpu_memory(spec: &SandboxSpec, node: &NodeView) -> Result<(), Reason> {
    if node.cpu_milli_free < spec.cpu_milli {
        Err(Reason::InsufficientCpu)
    } else if node.memory_mib_free < spec.memory_mib {
        Err(Reason::InsufficientMemory)
    } else {
        Ok(())
    }
}
