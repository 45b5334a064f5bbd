//! The placement engine: turns pending sandboxes into placements, explaining every decision.
//!
//! For one sandbox, the request is walked in **tiers**: every option on its own models, in
//! order, then each option upgraded to strictly better models it does not list (only when
//! the operator allows upgrades and the option has no `!`). The first tier with a feasible
//! node wins, so a fallback is used only when every preferred choice is full, and a model the
//! user listed is tried before one the operator would substitute. Within a tier:
//!
//! 1. **Candidates** come from the view's indexes: nodes with enough fully free GPUs (whole
//!    requests), a GPU with enough free share (fractional), or enough CPU (CPU-only), visited
//!    tightest first. With a `candidate_limit`, the scan stops after that many feasible nodes:
//!    the tightest fits are the ones packing policies want anyway, and it bounds a decision's
//!    cost at any cluster size.
//! 2. **Filters** ([`filters`]), cheapest first: node ready, location, capacity type, labels,
//!    taints, CPU/memory, tenant GPU quota. Each rejection is counted by reason.
//! 3. **Scoring** by the [`policy`], then **image affinity** ([`image`]): under the default
//!    rule a node that holds the sandbox's image and already runs sandboxes wins among
//!    nodes the policy scores equal (a bonus rule may add points instead). The highest standing wins, and what is still
//!    equal goes to the node with the lowest seeded rank (the FGD artifact's tie-breaking),
//!    so one seed gives one plan. Image affinity comes after the policy, not inside it,
//!    because it is a separate concern with its own rule and its own explanation component.
//!
//! # Layout
//! - [`view`]: free capacity per node and the indexes.
//! - [`filters`]: feasibility filters and their reasons.
//! - [`fragmentation`]: the FGD fragmentation measure and typical workloads.
//! - [`policy`]: random, bestfit, fgd (the paper's baselines) and berth's default.
//! - [`image`]: image affinity: the rule and the index of images nodes hold.
//! - `rank`: how candidates are compared and the best few kept.

pub mod filters;
pub mod fragmentation;
pub mod image;
mod name;
pub mod policy;
mod rank;
pub mod view;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_proto::GpuModelName;
use berth_proto::gpu::{GpuAmount, GpuModelSelector, GpuOption};

use crate::model::{Placement, SandboxId, SandboxSpec};
use filters::Reason;
use fragmentation::TypicalWorkload;
use image::{ImageAsk, ImageRule};
pub use name::PolicyName;
use policy::{GpuAsk, Policy, ScoreContext};
use rank::{Best, Candidate, Ranking};
use view::{ClusterView, Location, NodeIndex};

/// Fewest feasible nodes scored per model or location when the candidate limit is split.
const MIN_CANDIDATES_PER_MODEL: usize = 4;

/// How many top-scored nodes an explanation keeps.
const TOP_SCORES_KEPT: usize = 3;

/// Why a sandbox was (or could not be) placed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Explanation {
    /// Nodes examined.
    pub nodes_evaluated: u32,
    /// Rejections by reason, for the most preferred choice (option 0 on its own models).
    pub filtered: BTreeMap<Reason, u32>,
    /// Best few nodes with their score components, best first.
    pub top_scores: Vec<NodeScore>,
    /// The tier that placed it: (option index, upgraded model if any).
    pub tier: Option<(u32, Option<GpuModelName>)>,
    /// Whether the chosen node holds the sandbox's image; `None` when the sandbox names no
    /// image or image affinity is off.
    pub image_cached: Option<bool>,
}

/// A node's score in an explanation, by named component (`types.proto`'s `NodeScore`).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeScore {
    /// Node id.
    pub node: String,
    /// What the candidates are ordered by first: the policy score plus any image bonus.
    pub total: f64,
    /// Named components: the policy's (`fragmentation`, `best_fit`, `random`), then, when
    /// the sandbox names an image and affinity is on, `image_cached` (1 when the node holds
    /// it; compared right after the total, and under the default rule only for nodes that
    /// already run sandboxes) and under a bonus rule `image_bonus` (points in the total).
    pub components: Vec<(&'static str, f64)>,
}

