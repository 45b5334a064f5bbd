//! Warm pools: a tenant's sandboxes created ahead of demand and kept on standby, so a
//! create that matches one is served at once by a sandbox that already runs (Daytona's and
//! Modal's warm pools, E2B's pre-started templates).
//!
//! A pool is replicated state (`SetWarmPool`, `DeleteWarmPool`), so replicas cannot
//! disagree about it. Its members are ordinary sandboxes of the pool's tenant, made from
//! its template by `RefillWarmPools` (the leader's keeper proposes it when a pool is short)
//! and marked with [`crate::model::Sandbox::pool`]; they count against the tenant's quota
//! like any other. A member reported running is put on standby in the same apply (frozen,
//! memory held, CPU given back), so there is no moment in which a claimed sandbox could be
//! frozen by a late standby. A create that matches a pool's template claims its lowest
//! ready member inside `submit`: one replicated change, so each member is claimed exactly
//! once. The claim thaws it (its CPU taken back on its node; a member whose node has not
//! the CPU free is passed over), gives it the create's request id, env, labels and
//! priority, and takes it out of the pool; the keeper refills.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use berth_proto::{FieldErrors, Validator};

use super::State;
use super::command::{ItemOutcome, Rejection, Submission};
use crate::model::{Sandbox, SandboxId, SandboxSpec, SandboxState};

/// Most warm pools in a cluster: a create looks at every pool of its tenant.
pub const MAX_POOLS: usize = 256;
/// Largest pool.
pub const MAX_POOL_SIZE: u32 = 1_000;
/// Longest pool name.
pub const POOL_NAME_LEN: usize = 63;

/// What a pool keeps ready: `size` sandboxes made from `template`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmPool {
    /// The members' spec: tenant, image, resources, constraints, network policy and limits.
    /// Always `keep_alive` with no command: a member runs nothing until it is claimed.
    pub template: SandboxSpec,
    /// How many members it keeps.
    pub size: u32,
}

/// A pool in the replicated state, with its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    /// The pool.
    pub pool: WarmPool,
    /// Revision at which it was last set.
    pub revision: u64,
    /// Its members not yet claimed and not terminal.
    pub members: BTreeSet<SandboxId>,
    /// Members it has made (numbers their request ids).
    pub created: u64,
    /// Creates it has served.
    pub claimed: u64,
}

impl WarmPool {
    /// Whether a create's spec is what this pool keeps: same tenant, image, resources,
    /// constraints, network policy and limits, and an interactive sandbox (keep-alive, no
    /// command). Env, labels, priority and `auto_resume` may differ: the claim applies the
    /// create's.
    pub fn serves(&self, spec: &SandboxSpec) -> bool {
        let t = &self.template;
        spec.keep_alive
            && spec.command.is_empty()
            && spec.tenant == t.tenant
            && spec.image == t.image
            && spec.cpu_milli == t.cpu_milli
            && spec.memory_mib == t.memory_mib
            && spec.gpu == t.gpu
            && spec.constraints == t.constraints
            && spec.network == t.network
            && spec.timeout_ms == t.timeout_ms
            && spec.idle_timeout_ms == t.idle_timeout_ms
            && spec.auto_pause_idle_ms == t.auto_pause_idle_ms
    }

    /// Checks the pool as `SetWarmPool` carries it.
    pub fn validate(&self, v: &mut Validator) {
        v.nested("template", |v| {
            self.template.validate(v);
            v.check(self.template.keep_alive, "keep_alive", || {
                "a pool's sandboxes are keep-alive".into()
            });
            v.check(self.template.command.is_empty(), "command", || {
                "a pool's sandboxes run no command until claimed".into()
            });
        });
        v.check(self.size <= MAX_POOL_SIZE, "size", || {
            format!("{} is above {MAX_POOL_SIZE}", self.size)
        });
    }
}

impl State {
    /// Warm pools by name.
    pub fn pools(&self) -> &BTreeMap<String, PoolRecord> {
        &self.pools
    }

