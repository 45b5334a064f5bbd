//! Keeping the leader's view in step with the log, entry by entry. Rebuilding it (a pass
//! over every node) per batch would dominate the hot path, so each applied entry adjusts it:
//! the leader's own creates and binds keep the reservations `apply` accepted and give back
//! the rest, deletes, terminations and the end of a disconnect grace release, and anything
//! else (node changes, a Down node's sandboxes turning Unknown, a former leader's entries)
//! drops the view for a rebuild. Unknown sandboxes keep what they hold, in the view as in
//! the state. The view counts reservations beyond a node's free capacity ("overdraft"), so
//! reserve then release is an exact round trip and the view cannot drift;
//! [`Planner::view_is_consistent`] compares it with a rebuild.

use super::Planner;
use crate::model::{Placement, SandboxId, SandboxSpec};
use crate::placement::view::ClusterView;
use crate::state::{Command, ItemOutcome, State, StatusChange};

/// What applying one entry does to the leader's view.
pub enum ViewPlan {
    /// Nothing it tracks changes.
    Nothing,
    /// Rebuild it before the next placement.
    Invalidate,
    /// Give back what these sandboxes held if they no longer hold it after the entry.
    Release(Vec<(SandboxId, SandboxSpec, Placement)>),
    /// The leader's own creates or binds: keep reservations that were accepted.
    Ours,
}

impl Planner {
    /// What `command`, about to apply to `state`, does to the view; `mine` when it is this
    /// leader's own proposal.
    pub fn before_apply(&self, state: &State, command: &Command, mine: bool) -> ViewPlan {
        if self.view.is_none() {
            return ViewPlan::Nothing;
        }
        let holding = |id: &SandboxId| {
            let s = state.sandbox(*id)?;
            let binding = s.binding.as_ref()?;
            let mut spec = s.spec.clone();
            // A Standby sandbox holds no CPU, so it has none to give back.
            if state
                .node(&binding.placement.node)
                .is_some_and(|r| r.standby.contains(id))
            {
                spec.cpu_milli = 0;
            }
            s.state
                .holds_resources()
                .then(|| (*id, spec, binding.placement.clone()))
        };
        match command {
            Command::SubmitSandboxes { .. } | Command::BindSandboxes { .. } if mine => {
                ViewPlan::Ours
            }
            Command::SetPendingReasons { .. } | Command::ExpireTerminal { .. } => ViewPlan::Nothing,
            Command::DeleteSandboxes { items } | Command::ExpireDisconnected { items } => {
                ViewPlan::Release(items.iter().filter_map(holding).collect())
            }
            // A failed pause or freeze may take CPU back, and a warm pool's member reported
            // running gives its CPU back (it goes on standby): a rebuild sees it.
            Command::UpdateSandboxes { items }
                if items.iter().any(|u| {
                    matches!(u.change, StatusChange::PauseFailed { .. })
                        || state.sandbox(u.sandbox).is_some_and(|s| s.pool.is_some())
                }) =>
            {
                ViewPlan::Invalidate
            }
            Command::UpdateSandboxes { items } => ViewPlan::Release(
                items
                    .iter()
                    .filter(|u| !matches!(u.change, StatusChange::Running))
                    .filter_map(|u| holding(&u.sandbox))
                    .collect(),
            ),
            _ => ViewPlan::Invalidate,
        }
    }

    /// Carries out `plan` after the entry at `index` applied with `outcomes`.
    pub fn after_apply(
        &mut self,
        state: &State,
        plan: ViewPlan,
        outcomes: &[ItemOutcome],
        index: u64,
    ) {
        let Some((revision, view)) = self.view.as_mut() else {
            return;
        };
        match plan {
            ViewPlan::Nothing => {}
            ViewPlan::Invalidate => {
                self.view = None;
                return;
            }
            ViewPlan::Release(list) => {
                for (id, spec, placement) in list {
                    let still_holds = state.sandbox(id).is_some_and(|s| s.state.holds_resources());
                    if !still_holds {
                        view.release(&spec, &placement);
                    }
                }
            }
            // A claim thawed a warm pool's member, taking its CPU back: a rebuild sees it.
            ViewPlan::Ours
                if outcomes
                    .iter()
                    .any(|o| matches!(o, ItemOutcome::Claimed { .. })) =>
            {
                self.view = None;
                return;
            }
            ViewPlan::Ours => {
                for (item, spec, placement) in self.inflight.get(&index).into_iter().flatten() {
                    let kept = matches!(
                        outcomes.get(*item),
                        Some(ItemOutcome::Created { bound: true, .. } | ItemOutcome::Applied)
                    );
                    if !kept {
                        view.release(spec, placement);
                    }
                }
            }
        }
        *revision = state.revision();
    }

    /// Whether the incrementally kept view agrees with one rebuilt from `state` and the
    /// in-flight placements (tests; `None` when no view is held).
    pub fn view_is_consistent(&self, state: &State) -> Option<bool> {
        let (revision, view) = self.view.as_ref()?;
        if *revision != state.revision() {
            return Some(true);
        }
        let fresh = self.rebuild(state);
        let free = |v: &ClusterView| -> Vec<(String, u64, u64, Vec<u32>)> {
            let mut out: Vec<_> = v
                .nodes()
                .iter()
                .map(|n| {
                    (
                        n.spec.id.clone(),
                        n.cpu_milli_free,
                        n.memory_mib_free,
                        n.gpu_milli_free.clone(),
                    )
                })
                .collect();
            out.sort();
            out
        };
        Some(free(view) == free(&fresh))
    }
}