impl Explanation {
    /// One line a user can read.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        match &self.tier {
            Some((option, None)) => {
                let _ = write!(out, "placed with option {option}");
            }
            Some((option, Some(model))) => {
                let _ = write!(out, "placed with option {option} upgraded to {model}");
            }
            None => {
                let _ = write!(out, "no node fits ({} evaluated)", self.nodes_evaluated);
            }
        }
        match self.image_cached {
            Some(true) => out.push_str(", image cached there"),
            Some(false) => out.push_str(", image not cached there"),
            None => {}
        }
        let mut reasons: Vec<(&Reason, &u32)> = self.filtered.iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if !reasons.is_empty() {
            out.push_str(": ");
            let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
            out.push_str(&parts.join(", "));
        }
        out
    }

    fn count(&mut self, reason: Reason, nodes: u32) {
        if nodes > 0 {
            *self.filtered.entry(reason).or_default() += nodes;
        }
    }
}

/// The decision for one sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Where, or `None` when nothing fits.
    pub placement: Option<Placement>,
    /// Why.
    pub explanation: Explanation,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct PlacerConfig {
    /// Scoring policy.
    pub policy: PolicyName,
    /// Serve non-`!` options with strictly better models when allowed.
    pub allow_gpu_upgrade: bool,
    /// Stop scanning after this many feasible nodes per tier; `None` scores every one.
    pub candidate_limit: Option<usize>,
    /// How a cached image counts ([`ImageRule::DEFAULT`]).
    pub image_rule: ImageRule,
}

impl Default for PlacerConfig {
    fn default() -> Self {
        PlacerConfig {
            policy: PolicyName::Berth,
            allow_gpu_upgrade: false,
            candidate_limit: Some(DEFAULT_CANDIDATE_LIMIT),
            image_rule: ImageRule::DEFAULT,
        }
    }
}

/// Feasible nodes scored per tier by default: enough for packing quality (the openb
/// benchmark shows no loss against scoring every node), few enough for microsecond decisions
/// at 10,000 nodes.
pub const DEFAULT_CANDIDATE_LIMIT: usize = 64;

/// The placement engine. Holds no cluster state: it reads and updates a [`ClusterView`].
pub struct Placer {
    config: PlacerConfig,
    policy: Box<dyn Policy>,
    typical: TypicalWorkload,
}

/// One step of walking a request: an option, on one set of models.
struct Tier {
    option: u32,
    upgraded: bool,
    models: Vec<GpuModelName>,
    amount: GpuAmount,
    /// The request's minimum memory per GPU.
    min_memory_mib: Option<u64>,
}

impl Placer {
    /// An engine with a policy and the workload fragmentation is measured against.
    pub fn new(config: PlacerConfig, typical: TypicalWorkload) -> Placer {
        let policy = policy::policy(config.policy);
        Placer {
            config,
            policy,
            typical,
        }
    }

    /// How a cached image counts.
    pub fn image_rule(&self) -> ImageRule {
        self.config.image_rule
    }

    /// The settings.
    pub fn config(&self) -> &PlacerConfig {
        &self.config
    }

    /// Replaces the typical workload (the leader refreshes it as the mix of sandboxes shifts).
    pub fn set_typical(&mut self, typical: TypicalWorkload) {
        self.typical = typical;
    }

