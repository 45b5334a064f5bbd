//! The transitions of the state machine.

use berth_proto::{FieldErrors, Validator};

use super::State;
use super::checks::{check_fit, validate_gpu_request};
use super::command::{
    Command, ItemOutcome, MAX_BATCH_ITEMS, Rejection, StatusChange, StatusUpdate, Submission,
};
use crate::model::{Binding, Placement, Sandbox, SandboxId, SandboxState};

impl State {
    /// Applies one command at time `now_ms` (the leader's clock, carried in the entry) and
    /// returns one outcome per item. Never panics on any input: a malformed item is
    /// rejected and changes nothing.
    pub fn apply(&mut self, command: &Command, now_ms: u64) -> Vec<ItemOutcome> {
        self.revision += 1;
        if command.items() > MAX_BATCH_ITEMS {
            return vec![ItemOutcome::Rejected(Rejection::BatchTooLarge(
                command.items(),
            ))];
        }
        let one = |r| vec![outcome(r)];
        match command {
            Command::RegisterNode { spec } => one(self.register_node(spec, None, now_ms)),
            Command::RegisterAgent { spec, has } => {
                one(self.register_node(spec, Some(has), now_ms))
            }
            Command::NodeDisconnected {
                node,
                reason,
                grace_ms,
            } => one(self.disconnect_node(node, reason, *grace_ms, now_ms)),
            Command::PauseSandboxes {
                items,
                gpu_filesystem_only,
            } => items
                .iter()
                .map(|id| {
                    outcome(
                        self.not_pooled(*id)
                            .and_then(|()| self.pause(*id, *gpu_filesystem_only)),
                    )
                })
                .collect(),
            Command::ResumeSandboxes { items } => items
                .iter()
                .map(|id| outcome(self.not_pooled(*id).and_then(|()| self.resume(*id))))
                .collect(),
            Command::StandbySandboxes { items } => items
                .iter()
                .map(|id| {
                    outcome(
                        self.not_pooled(*id)
                            .and_then(|()| self.standby(*id, now_ms)),
                    )
                })
                .collect(),
            Command::SetWarmPool { name, pool } => one(self.set_pool(name, pool)),
            Command::DeleteWarmPool { name } => one(self.delete_pool(name)),
            Command::RefillWarmPools { items } => items
                .iter()
                .map(|(name, count)| self.refill_pool(name, *count, now_ms))
                .collect(),
            Command::ExpireSnapshots { items } => items
                .iter()
                .map(|(id, retention_ms)| outcome(self.expire_snapshot(*id, *retention_ms, now_ms)))
                .collect(),
            Command::ExpireDisconnected { items } => items
                .iter()
                .map(|id| outcome(self.expire_disconnected(*id, now_ms)))
                .collect(),
            Command::SetNodeStatus {
                node,
                status,
                reason,
            } => one(self.set_node_status(node, *status, reason, now_ms)),
            Command::RemoveNode { node } => one(self.remove_node(node, now_ms)),
            Command::SubmitSandboxes { items } => {
                items.iter().map(|item| self.submit(item, now_ms)).collect()
            }
            Command::BindSandboxes { items } => items
                .iter()
                .map(|(id, placement)| outcome(self.bind(*id, placement, now_ms)))
                .collect(),
            Command::SetPendingReasons { items } => items
                .iter()
                .map(|(id, reason)| match self.sandboxes.get_mut(id) {
                    Some(s) if s.state == SandboxState::Pending => {
                        s.pending_reason = Some(truncate(reason, 1024));
                        ItemOutcome::Applied
                    }
                    Some(s) => ItemOutcome::Rejected(Rejection::InvalidTransition {
                        id: *id,
                        state: s.state.name(),
                        what: "a pending reason",
                    }),
                    None => ItemOutcome::Rejected(Rejection::UnknownSandbox(*id)),
                })
                .collect(),
            Command::UpdateSandboxes { items } => items
                .iter()
                .map(|u| outcome(self.update(u, now_ms)))
                .collect(),
            Command::DeleteSandboxes { items } => {
                items.iter().map(|id| outcome(self.delete(*id))).collect()
            }
            Command::ExpireTerminal { finished_before_ms } => {
                let expired: Vec<SandboxId> = self
                    .sandboxes
                    .values()
                    .filter(|s| {
                        s.state.is_terminal()
                            && s.finished_ms.is_some_and(|t| t < *finished_before_ms)
                    })
                    .map(|s| s.id)
                    .collect();
                for id in expired {
                    let _ = self.delete(id);
                }
                vec![ItemOutcome::Applied]
            }
            Command::AutoscalerLease {
                holder,
                ttl_ms,
                decisions,
            } => one(self.autoscaler_lease(holder, *ttl_ms, decisions, now_ms)),
            Command::PutToken { token } => one(self.put_token(token, now_ms)),
            Command::RevokeToken { id } => one(self.revoke_token(id)),
            Command::UseJoinToken { id, hash, node } => {
                one(self.use_join_token(id, hash, node, now_ms))
            }
            Command::SetTenantQuota { tenant, quota } => {
                let mut v = Validator::new();
                v.identifier("tenant", tenant, crate::model::limits::TENANT_LEN);
                match v.finish() {
                    Err(e) => vec![ItemOutcome::Rejected(Rejection::InvalidSpec(e))],
                    Ok(()) => {
                        let revision = self.revision;
                        let record = self.tenants.entry(tenant.clone()).or_default();
                        record.quota = quota.clone();
                        record.quota_revision = revision;
                        vec![ItemOutcome::Applied]
                    }
                }
            }
        }
    }

