//! The named invariants of the scheduler state, checked from scratch (a second code path
//! beside `apply`'s incremental bookkeeping).
//!
//! Tests run [`check`] after every apply; production counts violations in a metric (and
//! they must stay at zero).

use std::collections::BTreeMap;
use std::fmt;

use berth_proto::GpuModelName;

use crate::model::{NodeStatus, SandboxState};
use crate::state::State;

/// An invariant of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    /// Sandboxes bound to a node hold at most its CPU and memory.
    NodeNotOvercommitted,
    /// Sandboxes on one GPU hold at most 1000 milli-GPU.
    GpuNeverDoubleAllocated,
    /// A node's allocation counters equal the sum over its bound sandboxes.
    NodeCountersMatchBindings,
    /// Every bound GPU exists on its node and matches the binding's model.
    BoundGpuExists,
    /// GPUs bound in the latest apply were healthy when bound.
    BoundGpuHealthyAtBind,
    /// Exactly the Scheduled/Running/Unknown sandboxes have a live binding on a node.
    BindingMatchesState,
    /// A bound placement matches its request (count, milli, option).
    PlanFitsRequest,
    /// No tenant went above a quota after the quota was set.
    QuotaNeverExceeded,
    /// Tenant usage counters equal a recount.
    TenantCountersConsistent,
    /// The per-state counters equal a recount.
    StateCountersConsistent,
    /// The request-id index maps exactly the live sandboxes.
    RequestIdIndexConsistent,
    /// Every sandbox id is below the next id to be assigned (so no id is handed out twice).
    SandboxIdsBelowNext,
    /// A sandbox is Unknown exactly while it is bound to a Down node (a Down node holds
    /// nothing Scheduled or Running), and its grace ends no earlier than it began.
    UnknownOnlyOnDownNodes,
    /// A sandbox has a snapshot exactly while it is in its holder's `snapshots` set; a
    /// Paused sandbox has one and no binding; a snapshot is kept only while Paused or on its
    /// way back (Pending, Scheduled).
    SnapshotIndexConsistent,
    /// A node's `standby` set (sandboxes whose CPU is not counted) holds exactly its
    /// Standby sandboxes, and Unknown ones that may have been: all bound there.
    StandbyIndexConsistent,
    /// A warm pool's `members` are exactly the live sandboxes that name it, each of the
    /// pool's tenant, and no pool holds more than its size beyond a shrink in flight.
    PoolIndexConsistent,
}

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// Where and how.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.invariant, self.detail)
    }
}

