//! Standby, the fast tier of idle: Running → Standby (frozen in place; its memory and GPUs
//! stay held on its node, its CPU is given back) → Scheduled on the same node (thawed, once
//! the node has the CPU free) → Running when the agent reports it thawed. A Standby sandbox
//! may also be paused to disk (Pausing takes its CPU back for the checkpoint).
//!
//! A node's `standby` set is the one record of whose CPU is not counted: the accounting in
//! `account_node` reads it, so every transition here re-accounts the sandbox (off the node,
//! set changed, on again) and the counters cannot drift.

use super::State;
use super::command::Rejection;
use crate::model::{SandboxId, SandboxState};

impl State {
    /// Standby sandboxes frozen for `after_ms` or longer at `now_ms`, at most `limit`: what
    /// the leader pauses to disk. Costs nothing while no sandbox is on standby.
    pub fn standby_over(&self, now_ms: u64, after_ms: u64, limit: usize) -> Vec<SandboxId> {
        if !self.sandboxes_by_state.contains_key("standby") {
            return Vec::new();
        }
        self.nodes
            .values()
            .flat_map(|n| n.standby.iter())
            .filter(|id| {
                // A warm pool's members stay on standby: that is what the pool is for.
                self.sandboxes.get(*id).is_some_and(|s| {
                    s.pool.is_none()
                        && matches!(s.state, SandboxState::Standby { since_ms }
                        if since_ms.saturating_add(after_ms) <= now_ms)
                })
            })
            .take(limit)
            .copied()
            .collect()
    }

    /// A Running sandbox is frozen in place; one already on standby is left as it is.
    pub(super) fn standby(&mut self, id: SandboxId, now_ms: u64) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get_mut(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        match sandbox.state {
            SandboxState::Standby { .. } => return Ok(()),
            SandboxState::Running => {}
            _ => {
                return Err(Rejection::InvalidTransition {
                    id,
                    state: sandbox.state.name(),
                    what: "a standby",
                });
            }
        }
        if let Some(node) = sandbox.binding.as_ref().map(|b| &b.placement.node) {
            if self
                .nodes
                .get(node)
                .is_some_and(|r| r.spec.runtime == "process")
            {
                return Err(Rejection::NoCheckpoint(id, node.clone()));
            }
        }
        sandbox.state = SandboxState::Standby { since_ms: now_ms };
        // What its last bind said is history now.
        sandbox.placement_note = None;
        self.count_state("running", -1);
        self.count_state("standby", 1);
        self.set_cpu_released(id, true);
        Ok(())
    }

    /// A Standby sandbox's CPU is taken back on its node, if the node has it free.
    pub(super) fn take_cpu_back(&mut self, id: SandboxId) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        let need = sandbox.spec.cpu_milli;
        let Some(node) = sandbox.binding.as_ref().map(|b| b.placement.node.clone()) else {
            return Ok(());
        };
        let free = self.nodes.get(&node).map_or(0, |r| r.cpu_milli_free());
        if free < need {
            return Err(Rejection::NoRoomToThaw {
                id,
                node,
                free,
                need,
            });
        }
        self.set_cpu_released(id, false);
        Ok(())
    }

    /// Resumes a Standby sandbox: thawed on its node, which is told by a new assignment
    /// (its binding's revision moves on), and Running once the agent says so.
    pub(super) fn thaw(&mut self, id: SandboxId) -> Result<(), Rejection> {
        self.take_cpu_back(id)?;
        let revision = self.revision;
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return Ok(());
        };
        let Some(binding) = sandbox.binding.as_mut() else {
            return Ok(());
        };
        binding.bound_revision = revision;
        sandbox.placement_note = Some(format!(
            "thawed from standby on {}, where its memory stayed",
            binding.placement.node
        ));
        sandbox.state = SandboxState::Scheduled;
        self.count_state("standby", -1);
        self.count_state("scheduled", 1);
        Ok(())
    }

    /// The agent could not freeze the sandbox and it runs on: Running again with its CPU
    /// when the node still has it free; otherwise it fails, as its CPU went to others.
    pub(super) fn standby_failed(&mut self, id: SandboxId, reason: &str, now_ms: u64) {
        match self.take_cpu_back(id) {
            Ok(()) => {
                if let Some(sandbox) = self.sandboxes.get_mut(&id) {
                    sandbox.state = SandboxState::Running;
                }
                self.count_state("standby", -1);
                self.count_state("running", 1);
            }
            Err(_) => {
                let reason = format!(
                    "it could not be frozen ({}), and the CPU it gave back is in use",
                    super::apply::truncate(reason, 512)
                );
                self.finish(id, SandboxState::Failed { reason }, now_ms, true);
            }
        }
    }

    /// A Running sandbox its agent reports frozen (at a registration) is Standby; its
    /// node's `standby` set already holds it.
    pub(super) fn mark_standby(&mut self, id: SandboxId, now_ms: u64) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        if sandbox.state == SandboxState::Running {
            sandbox.state = SandboxState::Standby { since_ms: now_ms };
            self.count_state("running", -1);
            self.count_state("standby", 1);
        }
    }

    /// Re-accounts a bound sandbox with its CPU given back (`released`) or held.
    pub(super) fn set_cpu_released(&mut self, id: SandboxId, released: bool) {
        let Some(node) = self
            .sandboxes
            .get(&id)
            .and_then(|s| s.binding.as_ref())
            .map(|b| b.placement.node.clone())
        else {
            return;
        };
        if !self
            .nodes
            .get(&node)
            .is_some_and(|r| r.sandboxes.contains(&id))
        {
            return;
        }
        self.account_node(id, false);
        if let (true, Some(record)) = (released, self.nodes.get_mut(&node)) {
            record.standby.insert(id);
        }
        self.account_node(id, true);
    }
}
