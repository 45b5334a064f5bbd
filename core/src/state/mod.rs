//! The replicated state machine: `apply(command, now_ms) -> outcomes`, deterministic and
//! free of I/O, clocks and randomness.
//!
//! Besides nodes, sandboxes and tenants, the state holds the autoscaler lease and its
//! holders' latest decisions ([`AutoscalerRecord`]), so autoscaler HA needs no other store.
//!
//! `apply` is the single writer. It re-checks every placement against the current state
//! and refuses what no longer fits (Nomad's plan applier), which is what guarantees that no
//! CPU, memory or GPU is ever double-allocated, whatever the leader's view was. Iteration is
//! over ordered maps only (`BTreeMap`s, and imbl's persistent ones for the big maps, see
//! [`Tracked`]), so two replicas that apply the same commands hold byte-identical state.
//!
//! # Layout
//! - [`command`]: commands and per-item outcomes.
//! - `apply`: the transitions of sandboxes, tenants and the autoscaler lease; `nodes`: node
//!   registration (with an agent's reports), status and removal; `disconnect`: the
//!   disconnect grace (a silent node's sandboxes Unknown, then Lost); `pause`: pause and
//!   resume (Pausing, Paused with a snapshot on a node, back to Pending); `retention`:
//!   paused sandboxes ended once their snapshot is past the tenant's retention; `checks`:
//!   what an entry is checked against (GPU request well formed, fit, constraints).
//! - [`pools`]: warm pools (members made ahead of demand, kept on standby, claimed
//!   exactly once by a matching create).
//! - [`tokens`]: API and join tokens (hashes only; revocation; a join token spent once).
//! - [`snapshot`]: compact binary snapshot and restore.

mod apply;
mod checks;
pub mod command;
mod disconnect;
mod nodes;
mod pause;
pub mod pools;
mod retention;
pub mod snapshot;
mod standby;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_disconnect;
#[cfg(test)]
mod tests_pause;
#[cfg(test)]
mod tests_pools;
#[cfg(test)]
mod tests_retention;
#[cfg(test)]
mod tests_standby;
pub mod tokens;
mod tracked;

use std::collections::{BTreeMap, BTreeSet};

use imbl::OrdMap;

use serde::{Deserialize, Serialize};

use berth_proto::GpuModelName;

use crate::model::{NodeId, NodeSpec, NodeStatus, Sandbox, SandboxId, SandboxState, TenantQuota};

pub use tracked::Tracked;

pub use command::{
    Command, ItemOutcome, MAX_DISCONNECT_GRACE_MS, Rejection, StatusChange, StatusUpdate,
    Submission,
};

/// A node and what is allocated on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Inventory.
    pub spec: NodeSpec,
    /// Status.
    pub status: NodeStatus,
    /// Why it has that status.
    pub status_reason: String,
    /// Incremented at every registration.
    pub epoch: u64,
    /// CPU held by its Scheduled/Running/Unknown/Pausing sandboxes (not Standby ones).
    pub cpu_milli_allocated: u64,
    /// Memory held.
    pub memory_mib_allocated: u64,
    /// Milli-GPU held per GPU index (0..=1000).
    pub gpu_milli_allocated: Vec<u32>,
    /// Scheduled/Running/Unknown/Pausing sandboxes bound here.
    pub sandboxes: BTreeSet<SandboxId>,
    /// Sandboxes whose snapshot lives on this node (Paused, or resuming from it).
    pub snapshots: BTreeSet<SandboxId>,
    /// Sandboxes bound here whose CPU is given back (Standby, or Unknown after it): they
    /// count their memory and GPUs in the allocations, not their CPU.
    pub standby: BTreeSet<SandboxId>,
}

impl NodeRecord {
    /// Free CPU.
    pub fn cpu_milli_free(&self) -> u64 {
        self.spec.cpu_milli.saturating_sub(self.cpu_milli_allocated)
    }

    /// Free memory.
    pub fn memory_mib_free(&self) -> u64 {
        self.spec
            .memory_mib
            .saturating_sub(self.memory_mib_allocated)
    }

    /// Free milli-GPU of GPU `index` (0 for an unknown index).
    pub fn gpu_milli_free(&self, index: usize) -> u32 {
        self.gpu_milli_allocated
            .get(index)
            .map_or(0, |used| 1000u32.saturating_sub(*used))
    }
}