/// Checks every invariant; returns the violations (empty when all hold).
pub fn check(state: &State) -> Vec<Violation> {
    let mut out = check_snapshots(state);
    out.extend(check_standby(state));
    out.extend(check_pools(state));
    let mut fail = |invariant, detail: String| out.push(Violation { invariant, detail });

    // Recount node usage from the bindings of Scheduled/Running sandboxes.
    struct Usage {
        cpu: u64,
        memory: u64,
        gpus: Vec<u64>,
        count: usize,
    }
    let mut usage: BTreeMap<&str, Usage> = state
        .nodes
        .iter()
        .map(|(id, n)| {
            (
                id.as_str(),
                Usage {
                    cpu: 0,
                    memory: 0,
                    gpus: vec![0; n.spec.gpus.len()],
                    count: 0,
                },
            )
        })
        .collect();
    let mut tenant_active: BTreeMap<&str, u32> = BTreeMap::new();
    let mut tenant_paused: BTreeMap<&str, u32> = BTreeMap::new();
    let mut tenant_gpus: BTreeMap<&str, BTreeMap<&GpuModelName, u64>> = BTreeMap::new();
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();

    if let Some(last) = state.sandboxes.keys().next_back() {
        if last.0 >= state.next_sandbox_id {
            fail(
                Invariant::SandboxIdsBelowNext,
                format!("{last} exists; the next id is {}", state.next_sandbox_id),
            );
        }
    }
    for sandbox in state.sandboxes.values() {
        *by_state.entry(sandbox.state.name().to_owned()).or_default() += 1;
        if sandbox.state == SandboxState::Paused {
            *tenant_paused.entry(&sandbox.spec.tenant).or_default() += 1;
        } else if !sandbox.state.is_terminal() {
            *tenant_active.entry(&sandbox.spec.tenant).or_default() += 1;
        }
        if state
            .request_ids
            .get(&(sandbox.spec.tenant.clone(), sandbox.request_id.clone()))
            != Some(&sandbox.id)
        {
            fail(
                Invariant::RequestIdIndexConsistent,
                format!("{} is not indexed by its request id", sandbox.id),
            );
        }
        let holds = sandbox.state.holds_resources();
        let Some(binding) = &sandbox.binding else {
            if holds {
                fail(
                    Invariant::BindingMatchesState,
                    format!(
                        "{} is {} without a binding",
                        sandbox.id,
                        sandbox.state.name()
                    ),
                );
            }
            continue;
        };
        if sandbox.state == SandboxState::Pending {
            fail(
                Invariant::BindingMatchesState,
                format!("{} is pending with a binding", sandbox.id),
            );
        }
        let p = &binding.placement;
        // Check the plan against the request.
        match (&sandbox.spec.gpu, binding.gpu_model.as_ref()) {
            (None, None) if p.gpu_indices.is_empty() => {}
            (Some(request), Some(_)) => match request.options.get(p.option as usize) {
                Some(option)
                    if option.amount.gpu_count() as usize == p.gpu_indices.len()
                        && option.amount.milli_per_gpu() == p.gpu_milli_per_gpu => {}
                _ => fail(
                    Invariant::PlanFitsRequest,
                    format!("{} binding {p:?} does not match {request}", sandbox.id),
                ),
            },
            _ => fail(
                Invariant::PlanFitsRequest,
                format!(
                    "{} binding {p:?} does not match its GPU request",
                    sandbox.id
                ),
            ),
        }
        if !holds {
            continue;
        }
        if let Some(model) = &binding.gpu_model {
            *tenant_gpus
                .entry(&sandbox.spec.tenant)
                .or_default()
                .entry(model)
                .or_default() += u64::from(p.gpu_milli_per_gpu) * p.gpu_indices.len() as u64;
        }
        let Some(node) = state.nodes.get(&p.node) else {
            fail(
                Invariant::BoundGpuExists,
                format!("{} is bound to unknown node {}", sandbox.id, p.node),
            );
            continue;
        };
        let unknown = match &sandbox.state {
            SandboxState::Unknown {
                since_ms,
                lost_after_ms,
                ..
            } => {
                if lost_after_ms < since_ms {
                    fail(
                        Invariant::UnknownOnlyOnDownNodes,
                        format!(
                            "{} is Unknown from {since_ms} ms to {lost_after_ms} ms",
                            sandbox.id
                        ),
                    );
                }
                true
            }
            _ => false,
        };
        if unknown != (node.status == NodeStatus::Down) {
            fail(
                Invariant::UnknownOnlyOnDownNodes,
                format!(
                    "{} is {} on node {}, which is {:?}",
                    sandbox.id,
                    sandbox.state.name(),
                    p.node,
                    node.status
                ),
            );
        }
        if !node.sandboxes.contains(&sandbox.id) {
            fail(
                Invariant::BindingMatchesState,
                format!("{} is missing from node {}'s set", sandbox.id, p.node),
            );
        }
        if let Some(u) = usage.get_mut(p.node.as_str()) {
            if !node.standby.contains(&sandbox.id) {
                u.cpu = u.cpu.saturating_add(sandbox.spec.cpu_milli);
            }
            u.memory = u.memory.saturating_add(sandbox.spec.memory_mib);
            u.count += 1;
            for index in &p.gpu_indices {
                match (
                    node.spec.gpus.get(*index as usize),
                    u.gpus.get_mut(*index as usize),
                ) {
                    (Some(gpu), Some(used)) => {
                        *used = used.saturating_add(u64::from(p.gpu_milli_per_gpu));
                        if Some(&gpu.model) != binding.gpu_model.as_ref() {
                            fail(
                                Invariant::BoundGpuExists,
                                format!(
                                    "{} GPU {index} on {} is a {}, bound as {:?}",
                                    sandbox.id, p.node, gpu.model, binding.gpu_model
                                ),
                            );
                        }
                        if binding.bound_revision == state.revision && !gpu.healthy {
                            fail(
                                Invariant::BoundGpuHealthyAtBind,
                                format!(
                                    "{} was bound to unhealthy GPU {index} on {}",
                                    sandbox.id, p.node
                                ),
                            );
                        }
                    }
                    _ => fail(
                        Invariant::BoundGpuExists,
                        format!(
                            "{} is bound to GPU {index} that {} does not have",
                            sandbox.id, p.node
                        ),
                    ),
                }
            }
        }
    }

    for (id, node) in &state.nodes {
        let Some(u) = usage.get(id.as_str()) else {
            continue;
        };
        if u.cpu > node.spec.cpu_milli || u.memory > node.spec.memory_mib {
            fail(
                Invariant::NodeNotOvercommitted,
                format!(
                    "{id}: {} cpu / {} MiB bound, capacity {} / {}",
                    u.cpu, u.memory, node.spec.cpu_milli, node.spec.memory_mib
                ),
            );
        }
        for (index, used) in u.gpus.iter().enumerate() {
            if *used > 1000 {
                fail(
                    Invariant::GpuNeverDoubleAllocated,
                    format!("{id} GPU {index}: {used} milli bound"),
                );
            }
        }
        let counted_gpus: Vec<u64> = node
            .gpu_milli_allocated
            .iter()
            .map(|g| u64::from(*g))
            .collect();
        if u.cpu != node.cpu_milli_allocated
            || u.memory != node.memory_mib_allocated
            || u.gpus != counted_gpus
            || u.count != node.sandboxes.len()
        {
            fail(
                Invariant::NodeCountersMatchBindings,
                format!(
                    "{id}: counters cpu {} mem {} gpus {:?} n {} vs recount cpu {} mem {} gpus {:?} n {}",
                    node.cpu_milli_allocated,
                    node.memory_mib_allocated,
                    node.gpu_milli_allocated,
                    node.sandboxes.len(),
                    u.cpu,
                    u.memory,
                    u.gpus,
                    u.count
                ),
            );
        }
    }

    for (name, record) in &state.tenants {
        let paused = tenant_paused.get(name.as_str()).copied().unwrap_or(0);
        if paused != record.paused_sandboxes {
            fail(
                Invariant::TenantCountersConsistent,
                format!(
                    "tenant {name}: {} paused counted, {paused} recounted",
                    record.paused_sandboxes
                ),
            );
        }
        let active = tenant_active.get(name.as_str()).copied().unwrap_or(0);
        if active != record.active_sandboxes {
            fail(
                Invariant::TenantCountersConsistent,
                format!(
                    "tenant {name}: {} active counted, {active} recounted",
                    record.active_sandboxes
                ),
            );
        }
        let gpus = tenant_gpus.remove(name.as_str()).unwrap_or_default();
        let recount: BTreeMap<GpuModelName, u64> =
            gpus.into_iter().map(|(m, v)| (m.clone(), v)).collect();
        if recount != record.gpu_milli_by_model {
            fail(
                Invariant::TenantCountersConsistent,
                format!(
                    "tenant {name}: GPU usage {:?} counted, {recount:?} recounted",
                    record.gpu_milli_by_model
                ),
            );
        }
        // Above a quota is possible only when the quota was lowered below existing usage:
        // then nothing may have been created (or bound) since the quota was set.
        if let Some(max) = record.quota.max_concurrent_sandboxes {
            if active > max {
                let newer = state.sandboxes.values().any(|s| {
                    s.spec.tenant == *name
                        && !s.state.is_terminal()
                        && s.created_revision > record.quota_revision
                });
                if newer {
                    fail(
                        Invariant::QuotaNeverExceeded,
                        format!("tenant {name}: {active} active, quota {max}"),
                    );
                }
            }
        }
        for (model, max) in &record.quota.max_gpu_milli_per_model {
            let held = record.gpu_milli_by_model.get(model).copied().unwrap_or(0);
            if held > *max {
                let newer = state.sandboxes.values().any(|s| {
                    s.spec.tenant == *name
                        && s.state.holds_resources()
                        && s.binding.as_ref().is_some_and(|b| {
                            b.gpu_model.as_ref() == Some(model)
                                && b.bound_revision > record.quota_revision
                        })
                });
                if newer {
                    fail(
                        Invariant::QuotaNeverExceeded,
                        format!("tenant {name}: {held} milli of {model}, quota {max}"),
                    );
                }
            }
        }
    }
    for (name, _) in tenant_gpus {
        fail(
            Invariant::TenantCountersConsistent,
            format!("tenant {name} holds GPUs but has no record"),
        );
    }
    if by_state != state.sandboxes_by_state {
        fail(
            Invariant::StateCountersConsistent,
            format!(
                "{:?} counted, {by_state:?} recounted",
                state.sandboxes_by_state
            ),
        );
    }
    if state.request_ids.len() != state.sandboxes.len() {
        fail(
            Invariant::RequestIdIndexConsistent,
            format!(
                "{} request ids for {} sandboxes",
                state.request_ids.len(),
                state.sandboxes.len()
            ),
        );
    }
    out
}

