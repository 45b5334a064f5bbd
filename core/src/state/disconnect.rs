//! The disconnect grace (Nomad's `max_client_disconnect`): a node silent past its TTL is
//! Down, and its Scheduled and Running sandboxes are Unknown. They keep their CPU, memory
//! and GPUs on the node. If the node's agent registers again in time, its report stands
//! (`register_node`); an Exited or Failed report on the old stream stands too (`update`).
//! Once the grace has ended they are Lost.
//!
//! Time is the entries' clock: the grace ends at `now_ms + grace_ms` of the
//! `NodeDisconnected` entry, and an `ExpireDisconnected` entry loses only the sandboxes
//! whose end has passed at its own `now_ms`. The leader proposes that entry when its clock
//! says the grace is over ([`State::disconnect_grace_over`]); every replica decides the
//! same from the entry alone.

use super::State;
use super::apply::truncate;
use super::command::{MAX_DISCONNECT_GRACE_MS, Rejection};
use crate::model::{NodeStatus, SandboxId, SandboxState};

impl State {
    /// Marks a silent node Down and its sandboxes Unknown until `now_ms + grace_ms`; with
    /// a grace of 0 they are Lost at once, as an operator's Down does.
    pub(super) fn disconnect_node(
        &mut self,
        id: &str,
        reason: &str,
        grace_ms: u64,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        if grace_ms == 0 {
            return self.set_node_status(id, NodeStatus::Down, reason, now_ms);
        }
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| Rejection::UnknownNode(id.to_owned()))?;
        if node.status == NodeStatus::Down {
            // Already down: its sandboxes are Unknown or Lost; a second report changes nothing.
            return Ok(());
        }
        let reason = truncate(reason, 1024);
        node.status = NodeStatus::Down;
        node.status_reason = reason.clone();
        let lost_after_ms = now_ms.saturating_add(grace_ms.min(MAX_DISCONNECT_GRACE_MS));
        let held: Vec<SandboxId> = node.sandboxes.iter().copied().collect();
        for sandbox in held {
            let Some(s) = self.sandboxes.get_mut(&sandbox) else {
                continue;
            };
            let was_running = match s.state {
                // A pause in progress is given up: the sandbox comes back Running.
                // So is a standby: its agent's report decides what it is when it returns.
                SandboxState::Running | SandboxState::Pausing | SandboxState::Standby { .. } => {
                    true
                }
                SandboxState::Scheduled => false,
                _ => continue,
            };
            let before = s.state.name();
            s.state = SandboxState::Unknown {
                reason: reason.clone(),
                since_ms: now_ms,
                lost_after_ms,
                was_running,
            };
            self.count_state(before, -1);
            self.count_state("unknown", 1);
        }
        Ok(())
    }

    /// Loses an Unknown sandbox whose grace has ended at `now_ms`, releasing what it held.
    pub(super) fn expire_disconnected(
        &mut self,
        id: SandboxId,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        let SandboxState::Unknown {
            reason,
            since_ms,
            lost_after_ms,
            ..
        } = &sandbox.state
        else {
            return Err(Rejection::InvalidTransition {
                id,
                state: sandbox.state.name(),
                what: "the end of a disconnect grace",
            });
        };
        if now_ms < *lost_after_ms {
            return Err(Rejection::GraceNotOver {
                id,
                lost_after_ms: *lost_after_ms,
            });
        }
        let node = sandbox
            .binding
            .as_ref()
            .map_or("?", |b| b.placement.node.as_str());
        let reason = format!(
            "node {node} did not come back within the {} ms disconnect grace (down: {reason})",
            lost_after_ms - since_ms
        );
        self.finish(id, SandboxState::Lost { reason }, now_ms, true);
        Ok(())
    }

    /// Unknown sandboxes whose disconnect grace has ended at `now_ms`, at most `limit`:
    /// what the leader proposes to expire. Looks only at Down nodes, so it costs nothing
    /// while every node is up.
    pub fn disconnect_grace_over(&self, now_ms: u64, limit: usize) -> Vec<SandboxId> {
        self.nodes
            .values()
            .filter(|n| n.status == NodeStatus::Down)
            .flat_map(|n| n.sandboxes.iter())
            .filter(|id| {
                self.sandboxes.get(*id).is_some_and(|s| {
                    matches!(s.state, SandboxState::Unknown { lost_after_ms, .. } if lost_after_ms <= now_ms)
                })
            })
            .take(limit)
            .copied()
            .collect()
    }

    /// An Unknown sandbox whose node is back returns to Running or Scheduled, as it was.
    pub(super) fn reconnect(&mut self, id: SandboxId) {
        let Some(sandbox) = self.sandboxes.get_mut(&id) else {
            return;
        };
        let SandboxState::Unknown { was_running, .. } = sandbox.state else {
            return;
        };
        sandbox.state = if was_running {
            SandboxState::Running
        } else {
            SandboxState::Scheduled
        };
        let after = sandbox.state.name();
        self.count_state("unknown", -1);
        self.count_state(after, 1);
    }
}