    /// The pool whose ready member a create with `spec` would claim now, if any (the
    /// leader leaves such creates unplaced, so `apply` claims instead of binding).
    pub fn pool_for(&self, spec: &SandboxSpec) -> Option<&str> {
        if self.pools.is_empty() {
            return None;
        }
        self.pools
            .iter()
            .find(|(_, r)| {
                r.pool.serves(spec)
                    && r.members
                        .iter()
                        .any(|id| self.sandboxes.get(id).is_some_and(claimable))
            })
            .map(|(name, _)| name.as_str())
    }

    /// Pools short of their size: name, how many members each lacks, and how many of its
    /// members are still warming. What the keeper refills.
    pub fn pools_short(&self) -> Vec<(String, u32, u32)> {
        self.pools
            .iter()
            .filter_map(|(name, r)| {
                let have = u32::try_from(r.members.len()).unwrap_or(u32::MAX);
                let (_, warming) = self.pool_counts(r);
                (have < r.pool.size).then(|| (name.clone(), r.pool.size - have, warming))
            })
            .collect()
    }

    /// A pool's members that creates may claim now, and those still warming (Pending or
    /// Scheduled).
    pub fn pool_counts(&self, record: &PoolRecord) -> (u32, u32) {
        let (mut ready, mut warming) = (0, 0);
        for s in record
            .members
            .iter()
            .filter_map(|id| self.sandboxes.get(id))
        {
            if claimable(s) {
                ready += 1;
            } else if matches!(s.state, SandboxState::Pending | SandboxState::Scheduled) {
                warming += 1;
            }
        }
        (ready, warming)
    }

    /// Sets or replaces a pool. Members that no longer fit it (another template, or beyond
    /// a smaller size: the newest go) are deleted.
    pub(super) fn set_pool(&mut self, name: &str, pool: &WarmPool) -> Result<(), Rejection> {
        let mut v = Validator::new();
        v.identifier("name", name, POOL_NAME_LEN);
        v.nested("pool", |v| pool.validate(v));
        v.check(
            self.pools.contains_key(name) || self.pools.len() < MAX_POOLS,
            "name",
            || format!("the cluster has {MAX_POOLS} pools, the most it keeps"),
        );
        v.finish().map_err(Rejection::InvalidSpec)?;
        let revision = self.revision;
        let record = self.pools.entry(name.to_owned()).or_insert(PoolRecord {
            pool: pool.clone(),
            revision,
            members: BTreeSet::new(),
            created: 0,
            claimed: 0,
        });
        let same_template = record.pool.template == pool.template;
        record.pool = pool.clone();
        record.revision = revision;
        let keep = if same_template { pool.size as usize } else { 0 };
        let extra: Vec<SandboxId> = record.members.iter().skip(keep).copied().collect();
        for id in extra {
            let _ = self.delete(id);
        }
        Ok(())
    }

    /// Deletes a pool and its unclaimed members.
    pub(super) fn delete_pool(&mut self, name: &str) -> Result<(), Rejection> {
        let record = self.pools.remove(name).ok_or_else(|| {
            Rejection::InvalidSpec(FieldErrors::one(
                "name",
                format!("there is no warm pool {name:?}"),
            ))
        })?;
        for id in record.members {
            // Off the pool first, so `delete` has no pool to update.
            if let Some(s) = self.sandboxes.get_mut(&id) {
                s.pool = None;
            }
            let _ = self.delete(id);
        }
        Ok(())
    }