/// A tenant's quota and usage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// Quota.
    pub quota: TenantQuota,
    /// Revision at which the quota was last set.
    pub quota_revision: u64,
    /// Sandboxes not terminal and not Paused (what `max_concurrent_sandboxes` limits).
    pub active_sandboxes: u32,
    /// Paused sandboxes, counted apart: they hold nothing on any node.
    pub paused_sandboxes: u32,
    /// Milli-GPU held per model by Scheduled/Running/Unknown sandboxes.
    pub gpu_milli_by_model: BTreeMap<GpuModelName, u64>,
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub(crate) revision: u64,
    pub(crate) next_sandbox_id: u64,
    pub(crate) nodes: Tracked<NodeId, NodeRecord>,
    pub(crate) sandboxes: Tracked<SandboxId, Sandbox>,
    /// (tenant, request id) → sandbox; keys behind `Arc`s so copying a tree node after a
    /// copy of the state was handed out copies pointers, not strings.
    pub(crate) request_ids: OrdMap<std::sync::Arc<(String, String)>, SandboxId>,
    pub(crate) tenants: BTreeMap<String, TenantRecord>,
    pub(crate) sandboxes_by_state: BTreeMap<String, u64>,
    pub(crate) autoscaler: AutoscalerRecord,
    pub(crate) tokens: BTreeMap<String, tokens::TokenRecord>,
    pub(crate) pools: BTreeMap<String, pools::PoolRecord>,
}

/// What one or more applied entries wrote (see [`State::take_changes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The state's revision after them.
    pub revision: u64,
    /// Sandboxes written (created, changed or removed), ascending.
    pub sandboxes: Vec<SandboxId>,
    /// Of those, the ones no longer in the state, with their tenant.
    pub removed: Vec<(SandboxId, String)>,
    /// Nodes whose agents may have news, ascending.
    pub nodes: Vec<NodeId>,
}

/// Most autoscaler decision lines kept in the replicated state.
pub const MAX_AUTOSCALER_DECISIONS: usize = 64;
/// Longest decision line kept (longer ones are cut).
pub const MAX_DECISION_LEN: usize = 512;
/// Longest autoscaler holder name.
pub const MAX_HOLDER_LEN: usize = 128;

/// The autoscaler lease and the latest decisions of its holders.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoscalerRecord {
    /// Current or last holder; empty when never taken.
    pub holder: String,
    /// When the lease lapses unless renewed (ms since the unix epoch).
    pub expires_ms: u64,
    /// Latest decision lines, oldest first, at most [`MAX_AUTOSCALER_DECISIONS`].
    pub decisions: std::collections::VecDeque<String>,
}

impl State {
    /// An empty state at revision 0.
    pub fn new() -> State {
        State::default()
    }

    /// The autoscaler lease and its holders' latest decisions.
    pub fn autoscaler(&self) -> &AutoscalerRecord {
        &self.autoscaler
    }

    /// Number of commands applied.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Nodes by id.
    pub fn nodes(&self) -> &Tracked<NodeId, NodeRecord> {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, id: &str) -> Option<&NodeRecord> {
        self.nodes.get(id)
    }

    /// Sandboxes by id.
    pub fn sandboxes(&self) -> &Tracked<SandboxId, Sandbox> {
        &self.sandboxes
    }

    /// One sandbox.
    pub fn sandbox(&self, id: SandboxId) -> Option<&Sandbox> {
        self.sandboxes.get(&id)
    }

    /// The sandbox created with this tenant's request id.
    pub fn by_request_id(&self, tenant: &str, request_id: &str) -> Option<SandboxId> {
        self.request_ids
            .get(&(tenant.to_owned(), request_id.to_owned()))
            .copied()
    }

    /// Tenants with a quota or usage.
    pub fn tenants(&self) -> &BTreeMap<String, TenantRecord> {
        &self.tenants
    }

    /// Count of sandboxes per state name, kept by `apply` (the invariant checker recounts).
    pub fn sandboxes_by_state(&self) -> &BTreeMap<String, u64> {
        &self.sandboxes_by_state
    }

    /// What was written since the last call: the sandboxes, and the nodes whose agents may
    /// have something new to hear (a node written, or the node a written sandbox is bound
    /// to or holds its snapshot on). Services feed agents and watches from it; a replica
    /// takes it after every entry it applies.
    pub fn take_changes(&mut self) -> Changes {
        let (sandboxes, gone) = self.sandboxes.take_touched();
        let (mut nodes, _) = self.nodes.take_touched();
        for id in &sandboxes {
            if let Some(s) = self.sandboxes.get(id) {
                if let Some(b) = &s.binding {
                    nodes.insert(b.placement.node.clone());
                }
                if let Some(snap) = &s.snapshot {
                    nodes.insert(snap.node.clone());
                }
            }
        }
        Changes {
            revision: self.revision,
            sandboxes: sandboxes.into_iter().collect(),
            removed: gone
                .into_iter()
                .filter(|(id, _)| !self.sandboxes.contains_key(id))
                .map(|(id, s)| (id, s.spec.tenant.clone()))
                .collect(),
            nodes: nodes.into_iter().collect(),
        }
    }

    /// Pending sandboxes, highest priority first, then oldest first.
    pub fn pending(&self) -> Vec<&Sandbox> {
        let mut pending: Vec<&Sandbox> = self
            .sandboxes
            .values()
            .filter(|s| s.state == SandboxState::Pending)
            .collect();
        pending.sort_by_key(|s| (std::cmp::Reverse(s.spec.priority), s.id));
        pending
    }
}
