//! The leader's planner: where the creates of a batch and the pending sandboxes go, before
//! they are proposed. [`Replica`](crate::replication::Replica) is Raft plumbing and calls
//! it at four points: to plan a create batch, to plan a pending pass, around each applied
//! entry (to keep the view in step), and when leadership or the state is replaced.
//!
//! The planner holds the leader's [`ClusterView`]: the applied state plus every placement
//! in flight (proposed, not yet applied), kept up to date incrementally ([`upkeep`]), the
//! in-flight reservations by log index, the typical workload FGD and berth score against,
//! and the cursor of the pending pass. Sans-IO like the state machine: time and seeds come
//! in as arguments.

mod upkeep;

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Placement, SandboxId, SandboxSpec};
use crate::placement::Placer;
use crate::placement::fragmentation::TypicalWorkload;
use crate::placement::view::ClusterView;
use crate::state::{State, Submission};

pub use upkeep::ViewPlan;

/// Placements of one proposal, each with the item (position in the command) it belongs to.
pub type Reservations = Vec<(usize, SandboxSpec, Placement)>;

/// What a pending pass found: binds to propose (with their reservations) and reasons that
/// changed.
#[derive(Debug, Default)]
pub struct PendingPlan {
    /// Sandboxes that fit now, with where.
    pub binds: Vec<(SandboxId, Placement)>,
    /// The reservations the binds hold in the view.
    pub reserved: Reservations,
    /// Sandboxes that still fit nowhere, with a reason that differs from the recorded one.
    pub reasons: Vec<(SandboxId, String)>,
    /// Resumes placed on the node holding their snapshot.
    pub affinity_hits: u64,
    /// Resumes placed elsewhere (their snapshot moves).
    pub affinity_misses: u64,
}

/// The leader's placement planning.
pub struct Planner {
    placer: Placer,
    seed: u64,
    pending_pass_limit: usize,
    /// Placements proposed but not applied, by log index.
    inflight: BTreeMap<u64, Reservations>,
    /// Pending sandboxes with a bind in flight, by log index.
    binding: BTreeMap<u64, Vec<SandboxId>>,
    /// The view and the state revision it is current for.
    view: Option<(u64, ClusterView)>,
    typical_revision: u64,
    pending_pass_revision: u64,
    pending_cursor: Option<SandboxId>,
}

impl Planner {
    /// A planner placing with `placer`; `seed` seeds the views' node ranks and the batches'
    /// tie-breaks; a pending pass looks at most at `pending_pass_limit` sandboxes.
    pub fn new(placer: Placer, seed: u64, pending_pass_limit: usize) -> Planner {
        Planner {
            placer,
            seed,
            pending_pass_limit,
            inflight: BTreeMap::new(),
            binding: BTreeMap::new(),
            view: None,
            typical_revision: u64::MAX,
            pending_pass_revision: u64::MAX,
            pending_cursor: None,
        }
    }

    /// Places a batch of creates (submissions with no placement yet) in one pass against
    /// the view and returns them placed where they fit, with the reservations to hand to [`Planner::proposed`] once proposed.
    /// Items the state already has (same tenant and request id) get no placement: they
    /// deduplicate; nor do items a warm pool serves now. `salt` varies the batch's seed.
    pub fn plan_creates(
        &mut self,
        state: &State,
        items: Vec<Submission>,
        salt: u64,
    ) -> (Vec<Submission>, Reservations) {
        self.refresh_typical(state);
        let seed = self.seed ^ state.revision() ^ salt;
        // A create a warm pool serves is left unplaced: `apply` hands it a ready member.
        let fresh: Vec<usize> = (0..items.len())
            .filter(|&i| {
                state
                    .by_request_id(&items[i].spec.tenant, &items[i].request_id)
                    .is_none()
                    && state.pool_for(&items[i].spec).is_none()
            })
            .collect();
        let batch: Vec<(SandboxId, &SandboxSpec)> = fresh
            .iter()
            .map(|&i| (SandboxId(i as u64), &items[i].spec))
            .collect();
        self.ensure_view(state);
        let decisions = match self.view.as_mut() {
            Some((_, view)) => self.placer.place_batch(view, &batch, seed),
            None => Vec::new(),
        };
        let mut placements: Vec<Option<Placement>> = vec![None; items.len()];
        for (id, decision) in decisions {
            placements[id.0 as usize] = decision.placement;
        }
        let mut reserved = Vec::new();
        let submissions = items
            .into_iter()
            .zip(placements)
            .enumerate()
            .map(|(i, (item, placement))| {
                if let Some(p) = &placement {
                    reserved.push((i, item.spec.clone(), p.clone()));
                }
                Submission { placement, ..item }
            })
            .collect();
        (submissions, reserved)
    }