    /// Takes or renews the autoscaler lease; the holder's decisions are recorded.
    fn autoscaler_lease(
        &mut self,
        holder: &str,
        ttl_ms: u64,
        decisions: &[String],
        now_ms: u64,
    ) -> Result<(), Rejection> {
        if holder.is_empty() || holder.len() > super::MAX_HOLDER_LEN {
            return Err(Rejection::InvalidSpec(FieldErrors::one(
                "holder",
                format!("must be 1..={} bytes", super::MAX_HOLDER_LEN),
            )));
        }
        let record = &mut self.autoscaler;
        if record.holder != holder && record.expires_ms > now_ms {
            return Err(Rejection::LeaseHeld {
                holder: record.holder.clone(),
                expires_ms: record.expires_ms,
            });
        }
        record.holder = holder.to_owned();
        record.expires_ms = now_ms.saturating_add(ttl_ms.min(10 * 60 * 1000));
        for line in decisions {
            if record.decisions.len() == super::MAX_AUTOSCALER_DECISIONS {
                record.decisions.pop_front();
            }
            record
                .decisions
                .push_back(truncate(line, super::MAX_DECISION_LEN));
        }
        Ok(())
    }

    /// A create: a warm pool's ready member when one serves it, else a new sandbox.
    fn submit(&mut self, item: &Submission, now_ms: u64) -> ItemOutcome {
        self.submit_as(item, now_ms, true)
    }