/// [`Invariant::StandbyIndexConsistent`].
fn check_standby(state: &State) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut fail = |detail: String| {
        out.push(Violation {
            invariant: Invariant::StandbyIndexConsistent,
            detail,
        })
    };
    for sandbox in state.sandboxes.values() {
        if !matches!(sandbox.state, SandboxState::Standby { .. }) {
            continue;
        }
        let listed = sandbox
            .binding
            .as_ref()
            .and_then(|b| state.nodes.get(&b.placement.node))
            .is_some_and(|r| r.standby.contains(&sandbox.id));
        if !listed {
            fail(format!(
                "{} is on standby and not in its node's set",
                sandbox.id
            ));
        }
    }
    for (node, record) in &state.nodes {
        for id in &record.standby {
            let fine = record.sandboxes.contains(id)
                && state.sandboxes.get(id).is_some_and(|s| {
                    matches!(
                        s.state,
                        SandboxState::Standby { .. } | SandboxState::Unknown { .. }
                    )
                });
            if !fine {
                fail(format!("{node} lists {id} on standby, and it is not"));
            }
        }
    }
    out
}

/// [`Invariant::SnapshotIndexConsistent`], recounted from the sandboxes.
fn check_snapshots(state: &State) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut fail = |detail: String| {
        out.push(Violation {
            invariant: Invariant::SnapshotIndexConsistent,
            detail,
        })
    };
    let mut held: BTreeMap<&str, Vec<crate::model::SandboxId>> = BTreeMap::new();
    for sandbox in state.sandboxes.values() {
        let id = sandbox.id;
        match (&sandbox.snapshot, &sandbox.state) {
            (
                Some(snap),
                SandboxState::Paused | SandboxState::Pending | SandboxState::Scheduled,
            ) => {
                held.entry(snap.node.as_str()).or_default().push(id);
            }
            (Some(_), other) => fail(format!("{id} keeps a snapshot while {}", other.name())),
            (None, SandboxState::Paused) => fail(format!("{id} is paused with no snapshot")),
            (None, _) => {}
        }
        if sandbox.state == SandboxState::Paused && sandbox.binding.is_some() {
            fail(format!("{id} is paused and still bound"));
        }
    }
    for (node, record) in &state.nodes {
        let recount = held.remove(node.as_str()).unwrap_or_default();
        if !recount.iter().copied().eq(record.snapshots.iter().copied()) {
            fail(format!(
                "{node}: snapshots {:?} listed, {recount:?} recounted",
                record.snapshots
            ));
        }
    }
    for (node, ids) in held {
        fail(format!(
            "snapshots {ids:?} live on {node}, which is not a node"
        ));
    }
    out
}

