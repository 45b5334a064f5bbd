//! Pause and resume: Running → Pausing → Paused (the agent's checkpoint is recorded, and
//! what the sandbox held is released) → Pending with its snapshot → Scheduled → Running.

use super::State;
use super::command::Rejection;
use crate::model::{NodeId, NodeStatus, SandboxId, SandboxState, SnapshotMode, SnapshotRecord};

impl State {
    /// A Running (or Standby) sandbox is asked to pause; one already Pausing or Paused is
    /// left as it is.
    pub(super) fn pause(
        &mut self,
        id: SandboxId,
        gpu_filesystem_only: bool,
    ) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get_mut(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        let from_standby = match sandbox.state {
            SandboxState::Pausing | SandboxState::Paused => return Ok(()),
            SandboxState::Running => false,
            SandboxState::Standby { .. } => true,
            _ => {
                return Err(Rejection::InvalidTransition {
                    id,
                    state: sandbox.state.name(),
                    what: "a pause",
                });
            }
        };
        let gpus = sandbox
            .binding
            .as_ref()
            .is_some_and(|b| !b.placement.gpu_indices.is_empty());
        if gpus && !gpu_filesystem_only {
            return Err(Rejection::GpuPause(id));
        }
        if let Some(node) = sandbox.binding.as_ref().map(|b| &b.placement.node) {
            if self
                .nodes
                .get(node)
                .is_some_and(|r| r.spec.runtime == "process")
            {
                return Err(Rejection::NoCheckpoint(id, node.clone()));
            }
            let node = node.clone();
            self.check_snapshot_budget(id, &node)?;
        }
        if from_standby {
            // Thawed for the checkpoint, so it holds its CPU again while it is taken.
            self.take_cpu_back(id)?;
        }
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return Ok(());
        };
        let before = sandbox.state.name();
        sandbox.state = SandboxState::Pausing;
        sandbox.placement_note = None;
        self.count_state(before, -1);
        self.count_state("pausing", 1);
        Ok(())
    }

    /// Refuses a pause that would take node `node` past its snapshot disk budget: the
    /// snapshots it keeps, plus every pause under way there and this one counted at their
    /// sandboxes' memory size (a checkpoint is about the memory in use, at most the limit).
    fn check_snapshot_budget(&self, id: SandboxId, node: &str) -> Result<(), Rejection> {
        let Some(record) = self.nodes.get(node) else {
            return Ok(());
        };
        let budget = record.spec.snapshot_budget_bytes;
        if budget == 0 {
            return Ok(());
        }
        let memory = |s: &crate::model::Sandbox| s.spec.memory_mib.saturating_mul(1 << 20);
        let kept: u64 = record
            .snapshots
            .iter()
            .filter_map(|s| self.sandboxes.get(s)?.snapshot.as_ref().map(|r| r.bytes))
            .sum();
        let pausing: u64 = record
            .sandboxes
            .iter()
            .filter_map(|s| self.sandboxes.get(s))
            .filter(|s| s.state == SandboxState::Pausing)
            .map(memory)
            .sum();
        let need = self.sandboxes.get(&id).map_or(0, memory);
        let used = kept.saturating_add(pausing);
        if used.saturating_add(need) > budget {
            return Err(Rejection::SnapshotBudget {
                id,
                node: node.to_owned(),
                used,
                need,
                budget,
            });
        }
        Ok(())
    }

    /// The agent reports the snapshot taken: the sandbox is Paused, holds nothing on its
    /// node, and its tenant counts it as paused rather than active. Only a Running or
    /// Pausing sandbox (bound to the reporting node, which the caller checked) can be.
    /// Without `release` the caller has already taken it off its node and tenant (a
    /// registration recounts them).
    pub(super) fn paused(
        &mut self,
        id: SandboxId,
        bytes: u64,
        mode: SnapshotMode,
        now_ms: u64,
        release: bool,
    ) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        if !matches!(sandbox.state, SandboxState::Running | SandboxState::Pausing) {
            return Err(Rejection::InvalidTransition {
                id,
                state: sandbox.state.name(),
                what: "a pause report",
            });
        }
        if release {
            self.release(id);
        }
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return Ok(());
        };
        let before = sandbox.state.name();
        let Some(binding) = sandbox.binding.take() else {
            return Ok(());
        };
        let node = binding.placement.node;
        let runtime = self
            .nodes
            .get(&node)
            .map(|r| r.spec.runtime.clone())
            .unwrap_or_default();
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return Ok(());
        };
        sandbox.state = SandboxState::Paused;
        sandbox.snapshot = Some(SnapshotRecord {
            runtime,
            node: node.clone(),
            bytes,
            taken_ms: now_ms,
            mode,
        });
        let tenant = sandbox.spec.tenant.clone();
        self.count_state(before, -1);
        self.count_state("paused", 1);
        if let Some(record) = self.nodes.get_mut(&node) {
            record.snapshots.insert(id);
        }
        let record = self.tenants.entry(tenant).or_default();
        record.active_sandboxes = record.active_sandboxes.saturating_sub(1);
        record.paused_sandboxes += 1;
        Ok(())
    }

    /// The node could not take the snapshot (or freeze it) and the sandbox kept running: a
    /// Pausing sandbox is Running again, a Standby one too if its CPU is still free
    /// (anything else is left as it is).
    pub(super) fn pause_failed(&mut self, id: SandboxId, reason: &str, now_ms: u64) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if matches!(sandbox.state, SandboxState::Standby { .. }) {
            self.standby_failed(id, reason, now_ms);
            return;
        }
        if sandbox.state == SandboxState::Pausing {
            sandbox.state = SandboxState::Running;
            self.count_state("pausing", -1);
            self.count_state("running", 1);
        }
    }

    /// A Paused sandbox goes back to Pending with its snapshot; its tenant's concurrency
    /// quota is checked again, as at create.
    pub(super) fn resume(&mut self, id: SandboxId) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        match sandbox.state {
            SandboxState::Paused => {}
            SandboxState::Standby { .. } => return self.thaw(id),
            // Running already, or on its way back from a snapshot: a repeat does nothing.
            SandboxState::Running => return Ok(()),
            SandboxState::Pending | SandboxState::Scheduled if sandbox.snapshot.is_some() => {
                return Ok(());
            }
            _ => {
                return Err(Rejection::InvalidTransition {
                    id,
                    state: sandbox.state.name(),
                    what: "a resume",
                });
            }
        }
        let tenant = sandbox.spec.tenant.clone();
        let record = self.tenants.entry(tenant.clone()).or_default();
        if let Some(max) = record.quota.max_concurrent_sandboxes {
            if record.active_sandboxes >= max {
                return Err(Rejection::ConcurrencyQuota { tenant, max });
            }
        }
        record.active_sandboxes += 1;
        record.paused_sandboxes = record.paused_sandboxes.saturating_sub(1);
        if let Some(sandbox) = self.sandboxes.get_mut(&id) {
            sandbox.state = SandboxState::Pending;
            sandbox.pending_reason = None;
        }
        self.count_state("paused", -1);
        self.count_state("pending", 1);
        Ok(())
    }

    /// What a resume's bind to `to` says about snapshot affinity, worked out from the state
    /// before the bind holds anything (so every replica words it alike): a hit, or why the
    /// node holding the snapshot was not used. `None` for a sandbox with no snapshot.
    pub(super) fn affinity_note(&self, id: SandboxId, to: &NodeId) -> Option<String> {
        let sandbox = self.sandboxes.get(&id)?;
        let snap = sandbox.snapshot.as_ref()?;
        let restarted = match snap.mode {
            SnapshotMode::Memory => "",
            SnapshotMode::FilesystemOnly => {
                "; a filesystem-only snapshot: its files are restored and its processes restart"
            }
        };
        if snap.node == *to {
            return Some(format!(
                "snapshot affinity hit: restored on {to}, the node holding its snapshot{restarted}"
            ));
        }
        let spec = &sandbox.spec;
        let why = match self.nodes.get(&snap.node) {
            None => "that node is gone".to_owned(),
            Some(r) if r.status != NodeStatus::Ready => {
                format!("that node is {}", r.status.name())
            }
            Some(r)
                if r.cpu_milli_free() < spec.cpu_milli || r.memory_mib_free() < spec.memory_mib =>
            {
                format!(
                    "that node has {} milli-CPU and {} MiB free, and it needs {} and {}",
                    r.cpu_milli_free(),
                    r.memory_mib_free(),
                    spec.cpu_milli,
                    spec.memory_mib
                )
            }
            Some(_) => "it does not fit there (its GPUs or constraints)".to_owned(),
        };
        Some(format!(
            "snapshot affinity missed: its snapshot is on {}, and {why}; {to} fetches it{restarted}",
            snap.node
        ))
    }

    /// Forgets where a sandbox's snapshot lives (it runs again, or it ended).
    pub(super) fn drop_snapshot(&mut self, id: SandboxId) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if let Some(snapshot) = sandbox.snapshot.take() {
            if let Some(node) = self.nodes.get_mut(&snapshot.node) {
                node.snapshots.remove(&id);
            }
        }
    }
}