    /// A create; with `may_claim`, a warm pool that serves it is tried first.
    pub(super) fn submit_as(
        &mut self,
        item: &Submission,
        now_ms: u64,
        may_claim: bool,
    ) -> ItemOutcome {
        let key = (item.spec.tenant.clone(), item.request_id.clone());
        if let Some(id) = self.request_ids.get(&key) {
            return ItemOutcome::Duplicate { id: *id };
        }
        let mut v = Validator::new();
        v.check(
            !item.request_id.is_empty()
                && item.request_id.len() <= crate::model::limits::REQUEST_ID_LEN,
            "request_id",
            || format!("must be 1..={} bytes", crate::model::limits::REQUEST_ID_LEN),
        );
        v.nested("spec", |v| {
            item.spec.validate(v);
            if let Some(gpu) = &item.spec.gpu {
                v.nested("resources.gpu", |v| validate_gpu_request(gpu, v));
            }
        });
        if let Err(e) = v.finish() {
            return ItemOutcome::Rejected(Rejection::InvalidSpec(e));
        }
        if may_claim {
            if let Some(claimed) = self.claim(item, now_ms) {
                return claimed;
            }
        }
        let tenant = self.tenants.entry(item.spec.tenant.clone()).or_default();
        if let Some(max) = tenant.quota.max_concurrent_sandboxes {
            if tenant.active_sandboxes >= max {
                return ItemOutcome::Rejected(Rejection::ConcurrencyQuota {
                    tenant: item.spec.tenant.clone(),
                    max,
                });
            }
        }
        tenant.active_sandboxes += 1;
        let id = SandboxId(self.next_sandbox_id);
        self.next_sandbox_id += 1;
        self.request_ids.insert(std::sync::Arc::new(key), id);
        self.sandboxes.insert(
            id,
            Sandbox {
                id,
                request_id: item.request_id.clone(),
                spec: item.spec.clone(),
                state: SandboxState::Pending,
                binding: None,
                pending_reason: None,
                created_revision: self.revision,
                created_ms: now_ms,
                scheduled_ms: None,
                started_ms: None,
                finished_ms: None,
                snapshot: None,
                placement_note: None,
                pool: None,
            },
        );
        self.count_state("pending", 1);
        let (bound, bind_rejected) = match &item.placement {
            None => (false, None),
            Some(placement) => match self.bind(id, placement, now_ms) {
                Ok(()) => (true, None),
                Err(e) => {
                    if let Some(s) = self.sandboxes.get_mut(&id) {
                        s.pending_reason = Some(e.to_string());
                    }
                    (false, Some(e))
                }
            },
        };
        ItemOutcome::Created {
            id,
            bound,
            bind_rejected,
        }
    }

