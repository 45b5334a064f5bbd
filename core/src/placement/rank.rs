//! Ranking candidates: the policy's score, then image affinity, then the policy's own tie,
//! then the seeded rank; and the best few kept for the explanation.

use berth_proto::GpuModelName;

use super::TOP_SCORES_KEPT;
use super::image::{ImageAsk, ImageRule};
use super::policy;
use super::view::{NodeIndex, NodeView};

/// How candidates are ranked for one decision: the policy's score, then image affinity.
pub(super) struct Ranking<'a> {
    /// The policy's component name in explanations.
    pub(super) policy: &'static str,
    pub(super) rule: ImageRule,
    /// `None` when the sandbox names no image or the rule is off.
    pub(super) image: Option<ImageAsk<'a>>,
}

impl Ranking<'_> {
    /// Whether the node holds the sandbox's image.
    pub(super) fn holds(&self, index: NodeIndex) -> bool {
        self.image.is_some_and(|image| image.cached(index))
    }

    pub(super) fn standing(
        &self,
        node: &NodeView,
        holds: bool,
        scored: &policy::Scored,
    ) -> Standing {
        let (cached, bonus) = match self.rule {
            ImageRule::Off => (false, 0.0),
            // An image is worth a tie, never a node: an empty holder does not count, or
            // image ties would open nodes that first-fit order keeps empty (measured:
            // +22 % nodes in use at half load and +1.1 points of unallocated GPU).
            ImageRule::TieBreak => (holds && node.in_use(), 0.0),
            ImageRule::Bonus(_) => (holds, if holds { self.rule.bonus_points() } else { 0.0 }),
        };
        Standing {
            total: scored.score + bonus,
            cached,
            tie: scored.tie,
        }
    }

    pub(super) fn components(
        &self,
        holds: bool,
        standing: &Standing,
        score: f64,
    ) -> Vec<(&'static str, f64)> {
        let mut components = vec![(self.policy, score)];
        if self.image.is_some() {
            components.push(("image_cached", f64::from(u8::from(holds))));
            if let ImageRule::Bonus(_) = self.rule {
                components.push(("image_bonus", standing.total - score));
            }
        }
        components
    }
}

/// A candidate's standing. Field order is the priority: higher wins, field by field; what
/// is still equal goes to the lowest seeded rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Standing {
    /// Policy score, plus the image bonus under a bonus rule.
    pub(super) total: f64,
    /// The node's image counts: it holds the sandbox's image and, under the default rule,
    /// already runs sandboxes (always false without an image question).
    pub(super) cached: bool,
    /// The policy's own tie-break.
    pub(super) tie: f64,
}

impl Standing {
    /// `(self, rank)` against `(other, other_rank)`: `Greater` is better. Floats compare as
    /// `<`/`>` do (so 0.0 and -0.0 are equal, as the policies' ties assume).
    pub(super) fn order(&self, rank: u32, other: &Standing, other_rank: u32) -> std::cmp::Ordering {
        let float = |a: f64, b: f64| a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal);
        float(self.total, other.total)
            .then(self.cached.cmp(&other.cached))
            .then(float(self.tie, other.tie))
            .then(other_rank.cmp(&rank))
    }
}

/// A scored node.
pub(super) struct Candidate {
    pub(super) index: NodeIndex,
    pub(super) rank: u32,
    pub(super) standing: Standing,
    /// The node holds the sandbox's image.
    pub(super) holds: bool,
    pub(super) gpus: Vec<u32>,
    pub(super) model: Option<GpuModelName>,
}

/// The best candidate so far, and the runners-up for the explanation.
#[derive(Default)]
pub(super) struct Best {
    pub(super) node: Option<Candidate>,
    /// The best few candidates offered, best first.
    pub(super) top: Vec<Ranked>,
}

/// A candidate as the explanation lists it. Plain data, so offering a node allocates
/// nothing; components are named only for the few kept.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ranked {
    pub(super) index: NodeIndex,
    pub(super) rank: u32,
    pub(super) standing: Standing,
    /// The policy's score.
    pub(super) score: f64,
    pub(super) holds: bool,
}

impl Best {
    pub(super) fn offer(
        &mut self,
        ranking: &Ranking<'_>,
        index: NodeIndex,
        node: &NodeView,
        scored: policy::Scored,
        model: Option<&GpuModelName>,
    ) {
        let rank = node.rank;
        let holds = ranking.holds(index);
        let standing = ranking.standing(node, holds, &scored);
        let better = match &self.node {
            None => true,
            Some(best) => standing.order(rank, &best.standing, best.rank).is_gt(),
        };
        self.keep(Ranked {
            index,
            rank,
            standing,
            score: scored.score,
            holds,
        });
        if better {
            self.node = Some(Candidate {
                index,
                rank,
                standing,
                holds,
                gpus: scored.gpus,
                model: model.cloned(),
            });
        }
    }

    /// Keeps the best [`TOP_SCORES_KEPT`], best first, by insertion: most candidates lose
    /// to the last kept one in one comparison.
    pub(super) fn keep(&mut self, ranked: Ranked) {
        let beats = |kept: &Ranked| {
            ranked
                .standing
                .order(ranked.rank, &kept.standing, kept.rank)
                .is_gt()
        };
        let at = self
            .top
            .iter()
            .rposition(|kept| !beats(kept))
            .map_or(0, |i| i + 1);
        if at < TOP_SCORES_KEPT {
            self.top.insert(at, ranked);
            self.top.truncate(TOP_SCORES_KEPT);
        }
    }

    pub(super) fn into_option(self) -> Option<Best> {
        self.node.is_some().then_some(self)
    }
}
