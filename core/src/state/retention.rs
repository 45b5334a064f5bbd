//! Snapshot retention: a sandbox paused to a node's disk is kept there for its tenant's
//! `[scheduler.sessions] snapshot_retention_ms`, then ended. The retention is the
//! leader's config, not replicated state, so the leader picks the sandboxes past it
//! ([`State::snapshots_older`]) and its entry carries each with the retention it used;
//! apply re-checks each against the entry's clock, so a sandbox resumed meanwhile stays.
//! Ending one drops it from its node's `snapshots`, and the node's feed then tells the
//! agent holding it to remove the snapshot from disk.
//!
//! The same entry ends a paused sandbox past its own idle limit (`idle_timeout_ms`, in
//! its replicated spec): paused time counts toward idle, and the shim that enforces the
//! limit on a running sandbox is not there while it is paused. Idle is counted from the
//! pause (the agent's report does not carry the last call's time), so the idle time
//! before the pause is forgiven.

use super::State;
use super::command::Rejection;
use crate::model::{SandboxId, SandboxState};

impl State {
    /// Paused sandboxes whose snapshot is older than their tenant's retention at `now_ms`
    /// (`retention_of(tenant)`, 0 = kept forever) or than their own idle limit, each with
    /// its tenant's retention, at most `limit`. Costs nothing while no sandbox is paused.
    pub fn snapshots_older(
        &self,
        now_ms: u64,
        retention_of: impl Fn(&str) -> u64,
        limit: usize,
    ) -> Vec<(SandboxId, u64)> {
        if !self.sandboxes_by_state.contains_key("paused") {
            return Vec::new();
        }
        self.nodes
            .values()
            .flat_map(|n| n.snapshots.iter())
            .filter_map(|id| {
                let s = self.sandboxes.get(id)?;
                if s.state != SandboxState::Paused {
                    return None;
                }
                let retention = retention_of(&s.spec.tenant);
                let taken = s.snapshot.as_ref()?.taken_ms;
                let past = |limit: u64| limit > 0 && taken.saturating_add(limit) <= now_ms;
                (past(retention) || past(s.spec.idle_timeout_ms)).then_some((*id, retention))
            })
            .take(limit)
            .collect()
    }

    /// Ends a Paused sandbox whose snapshot was taken `retention_ms` or more before
    /// `now_ms`; anything else (resumed, ended, a younger snapshot, retention 0) is
    /// refused and left as it is.
    pub(super) fn expire_snapshot(
        &mut self,
        id: SandboxId,
        retention_ms: u64,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let sandbox = self
            .sandboxes
            .get(&id)
            .ok_or(Rejection::UnknownSandbox(id))?;
        let idle_ms = sandbox.spec.idle_timeout_ms;
        let taken_ms = match (&sandbox.state, &sandbox.snapshot) {
            (SandboxState::Paused, Some(snapshot)) => snapshot.taken_ms,
            _ => {
                return Err(Rejection::InvalidTransition {
                    id,
                    state: sandbox.state.name(),
                    what: "a snapshot expiry",
                });
            }
        };
        if idle_ms > 0 && taken_ms.saturating_add(idle_ms) <= now_ms {
            let reason = format!(
                "idle: no exec or file call for {idle_ms} ms while paused (idle_timeout_ms = \
                 {idle_ms}); its snapshot was deleted"
            );
            self.finish(id, SandboxState::Failed { reason }, now_ms, true);
            return Ok(());
        }
        if retention_ms == 0 || taken_ms.saturating_add(retention_ms) > now_ms {
            return Err(Rejection::SnapshotKept {
                id,
                taken_ms,
                retention_ms,
            });
        }
        let reason = format!(
            "its snapshot was kept for {retention_ms} ms ([scheduler.sessions] \
             snapshot_retention_ms) and deleted"
        );
        self.finish(id, SandboxState::Failed { reason }, now_ms, true);
        Ok(())
    }
}