    /// Binds a pending sandbox after re-checking that the placement fits now.
    fn bind(&mut self, id: SandboxId, placement: &Placement, now_ms: u64) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        if sandbox.state != SandboxState::Pending {
            return Err(Rejection::InvalidTransition {
                id,
                state: sandbox.state.name(),
                what: "binding",
            });
        }
        let node = self
            .nodes
            .get(&placement.node)
            .ok_or_else(|| Rejection::UnknownNode(placement.node.clone()))?;
        let gpu_model = check_fit(&sandbox.spec, node, placement)?;
        if let Some(model) = &gpu_model {
            let tenant = &sandbox.spec.tenant;
            if let Some(record) = self.tenants.get(tenant) {
                if let Some(max) = record.quota.max_gpu_milli_per_model.get(model) {
                    let held = record.gpu_milli_by_model.get(model).copied().unwrap_or(0);
                    let add =
                        u64::from(placement.gpu_milli_per_gpu) * placement.gpu_indices.len() as u64;
                    if held + add > *max {
                        return Err(Rejection::GpuQuota {
                            tenant: tenant.clone(),
                            model: model.to_string(),
                            would_hold: held + add,
                            max: *max,
                        });
                    }
                }
            }
        }
        let revision = self.revision;
        let note = self.affinity_note(id, &placement.node);
        if let Some(sandbox) = self.sandboxes.get_mut(&id) {
            sandbox.binding = Some(Binding {
                placement: placement.clone(),
                gpu_model,
                bound_revision: revision,
            });
            sandbox.state = SandboxState::Scheduled;
            sandbox.scheduled_ms = Some(now_ms);
            sandbox.pending_reason = None;
            sandbox.placement_note = note;
        }
        self.count_state("pending", -1);
        self.count_state("scheduled", 1);
        self.hold(id);
        Ok(())
    }

    fn update(&mut self, update: &StatusUpdate, now_ms: u64) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&update.sandbox)
            .ok_or(Rejection::UnknownSandbox(update.sandbox))?;
        let here = sandbox
            .binding
            .as_ref()
            .is_some_and(|b| b.placement.node == update.node);
        if !here || !sandbox.state.holds_resources() {
            if !sandbox.state.holds_resources() {
                return Err(Rejection::InvalidTransition {
                    id: update.sandbox,
                    state: sandbox.state.name(),
                    what: "a status report",
                });
            }
            return Err(Rejection::NotBoundHere {
                id: update.sandbox,
                node: update.node.clone(),
            });
        }
        match &update.change {
            StatusChange::Paused { bytes, mode } => {
                self.paused(update.sandbox, *bytes, *mode, now_ms, true)
            }
            // An Unknown sandbox stays Unknown: its node is Down and becomes Ready only by
            // registering again, which brings it back. The scheduler closes a Down node's
            // stream, so the agent does register again.
            StatusChange::Running => {
                self.mark_running(update.sandbox, now_ms);
                Ok(())
            }
            StatusChange::PauseFailed { reason } => {
                self.pause_failed(update.sandbox, reason, now_ms);
                Ok(())
            }
            // What it was asked for: it is Standby already (or was since asked otherwise).
            StatusChange::Standby => Ok(()),
            StatusChange::Exited { code } => {
                self.finish(
                    update.sandbox,
                    SandboxState::Exited { code: *code },
                    now_ms,
                    true,
                );
                Ok(())
            }
            StatusChange::Failed { reason } => {
                self.finish(
                    update.sandbox,
                    SandboxState::Failed {
                        reason: truncate(reason, 1024),
                    },
                    now_ms,
                    true,
                );
                Ok(())
            }
        }
    }

    /// A Scheduled sandbox reported running is Running from `now_ms`; any other state is
    /// left as it is (a repeated report is a no-op).
    pub(super) fn mark_running(&mut self, id: SandboxId, now_ms: u64) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if sandbox.state == SandboxState::Scheduled {
            sandbox.state = SandboxState::Running;
            sandbox.started_ms = Some(now_ms);
            self.count_state("scheduled", -1);
            self.count_state("running", 1);
            // Restored: the snapshot's holder may let its copy go.
            self.drop_snapshot(id);
            self.park_member(id, now_ms);
        }
    }

    /// Refuses a user's pause, standby or resume of an unclaimed warm-pool member.
    fn not_pooled(&self, id: SandboxId) -> Result<(), Rejection> {
        match self.sandboxes.get(&id).and_then(|s| s.pool.as_ref()) {
            Some(pool) => Err(Rejection::PoolMember(id, pool.clone())),
            None => Ok(()),
        }
    }

    pub(super) fn delete(&mut self, id: SandboxId) -> Result<(), Rejection> {
        let Some(sandbox) = self.sandboxes.get(&id) else {
            return Err(Rejection::UnknownSandbox(id));
        };
        if !sandbox.state.is_terminal() {
            let held = sandbox.state.holds_resources();
            self.finish(
                id,
                SandboxState::Failed {
                    reason: "deleted".into(),
                },
                sandbox.created_ms,
                held,
            );
        }
        if let Some(sandbox) = self.sandboxes.remove(&id) {
            self.request_ids
                .remove(&(sandbox.spec.tenant.clone(), sandbox.request_id.clone()));
            self.count_state(sandbox.state.name(), -1);
        }
        Ok(())
    }

    /// Moves a sandbox to a terminal state, releasing what it holds (when `release`).
    pub(super) fn finish(
        &mut self,
        id: SandboxId,
        state: SandboxState,
        now_ms: u64,
        release: bool,
    ) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if sandbox.state.is_terminal() {
            return;
        }
        let before = sandbox.state.name();
        let held = sandbox.state.holds_resources();
        let was_paused = sandbox.state == SandboxState::Paused;
        sandbox.state = state;
        sandbox.finished_ms = Some(now_ms);
        let after = sandbox.state.name();
        let tenant = sandbox.spec.tenant.clone();
        self.count_state(before, -1);
        self.count_state(after, 1);
        if let Some(record) = self.tenants.get_mut(&tenant) {
            if was_paused {
                record.paused_sandboxes = record.paused_sandboxes.saturating_sub(1);
            } else {
                record.active_sandboxes = record.active_sandboxes.saturating_sub(1);
            }
        }
        self.drop_snapshot(id);
        self.leave_pool(id);
        // Without `release` the caller has already taken the sandbox off its node and tenant.
        if held && release {
            self.release(id);
        }
        // Off its node for good: no longer counted as on standby there.
        let node = self
            .sandboxes
            .get(&id)
            .and_then(|s| s.binding.as_ref())
            .map(|b| b.placement.node.clone());
        if let Some(record) = node.and_then(|n| self.nodes.get_mut(&n)) {
            record.standby.remove(&id);
        }
    }

    /// Adds a bound sandbox's resources to its node and tenant.
    pub(super) fn hold(&mut self, id: SandboxId) {
        self.account_node(id, true);
        self.account_tenant(id, true);
    }

    /// Takes a bound sandbox's resources off its node and tenant.
    pub(super) fn release(&mut self, id: SandboxId) {
        self.account_node(id, false);
        self.account_tenant(id, false);
    }

    /// Adds (`hold`) or removes a bound sandbox's CPU, memory and GPU share on its node. A
    /// sandbox is counted exactly while it is in the node's set, so repeating either is a
    /// no-op.
    pub(super) fn account_node(&mut self, id: SandboxId, hold: bool) {
        let Some(sandbox) = self.sandboxes.get(&id) else {
            return;
        };
        let Some(binding) = &sandbox.binding else {
            return;
        };
        let p = &binding.placement;
        let Some(node) = self.nodes.get_mut(&p.node) else {
            return;
        };
        let changed = if hold {
            node.sandboxes.insert(id)
        } else {
            node.sandboxes.remove(&id)
        };
        if !changed {
            return;
        }
        // A Standby sandbox's CPU is not counted; off the node, it is no longer Standby.
        let cpu_milli = if node.standby.contains(&id) {
            0
        } else {
            sandbox.spec.cpu_milli
        };
        if !hold {
            node.standby.remove(&id);
        }
        let step = |value: u64, amount: u64| {
            if hold {
                value + amount
            } else {
                value.saturating_sub(amount)
            }
        };
        node.cpu_milli_allocated = step(node.cpu_milli_allocated, cpu_milli);
        node.memory_mib_allocated = step(node.memory_mib_allocated, sandbox.spec.memory_mib);
        for i in &p.gpu_indices {
            if let Some(used) = node.gpu_milli_allocated.get_mut(*i as usize) {
                // `apply` checked the fit, so a held GPU stays at or below 1000.
                *used = u32::try_from(step(u64::from(*used), u64::from(p.gpu_milli_per_gpu)))
                    .unwrap_or(u32::MAX);
            }
        }
    }

    /// Adds (`hold`) or removes a bound sandbox's GPUs from its tenant's usage per model.
    pub(super) fn account_tenant(&mut self, id: SandboxId, hold: bool) {
        let Some(sandbox) = self.sandboxes.get(&id) else {
            return;
        };
        let Some(binding) = &sandbox.binding else {
            return;
        };
        let Some(model) = &binding.gpu_model else {
            return;
        };
        let milli = u64::from(binding.placement.gpu_milli_per_gpu)
            * binding.placement.gpu_indices.len() as u64;
        let record = self.tenants.entry(sandbox.spec.tenant.clone()).or_default();
        let held = record.gpu_milli_by_model.entry(model.clone()).or_default();
        *held = if hold {
            *held + milli
        } else {
            held.saturating_sub(milli)
        };
        if *held == 0 {
            record.gpu_milli_by_model.remove(model);
        }
    }

    pub(super) fn count_state(&mut self, name: &str, delta: i64) {
        let count = self.sandboxes_by_state.entry(name.to_owned()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.sandboxes_by_state.remove(name);
        }
    }
}

/// The outcome of an item whose transition either applied or was refused.
fn outcome(result: Result<(), Rejection>) -> ItemOutcome {
    result.map_or_else(ItemOutcome::Rejected, |()| ItemOutcome::Applied)
}

pub(super) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