    /// The leader's background pass: which pending sandboxes fit now, and why the others
    /// do not. `None` unless the state changed since the last pass. A bounded slice per
    /// pass, resuming after the last sandbox tried, so a large unplaceable backlog costs a
    /// fixed amount per pass and every sandbox is retried in turn (highest priority, then
    /// oldest, first).
    pub fn plan_pending(&mut self, state: &State) -> Option<PendingPlan> {
        if state.revision() == self.pending_pass_revision {
            return None;
        }
        self.pending_pass_revision = state.revision();
        let in_flight: BTreeSet<SandboxId> = self.binding.values().flatten().copied().collect();
        let all: Vec<&crate::model::Sandbox> = state
            .pending()
            .into_iter()
            .filter(|s| !in_flight.contains(&s.id))
            .collect();
        let start = all
            .iter()
            .position(|s| self.pending_cursor.is_some_and(|c| s.id == c))
            .map_or(0, |i| i + 1);
        let candidates: Vec<&crate::model::Sandbox> = all
            .iter()
            .cycle()
            .skip(start % all.len().max(1))
            .take(self.pending_pass_limit.min(all.len()))
            .copied()
            .collect();
        self.pending_cursor = candidates.last().map(|s| s.id);
        if candidates.is_empty() {
            return None;
        }
        self.refresh_typical(state);
        let seed = self.seed ^ state.revision();
        self.ensure_view(state);
        let mut plan = PendingPlan::default();
        // A resume tries the node holding its snapshot first (snapshot affinity), then any
        // node with the snapshot's runtime; the others are placed as a batch.
        let mut pending: Vec<(SandboxId, SandboxSpec, Option<String>)> = Vec::new();
        for s in candidates {
            let (Some(snap), Some((_, view))) = (&s.snapshot, self.view.as_mut()) else {
                pending.push((s.id, s.spec.clone(), s.pending_reason.clone()));
                continue;
            };
            let seed = seed ^ s.id.0;
            let placement = match self.placer.place_on(view, &s.spec, &snap.node, seed) {
                Some(p) => {
                    plan.affinity_hits += 1;
                    Some(p)
                }
                None => {
                    let decision =
                        self.placer
                            .place_with_runtime(view, &s.spec, &snap.runtime, seed);
                    if decision.placement.is_none() {
                        let reason = format!(
                            "resuming from a snapshot on {}: {}",
                            snap.node,
                            decision.explanation.summary()
                        );
                        if s.pending_reason.as_deref() != Some(reason.as_str()) {
                            plan.reasons.push((s.id, reason));
                        }
                    } else {
                        plan.affinity_misses += 1;
                    }
                    decision.placement
                }
            };
            if let Some(p) = placement {
                plan.reserved
                    .push((plan.binds.len(), s.spec.clone(), p.clone()));
                plan.binds.push((s.id, p));
            }
        }
        let batch: Vec<(SandboxId, &SandboxSpec)> =
            pending.iter().map(|(id, spec, _)| (*id, spec)).collect();
        let decisions = match self.view.as_mut() {
            Some((_, view)) => self.placer.place_batch(view, &batch, seed),
            None => Vec::new(),
        };
        for ((id, decision), (_, spec, old_reason)) in decisions.into_iter().zip(&pending) {
            match decision.placement {
                Some(p) => {
                    plan.reserved
                        .push((plan.binds.len(), spec.clone(), p.clone()));
                    plan.binds.push((id, p));
                }
                None => {
                    let reason = decision.explanation.summary();
                    if old_reason.as_deref() != Some(reason.as_str()) {
                        plan.reasons.push((id, reason));
                    }
                }
            }
        }
        Some(plan)
    }

    /// The entry at `index` carries `reserved` (and, for a bind, the `binding` sandboxes):
    /// the view keeps them until it applies.
    pub fn proposed(&mut self, index: u64, reserved: Reservations, binding: Vec<SandboxId>) {
        if !reserved.is_empty() {
            self.inflight.insert(index, reserved);
        }
        if !binding.is_empty() {
            self.binding.insert(index, binding);
        }
    }

    /// A planned proposal was refused by Raft: the view holds reservations that will never
    /// apply, so it is rebuilt before the next placement.
    pub fn proposal_failed(&mut self) {
        self.view = None;
    }

    /// The entry at `index` applied (or was skipped): its reservations are the state's now.
    pub fn applied(&mut self, index: u64) {
        self.inflight.remove(&index);
        self.binding.remove(&index);
    }

    /// This replica became leader: refresh the typical workload and run a pending pass.
    pub fn became_leader(&mut self) {
        self.pending_pass_revision = u64::MAX;
        self.typical_revision = u64::MAX;
    }

    /// Leadership was lost, or the state was replaced by a snapshot: nothing in flight is
    /// ours any more.
    pub fn reset(&mut self) {
        self.inflight.clear();
        self.binding.clear();
        self.view = None;
    }

    /// Proposals with placements in flight (metrics).
    pub fn inflight_entries(&self) -> usize {
        self.inflight.len()
    }

    fn refresh_typical(&mut self, state: &State) {
        // The typical workload follows the live mix; recomputing it is linear in the
        // sandboxes, so it is refreshed when the state has moved on by a margin.
        let revision = state.revision();
        if self.typical_revision != u64::MAX && revision < self.typical_revision + 1_000 {
            return;
        }
        self.typical_revision = revision;
        let live = state
            .sandboxes()
            .values()
            .filter(|s| !s.state.is_terminal())
            .map(|s| &s.spec);
        self.placer.set_typical(TypicalWorkload::from_specs(live));
    }

    /// The applied state plus every in-flight placement, as a fresh view.
    fn rebuild(&self, state: &State) -> ClusterView {
        let mut view = ClusterView::from_state(state, self.seed);
        for reservations in self.inflight.values() {
            for (_, spec, placement) in reservations {
                view.reserve(spec, placement);
            }
        }
        view
    }

    /// Builds the view unless the one held is current: placements reserve into it as they
    /// are made.
    fn ensure_view(&mut self, state: &State) {
        let revision = state.revision();
        if self.view.as_ref().is_some_and(|(r, _)| *r == revision) {
            return;
        }
        self.view = Some((revision, self.rebuild(state)));
    }
}