    /// Places a batch: highest priority first (then in the given order), each seeing the
    /// ones before it. Successful placements are reserved in `view`. `seed` drives the
    /// policy's randomness (the Random policy; nothing else draws from it).
    pub fn place_batch(
        &self,
        view: &mut ClusterView,
        batch: &[(SandboxId, &SandboxSpec)],
        seed: u64,
    ) -> Vec<(SandboxId, Decision)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..batch.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(batch[*i].1.priority));
        let mut out = Vec::with_capacity(batch.len());
        for i in order {
            let (id, spec) = batch[i];
            let decision = self.place(view, spec, &mut rng);
            if let Some(placement) = &decision.placement {
                view.reserve(spec, placement);
            }
            out.push((id, decision));
        }
        out
    }

    /// Decides one sandbox against the view, without reserving.
    pub fn place(&self, view: &ClusterView, spec: &SandboxSpec, rng: &mut ChaCha8Rng) -> Decision {
        self.place_within(view, spec, rng, None, None)
    }

    /// Places one sandbox on node `node` if it fits there (and reserves it in the view):
    /// a resume trying the node that holds its snapshot first. `None` when it does not fit
    /// or the view has no such node.
    pub fn place_on(
        &self,
        view: &mut ClusterView,
        spec: &SandboxSpec,
        node: &str,
        seed: u64,
    ) -> Option<Placement> {
        let index = view.index_of(node)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let placement = self
            .place_within(view, spec, &mut rng, Some(index), None)
            .placement?;
        view.reserve(spec, &placement);
        Some(placement)
    }

    /// Places one sandbox on a node whose runtime is `runtime` (a resume whose snapshot
    /// moves: a checkpoint image is restored only by the runtime that took it), reserving
    /// it in the view when it fits.
    pub fn place_with_runtime(
        &self,
        view: &mut ClusterView,
        spec: &SandboxSpec,
        runtime: &str,
        seed: u64,
    ) -> Decision {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let decision = self.place_within(view, spec, &mut rng, None, Some(runtime));
        if let Some(placement) = &decision.placement {
            view.reserve(spec, placement);
        }
        decision
    }

    fn place_within(
        &self,
        view: &ClusterView,
        spec: &SandboxSpec,
        rng: &mut ChaCha8Rng,
        only: Option<NodeIndex>,
        runtime: Option<&str>,
    ) -> Decision {
        let mut explanation = Explanation::default();
        let ctx = ScoreContext {
            spec,
            typical: &self.typical,
            only,
            runtime,
        };
        let ranking = Ranking {
            policy: self.policy.component(),
            rule: self.config.image_rule,
            image: ImageAsk::new(self.config.image_rule, &view.images, &spec.image),
        };
        let Some(request) = &spec.gpu else {
            let best = self.place_cpu_only(view, &ctx, &ranking, rng, &mut explanation);
            return finish(view, best, None, &ranking, explanation);
        };
        let tiers = self.tiers(view, &request.options, request.min_memory_mib);
        for (i, tier) in tiers.into_iter().enumerate() {
            // Rejection counts describe the most preferred choice (option 0 on its own
            // models), so each node is counted once and the reasons answer "why not what I
            // asked for first"; later tiers only add to the nodes evaluated.
            let mut tier_explanation = Explanation::default();
            let best = self.place_tier(view, &ctx, &ranking, &tier, rng, &mut tier_explanation);
            explanation.nodes_evaluated += tier_explanation.nodes_evaluated;
            if i == 0 {
                explanation.filtered = tier_explanation.filtered;
            }
            if best.is_some() {
                return finish(view, best, Some(&tier), &ranking, explanation);
            }
        }
        finish(view, None, None, &ranking, explanation)
    }

    fn tiers(
        &self,
        view: &ClusterView,
        options: &[GpuOption],
        min_memory_mib: Option<u64>,
    ) -> Vec<Tier> {
        // Every option as written comes first, in order; upgrades only after all of them,
        // so a model the user listed is tried before one the operator would substitute.
        let mut tiers = Vec::new();
        let mut upgrades = Vec::new();
        let listed: Vec<&GpuModelName> = options.iter().flat_map(|o| o.model.models()).collect();
        for (i, option) in options.iter().enumerate() {
            let option_index = i as u32;
            match &option.model {
                GpuModelSelector::Any => tiers.push(Tier {
                    option: option_index,
                    upgraded: false,
                    models: view.models().map(|(m, _)| m.clone()).collect(),
                    amount: option.amount,
                    min_memory_mib,
                }),
                selector => {
                    let named = selector.models();
                    tiers.push(Tier {
                        option: option_index,
                        upgraded: false,
                        models: named.to_vec(),
                        amount: option.amount,
                        min_memory_mib,
                    });
                    if self.config.allow_gpu_upgrade && !option.exact {
                        let wanted: Vec<_> = named.iter().filter_map(GpuModelName::known).collect();
                        let models: Vec<GpuModelName> = view
                            .models()
                            .filter(|(m, _)| !listed.contains(m))
                            .filter(|(m, _)| {
                                m.known().is_some_and(|k| {
                                    wanted.iter().any(|w| k.strictly_better_than(*w))
                                })
                            })
                            .map(|(m, _)| m.clone())
                            .collect();
                        if !models.is_empty() {
                            upgrades.push(Tier {
                                option: option_index,
                                upgraded: true,
                                models,
                                amount: option.amount,
                                min_memory_mib,
                            });
                        }
                    }
                }
            }
        }
        tiers.extend(upgrades);
        tiers
    }

    fn place_cpu_only(
        &self,
        view: &ClusterView,
        ctx: &ScoreContext<'_>,
        ranking: &Ranking<'_>,
        rng: &mut ChaCha8Rng,
        explanation: &mut Explanation,
    ) -> Option<Best> {
        let mut best = Best::default();
        let allowed = allowed_locations(
            ctx.spec,
            view.by_cpu_free.iter(),
            |set| set.len() as u32,
            explanation,
        );
        let allowed_nodes: u32 = allowed.iter().map(|set| set.len() as u32).sum();
        let limit = split_limit(self.config.candidate_limit, allowed.len());
        let mut feasible_total = 0usize;
        let mut in_range = 0u32;
        for set in allowed {
            let mut feasible = 0usize;
            for &(_, index) in set.range((ctx.spec.cpu_milli, 0)..) {
                if ctx.only.is_some_and(|only| only != index) {
                    continue;
                }
                in_range += 1;
                explanation.nodes_evaluated += 1;
                let node = view.node(index);
                if let Err(reason) = self.node_filters(ctx, view, index) {
                    explanation.count(reason, 1);
                    continue;
                }
                if let Some(scored) = self.policy.score(ctx, node, None, rng) {
                    best.offer(ranking, index, node, scored, None);
                    feasible += 1;
                    if limit.is_some_and(|limit| feasible >= limit) {
                        break;
                    }
                }
            }
            feasible_total += feasible;
        }
        if feasible_total == 0 {
            // Allowed nodes outside the range have too little CPU.
            explanation.count(
                Reason::InsufficientCpu,
                allowed_nodes.saturating_sub(in_range),
            );
        }
        best.into_option()
    }

    fn place_tier(
        &self,
        view: &ClusterView,
        ctx: &ScoreContext<'_>,
        ranking: &Ranking<'_>,
        tier: &Tier,
        rng: &mut ChaCha8Rng,
        explanation: &mut Explanation,
    ) -> Option<Best> {
        let mut best = Best::default();
        let (count, milli) = (tier.amount.gpu_count(), tier.amount.milli_per_gpu());
        let mut nodes_with_model = 0u32;
        // The limit is shared by the tier's models ("any" spans them all) and locations, so
        // a decision scores about `candidate_limit` nodes however the pool is split.
        let per_model_limit = split_limit(self.config.candidate_limit, tier.models.len());
        for model in &tier.models {
            let Some(locations) = view.models.get(model) else {
                continue;
            };
            nodes_with_model += locations.values().map(|i| i.nodes).sum::<u32>();
            let allowed = allowed_locations(ctx.spec, locations.iter(), |i| i.nodes, explanation);
            let limit = split_limit(per_model_limit, allowed.len());
            let ask = GpuAsk {
                model: model.clone(),
                count,
                milli,
                min_memory_mib: tier.min_memory_mib,
            };
            for index in allowed {
                let range: Box<dyn Iterator<Item = &(u32, NodeIndex)>> = if milli == 1000 {
                    Box::new(index.by_free_whole.range((count, 0)..))
                } else {
                    Box::new(index.by_max_share.range((milli, 0)..))
                };
                let mut feasible = 0usize;
                let mut in_range = 0u32;
                for &(_, node_index) in range {
                    if ctx.only.is_some_and(|only| only != node_index) {
                        continue;
                    }
                    in_range += 1;
                    explanation.nodes_evaluated += 1;
                    let node = view.node(node_index);
                    if let Err(reason) = self.node_filters(ctx, view, node_index) {
                        explanation.count(reason, 1);
                        continue;
                    }
                    if !ask.fits(node) {
                        explanation.count(Reason::GpuMemoryTooSmall, 1);
                        continue;
                    }
                    if self.over_gpu_quota(view, ctx.spec, &ask) {
                        explanation.count(Reason::TenantGpuQuota, 1);
                        continue;
                    }
                    if let Some(scored) = self.policy.score(ctx, node, Some(&ask), rng) {
                        best.offer(ranking, node_index, node, scored, Some(model));
                        feasible += 1;
                        if limit.is_some_and(|limit| feasible >= limit) {
                            break;
                        }
                    }
                }
                if feasible == 0 {
                    let short = if milli == 1000 {
                        Reason::InsufficientFreeGpus
                    } else {
                        Reason::InsufficientGpuShare
                    };
                    explanation.count(short, index.nodes.saturating_sub(in_range));
                }
            }
        }
        if best.node.is_none() && !tier.upgraded {
            explanation.count(
                Reason::GpuModelMismatch,
                (view.len() as u32).saturating_sub(nodes_with_model),
            );
        }
        best.into_option()
    }

    /// Ready, the snapshot's runtime (a resume), inventory constraints, CPU/memory.
    fn node_filters(
        &self,
        ctx: &ScoreContext<'_>,
        view: &ClusterView,
        index: NodeIndex,
    ) -> Result<(), Reason> {
        let node = view.node(index);
        filters::check_ready(node)?;
        if ctx.runtime.is_some_and(|r| r != node.spec.runtime) {
            return Err(Reason::SnapshotIncompatible);
        }
        filters::check_spec(ctx.spec, &node.spec)?;
        filters::check_cpu_memory(ctx.spec, node)
    }

    fn over_gpu_quota(&self, view: &ClusterView, spec: &SandboxSpec, ask: &GpuAsk) -> bool {
        let Some(quota) = view.tenant_quota(&spec.tenant) else {
            return false;
        };
        let Some(max) = quota.max_gpu_milli_per_model.get(&ask.model) else {
            return false;
        };
        view.tenant_gpu_milli(&spec.tenant, &ask.model)
            + u64::from(ask.milli) * u64::from(ask.count)
            > *max
    }
}