    /// Makes up to `count` new members of pool `name` (never beyond its size), Pending, for
    /// the pending pass to place. Each counts against the tenant's quota; one over it is
    /// not made.
    pub(super) fn refill_pool(&mut self, name: &str, count: u32, now_ms: u64) -> ItemOutcome {
        let Some(record) = self.pools.get(name) else {
            return ItemOutcome::Rejected(Rejection::InvalidSpec(FieldErrors::one(
                "name",
                format!("there is no warm pool {name:?}"),
            )));
        };
        let room = (record.pool.size as usize).saturating_sub(record.members.len());
        let template = record.pool.template.clone();
        let mut made = 0;
        let want = (count as usize).min(room);
        // A request id an earlier pool of the same name left to an ended member is skipped;
        // the attempts are bounded all the same.
        for _ in 0..want.saturating_mul(2).saturating_add(16) {
            if made == want {
                break;
            }
            let Some(record) = self.pools.get_mut(name) else {
                break;
            };
            let request_id = format!("warm-pool/{name}/{}", record.created);
            record.created += 1;
            match self.submit_as(
                &Submission::new(request_id, template.clone()),
                now_ms,
                false,
            ) {
                ItemOutcome::Created { id, .. } => {
                    if let Some(s) = self.sandboxes.get_mut(&id) {
                        s.pool = Some(name.to_owned());
                        s.placement_note = Some(format!("a member of warm pool {name}"));
                    }
                    if let Some(record) = self.pools.get_mut(name) {
                        record.members.insert(id);
                    }
                    made += 1;
                }
                ItemOutcome::Duplicate { .. } => {}
                ItemOutcome::Rejected(r) if made == 0 => return ItemOutcome::Rejected(r),
                _ => break,
            }
        }
        ItemOutcome::Applied
    }

    /// A create that a pool serves claims its lowest ready member: `Some(outcome)` when
    /// one was claimed, `None` to create it as usual.
    pub(super) fn claim(&mut self, item: &Submission, now_ms: u64) -> Option<ItemOutcome> {
        if self.pools.is_empty() {
            return None;
        }
        let name = self
            .pools
            .iter()
            .find(|(_, r)| r.pool.serves(&item.spec))
            .map(|(name, _)| name.clone())?;
        let members: Vec<SandboxId> = self.pools.get(&name)?.members.iter().copied().collect();
        for id in members {
            let state = self.sandboxes.get(&id).map(|s| s.state.clone());
            match state {
                Some(SandboxState::Running) => {}
                // Thawed on its node; one whose node has not its CPU free is passed over.
                Some(SandboxState::Standby { .. }) => {
                    if self.thaw(id).is_err() {
                        continue;
                    }
                }
                _ => continue,
            }
            self.hand_over(id, &name, item, now_ms);
            return Some(ItemOutcome::Claimed { id, pool: name });
        }
        None
    }

    /// The claimed member becomes the create's sandbox.
    fn hand_over(&mut self, id: SandboxId, name: &str, item: &Submission, now_ms: u64) {
        let key = (item.spec.tenant.clone(), item.request_id.clone());
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        let old = (sandbox.spec.tenant.clone(), sandbox.request_id.clone());
        sandbox.request_id = item.request_id.clone();
        sandbox.spec.env = item.spec.env.clone();
        sandbox.spec.labels = item.spec.labels.clone();
        sandbox.spec.priority = item.spec.priority;
        sandbox.spec.auto_resume = item.spec.auto_resume;
        sandbox.pool = None;
        sandbox.placement_note = Some(format!(
            "claimed from warm pool {name} at {now_ms} (created at {})",
            sandbox.created_ms
        ));
        self.request_ids.remove(&old);
        self.request_ids.insert(std::sync::Arc::new(key), id);
        if let Some(record) = self.pools.get_mut(name) {
            record.members.remove(&id);
            record.claimed += 1;
        }
    }

    /// A member that ended or was deleted leaves its pool (the keeper makes another).
    pub(super) fn leave_pool(&mut self, id: SandboxId) {
        let Some(name) = self.sandboxes.get_mut(&id).and_then(|s| s.pool.take()) else {
            return;
        };
        if let Some(record) = self.pools.get_mut(&name) {
            record.members.remove(&id);
        }
    }

    /// A member reported running goes on standby at once: warm, holding no CPU.
    pub(super) fn park_member(&mut self, id: SandboxId, now_ms: u64) {
        let member = self
            .sandboxes
            .get(&id)
            .is_some_and(|s| s.pool.is_some() && s.state == SandboxState::Running);
        if member {
            // A node without checkpoints (the process runtime) keeps it running instead.
            let _ = self.standby(id, now_ms);
        }
    }
}

/// A member a create may take now.
fn claimable(sandbox: &Sandbox) -> bool {
    matches!(
        sandbox.state,
        SandboxState::Running | SandboxState::Standby { .. }
    )
}