/// [`Invariant::PoolIndexConsistent`], recounted from the sandboxes.
fn check_pools(state: &State) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut fail = |detail: String| {
        out.push(Violation {
            invariant: Invariant::PoolIndexConsistent,
            detail,
        })
    };
    let mut recount: BTreeMap<&str, Vec<crate::model::SandboxId>> = BTreeMap::new();
    for sandbox in state.sandboxes.values() {
        let Some(pool) = &sandbox.pool else { continue };
        if sandbox.state.is_terminal() {
            fail(format!("{} ended and is still in pool {pool}", sandbox.id));
        }
        match state.pools.get(pool) {
            Some(r) if r.pool.template.tenant != sandbox.spec.tenant => fail(format!(
                "{} of tenant {} is in pool {pool} of tenant {}",
                sandbox.id, sandbox.spec.tenant, r.pool.template.tenant
            )),
            Some(_) => recount.entry(pool.as_str()).or_default().push(sandbox.id),
            None => fail(format!(
                "{} names pool {pool}, which does not exist",
                sandbox.id
            )),
        }
    }
    for (name, record) in &state.pools {
        let ids = recount.remove(name.as_str()).unwrap_or_default();
        if !ids.iter().copied().eq(record.members.iter().copied()) {
            fail(format!(
                "pool {name}: members {:?} listed, {ids:?} recounted",
                record.members
            ));
        }
        if record.members.len() > record.pool.size as usize {
            fail(format!(
                "pool {name} has {} members; its size is {}",
                record.members.len(),
                record.pool.size
            ));
        }
    }
    out
}