/// The sub-indexes at locations the sandbox allows; nodes elsewhere are counted as rejected
/// by location in one go.
fn allowed_locations<'a, T>(
    spec: &SandboxSpec,
    locations: impl Iterator<Item = (&'a Location, &'a T)>,
    nodes: impl Fn(&T) -> u32,
    explanation: &mut Explanation,
) -> Vec<&'a T> {
    let c = &spec.constraints;
    let mut allowed = Vec::new();
    for ((provider, region), index) in locations {
        if !c.providers.is_empty() && !c.providers.contains(provider) {
            explanation.count(Reason::ProviderNotAllowed, nodes(index));
        } else if !c.regions.is_empty() && !c.regions.contains(region) {
            explanation.count(Reason::RegionNotAllowed, nodes(index));
        } else {
            allowed.push(index);
        }
    }
    allowed
}

/// Splits a candidate limit over `parts` (at least [`MIN_CANDIDATES_PER_MODEL`] each).
fn split_limit(limit: Option<usize>, parts: usize) -> Option<usize> {
    limit.map(|limit| limit.div_ceil(parts.max(1)).max(MIN_CANDIDATES_PER_MODEL))
}

fn finish(
    view: &ClusterView,
    best: Option<Best>,
    tier: Option<&Tier>,
    ranking: &Ranking<'_>,
    mut explanation: Explanation,
) -> Decision {
    let option = tier.map_or(0, |t| t.option);
    let upgraded = tier.is_some_and(|t| t.upgraded);
    let Some(best) = best else {
        return Decision {
            placement: None,
            explanation,
        };
    };
    explanation.top_scores = best
        .top
        .iter()
        .map(|r| NodeScore {
            node: view.node(r.index).spec.id.clone(),
            total: r.standing.total,
            components: ranking.components(r.holds, &r.standing, r.score),
        })
        .collect();
    let Some(Candidate {
        index,
        gpus,
        model,
        holds,
        ..
    }) = best.node
    else {
        return Decision {
            placement: None,
            explanation,
        };
    };
    let node = view.node(index);
    explanation.tier = Some((option, if upgraded { model } else { None }));
    explanation.image_cached = ranking.image.is_some().then_some(holds);
    let milli = tier.map_or(0, |t| t.amount.milli_per_gpu());
    Decision {
        placement: Some(Placement {
            node: node.spec.id.clone(),
            epoch: node.epoch,
            option,
            gpu_indices: gpus,
            gpu_milli_per_gpu: milli,
        }),
        explanation,
    }
}
