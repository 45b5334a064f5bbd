//! One decision round: what to buy for pending demand, `min_nodes` and warm headroom, and
//! which idle nodes to remove.
//!
//! Pure: everything comes in through [`Input`] (time and seed included) and the answer is a
//! [`Decision`]; the same input gives the same decision.
//!
//! # How scale-up packs
//! Pending sandboxes are grouped into classes of identical scheduling shape (tenant,
//! resources, GPU request, constraints, priority). Each class, highest priority first:
//! 1. is placed by the scheduler's own [`Placer`] on a [`ClusterView`] holding the free
//!    capacity of ready nodes and of the nodes planned so far this round, so demand that
//!    already fits buys nothing;
//! 2. is then given nodes still being provisioned (in flight), then new nodes, from the
//!    node groups the placer says can run it. How many of the class fit on one empty node
//!    of a group is found by placing them, with the same [`Placer`], on that group's
//!    instance template: there is no second fit logic. Whole nodes are added in bulk with
//!    the free capacity the placer left on them, so other classes can use the rest; the
//!    remainder goes onto one more node through the placer.
//!
//! Groups are tried cheapest first by price per sandbox slot (price per hour over how many
//! of the class fit on a node), after the capacity-type preference. When the cheapest group
//! cannot be used (backing off after a stockout or quota error, or capped), demand fails
//! over within the same round: first to the next region of the same provider, then to the
//! other providers, each cheapest first, as SkyPilot does. Every node granted passes
//! [`Caps`], so no cap is ever crossed.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_core::model::{Constraints, NodeSpec, SandboxId, SandboxSpec};
use berth_core::placement::filters::Reason;
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Placer, PlacerConfig};
use berth_proto::GpuModelName;
use berth_proto::gpu::GPU_MILLI_PER_GPU;
use berth_proto::node::CapacityType;

use super::limits::{Caps, Cut, Fleet, micro};
use super::scale_down::{self, NodeView, Removal};
use crate::config::{AutoscalerConfig, CapacityPreference, NodeGroupConfig};

/// Node label that names a node's group; providers set it on every node they start.
pub const GROUP_LABEL: &str = "berth.dev/node-group";

/// Most sandboxes of one class counted onto one node: a bound on the fit search for tiny
/// CPU-only sandboxes on big nodes.
pub const MAX_FIT_PER_NODE: u32 = 1024;

/// The placement settings the policy plans with: bestfit over 8 candidates. The plan only
/// has to count nodes; the scheduler places for real with its own policy, and packing
/// estimates with bestfit cost a fraction of FGD's scoring (`berth bench autoscale`).
/// Images play no part: a plan counts nodes, and a new node holds no image anyway.
pub fn planning_placer() -> PlacerConfig {
    PlacerConfig {
        policy: berth_core::placement::PolicyName::Bestfit,
        allow_gpu_upgrade: false,
        candidate_limit: Some(8),
        image_rule: berth_core::placement::image::ImageRule::Off,
    }
}

/// Sandboxes the scheduler could not place: one, or a group of the same spec.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingSandbox {
    /// Id (of the first, for a group).
    pub id: SandboxId,
    /// How many sandboxes of this spec.
    pub count: u32,
    /// Spec.
    pub spec: SandboxSpec,
    /// The scheduler's reason, from its last placement attempt.
    pub reason: String,
}

/// A node the scheduler knows, with what is free on it.
#[derive(Debug, Clone)]
pub struct ExistingNode {
    /// Inventory.
    pub spec: Arc<NodeSpec>,
    /// Its node group (from [`GROUP_LABEL`]); `None` for nodes no group manages.
    pub group: Option<String>,
    /// Accepts new sandboxes.
    pub ready: bool,
    /// Free CPU.
    pub cpu_milli_free: u64,
    /// Free memory.
    pub memory_mib_free: u64,
    /// Free milli per GPU.
    pub gpu_milli_free: Vec<u32>,
    /// Sandboxes bound to it.
    pub sandboxes: u32,
    /// Since when it has had no sandbox (ms), `None` while it has one.
    pub idle_since_ms: Option<u64>,
}

/// What the autoscaler knows about a group beyond its nodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupStatus {
    /// Nodes asked for and not yet registered with the scheduler.
    pub in_flight: u32,
    /// No scale-up of the group before this time (after a provider error).
    pub backoff_until_ms: u64,
    /// The error that started the backoff.
    pub last_error: Option<String>,
}

/// Everything one decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Now, ms.
    pub now_ms: u64,
    /// Seed of the placer's tie-breaks.
    pub seed: u64,
    /// Sandboxes waiting for capacity.
    pub pending: &'a [PendingSandbox],
    /// Nodes the scheduler knows.
    pub nodes: &'a [ExistingNode],
    /// Per group: in-flight nodes and backoff.
    pub groups: &'a BTreeMap<String, GroupStatus>,
    /// Nodes requested in the last minute (the rate cap).
    pub requested_last_minute: u32,
}

/// Nodes to add to one group, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleUp {
    /// Group.
    pub group: String,
    /// New nodes.
    pub nodes: u32,
    /// Why, for the decision log.
    pub reason: String,
    /// How many of the nodes each cause asked for (they add up to `nodes`).
    pub causes: BTreeMap<Cause, u32>,
}

/// One round's answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Nodes to buy, per group, in the order they were decided.
    pub scale_up: Vec<ScaleUp>,
    /// Nodes to cordon and remove.
    pub remove: Vec<Removal>,
    /// Pending sandboxes this round cannot serve, by reason.
    pub unmet: BTreeMap<String, u32>,
    /// Pending sandboxes that fit capacity already there or in flight.
    pub absorbed: u32,
    /// Caps that cut a wanted scale-up.
    pub cuts: Vec<Cut>,
    /// $/hour of the fleet once this decision is carried out (removals not subtracted).
    pub usd_per_hour: f64,
}

/// How many sandboxes of one spec fit on one empty node, and what the node has left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fit {
    /// Sandboxes per node (at most [`MAX_FIT_PER_NODE`]).
    pub per_node: u32,
    /// CPU left on a full node.
    pub cpu_left: u64,
    /// Memory left on a full node.
    pub memory_left: u64,
    /// Milli left per GPU on a full node.
    pub gpus_left: Vec<u32>,
}

/// How many of `spec` the placer puts on one empty node built from `template`; `None`
/// when not even one fits. This is the only fit logic the autoscaler (and the
/// simulator's lower bound) has: the placement engine's own.
pub fn fit_on_template(
    placer: &Placer,
    template: &Arc<NodeSpec>,
    spec: &SandboxSpec,
    rng: &mut ChaCha8Rng,
) -> Option<Fit> {
    let mut view = ClusterView::new();
    view.push(
        template.clone(),
        0,
        true,
        template.cpu_milli,
        template.memory_mib,
        vec![GPU_MILLI_PER_GPU; template.gpus.len()],
    );
    let mut per_node = 0;
    while per_node < MAX_FIT_PER_NODE {
        let Some(placement) = placer.place(&view, spec, rng).placement else {
            break;
        };
        view.reserve(spec, &placement);
        per_node += 1;
    }
    let node = &view.nodes()[0];
    (per_node > 0).then(|| Fit {
        per_node,
        cpu_left: node.cpu_milli_free,
        memory_left: node.memory_mib_free,
        gpus_left: node.gpu_milli_free.clone(),
    })
}

/// Why the policy buys nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// Pending sandboxes need them.
    Pending,
    /// The group is below `min_nodes`.
    MinNodes,
    /// A model is below its `headroom_gpus`.
    Headroom,
}

impl Cause {
    /// Stable lower-case name (metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Pending => "pending",
            Cause::MinNodes => "min_nodes",
            Cause::Headroom => "headroom",
        }
    }
}

/// The policy: configuration, one instance template per group, and the placement engine.
pub struct Policy {
    cfg: AutoscalerConfig,
    templates: Vec<Arc<NodeSpec>>,
    placer: Placer,
}

/// What one group is bought this round, by cause, with the reasons.
#[derive(Debug, Clone, Default)]
struct Bought {
    causes: BTreeMap<Cause, u32>,
    reasons: Vec<String>,
}

/// Pending sandboxes with one scheduling shape.
struct Class<'a> {
    spec: &'a SandboxSpec,
    count: u32,
    /// Index of its fit shape (classes differing only in tenant or priority share one).
    fit_shape: usize,
}

type FitKey<'a> = (
    u64,
    u64,
    Option<&'a berth_proto::GpuRequest>,
    &'a Constraints,
);

type ClassKey<'a> = (
    &'a str,
    u64,
    u64,
    Option<&'a berth_proto::GpuRequest>,
    &'a Constraints,
    i32,
);

impl Policy {
    /// A policy for a validated configuration. `placer` should match the scheduler's.
    pub fn new(cfg: AutoscalerConfig, placer: PlacerConfig) -> Policy {
        let templates = cfg
            .node_groups
            .iter()
            .map(|g| Arc::new(template(g)))
            .collect();
        Policy {
            cfg,
            templates,
            placer: Placer::new(placer, TypicalWorkload::default()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AutoscalerConfig {
        &self.cfg
    }

    /// One decision round.
    pub fn decide(&self, input: &Input<'_>) -> Decision {
        let mut round = Round::new(self, input);
        round.min_nodes();
        round.demand();
        round.headroom();
        let remove = round.scale_down();
        let mut decision = round.finish();
        decision.remove = remove;
        decision
    }
}

/// A node group's instance template: what a new node of the group will register as.
pub fn template(group: &NodeGroupConfig) -> NodeSpec {
    let id = format!("template/{}", group.name);
    let gpus = match &group.gpu_model {
        Some(name) => {
            let model = GpuModelName::resolve(name);
            let memory = model.known().map_or(0, |m| m.info().memory_mib);
            // No UUIDs: planned nodes are cloned from the template by the thousand, and
            // placement never reads them.
            let mut gpus = NodeSpec::uniform_gpus(&id, &model, memory, group.gpu_count);
            for gpu in &mut gpus {
                gpu.uuid = String::new();
            }
            gpus
        }
        None => Vec::new(),
    };
    let mut labels = group.labels.clone();
    labels.insert(GROUP_LABEL.into(), group.name.clone());
    NodeSpec {
        provider: group.provider.clone(),
        region: group.region.clone(),
        instance_type: group.instance_type.clone(),
        capacity_type: group.capacity_type,
        price_micro_usd_per_hour: micro(group.price_per_hour_usd),
        labels,
        ..NodeSpec::simple(id, group.cpu_milli, group.memory_mib, gpus)
    }
}

struct Round<'p, 'i> {
    policy: &'p Policy,
    input: &'i Input<'i>,
    view: ClusterView,
    caps: Caps<'p>,
    rng: ChaCha8Rng,
    /// Empty nodes per group not yet in the view: in flight, or bought this round.
    fresh: Vec<u32>,
    /// Nodes per group in the view so far (naming planned nodes).
    planned: Vec<u32>,
    bought: Vec<Bought>,
    /// Nodes per group the scheduler knows.
    registered: Vec<u32>,
    order: Vec<usize>,
    fits: HashMap<(usize, usize), Option<Fit>>,
    unmet: BTreeMap<String, u32>,
    absorbed: u32,
    cuts: Vec<Cut>,
    /// Sandboxes placed this round on each existing node (they are not idle).
    used: HashMap<u32, u32>,
}

impl<'p, 'i> Round<'p, 'i> {
    fn new(policy: &'p Policy, input: &'i Input<'i>) -> Self {
        let groups = &policy.cfg.node_groups;
        let index: HashMap<&str, usize> = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.name.as_str(), i))
            .collect();
        let mut view = ClusterView::new();
        let mut fleet = Fleet {
            nodes: BTreeMap::new(),
            requested_last_minute: input.requested_last_minute,
        };
        let mut registered = vec![0u32; groups.len()];
        for node in input.nodes {
            if let Some(g) = &node.group
                && let Some(i) = index.get(g.as_str())
            {
                registered[*i] += 1;
                *fleet.nodes.entry(g.clone()).or_default() += 1;
            }
            if node.ready {
                view.push(
                    node.spec.clone(),
                    0,
                    true,
                    node.cpu_milli_free,
                    node.memory_mib_free,
                    node.gpu_milli_free.clone(),
                );
            }
        }
        let mut fresh = vec![0; groups.len()];
        for (name, status) in input.groups {
            if let Some(i) = index.get(name.as_str()) {
                fresh[*i] = status.in_flight;
                *fleet.nodes.entry(name.clone()).or_default() += status.in_flight;
            }
        }
        Round {
            policy,
            input,
            view,
            caps: Caps::new(&policy.cfg, &fleet),
            rng: ChaCha8Rng::seed_from_u64(input.seed),
            fresh,
            planned: vec![0; groups.len()],
            bought: vec![Bought::default(); groups.len()],
            registered,
            order: Vec::new(),
            fits: HashMap::new(),
            unmet: BTreeMap::new(),
            absorbed: 0,
            cuts: Vec::new(),
            used: HashMap::new(),
        }
    }

    fn group(&self, g: usize) -> &'p NodeGroupConfig {
        &self.policy.cfg.node_groups[g]
    }

    fn backing_off(&self, g: usize) -> Option<&'i GroupStatus> {
        let status = self.input.groups.get(&self.group(g).name)?;
        (status.backoff_until_ms > self.input.now_ms).then_some(status)
    }

    /// Buys up to `want` nodes of group `g` under the caps; returns how many.
    fn buy(&mut self, g: usize, want: u32, cause: Cause, why: String) -> u32 {
        let name = self.group(g).name.clone();
        let (granted, cut) = self.caps.grant(&name, want);
        self.cuts.extend(cut);
        if granted > 0 {
            let bought = &mut self.bought[g];
            if bought.causes.is_empty() {
                self.order.push(g);
            }
            *bought.causes.entry(cause).or_default() += granted;
            bought.reasons.push(why);
            self.fresh[g] += granted;
        }
        granted
    }

    /// Tops every group up to its `min_nodes`.
    fn min_nodes(&mut self) {
        for g in 0..self.policy.cfg.node_groups.len() {
            let group = self.group(g);
            let have = self.registered[g] + self.fresh[g];
            if have < group.min_nodes && self.backing_off(g).is_none() {
                let why = format!("min_nodes {} (has {have})", group.min_nodes);
                self.buy(g, group.min_nodes - have, Cause::MinNodes, why);
            }
        }
    }

    /// Places up to `count` of `spec` on the view; returns how many it placed.
    fn absorb(&mut self, spec: &SandboxSpec, count: u32) -> u32 {
        let mut placed = 0;
        while placed < count {
            let decision = self.policy.placer.place(&self.view, spec, &mut self.rng);
            let Some(placement) = decision.placement else {
                break;
            };
            if let Some(index) = self.view.index_of(&placement.node)
                && !placement.node.starts_with("planned/")
            {
                *self.used.entry(index).or_default() += 1;
            }
            self.view.reserve(spec, &placement);
            placed += 1;
        }
        placed
    }

    /// How many of `spec` fit on one empty node of group `g` (cached per fit shape).
    fn fit(&mut self, class: usize, spec: &SandboxSpec, g: usize) -> Option<Fit> {
        if let Some(fit) = self.fits.get(&(class, g)) {
            return fit.clone();
        }
        let fit = fit_on_template(
            &self.policy.placer,
            &self.policy.templates[g],
            spec,
            &mut self.rng,
        );
        self.fits.insert((class, g), fit.clone());
        fit
    }

    fn preference(&self, spec: &SandboxSpec) -> CapacityPreference {
        self.policy
            .cfg
            .tenant_capacity_preference
            .get(&spec.tenant)
            .copied()
            .unwrap_or(self.policy.cfg.capacity_preference)
    }

    /// Groups that can run the class, in the order to try them: preferred capacity type,
    /// then cheapest per sandbox slot; after the first, same provider before others.
    fn ranked(&mut self, class: usize, spec: &SandboxSpec) -> Vec<(usize, Fit)> {
        let preference = self.preference(spec);
        let mut ranked: Vec<(usize, Fit, bool, f64)> = Vec::new();
        for g in 0..self.policy.cfg.node_groups.len() {
            if let Some(fit) = self.fit(class, spec, g) {
                let group = self.group(g);
                let mismatch = match preference {
                    CapacityPreference::Cheapest => false,
                    CapacityPreference::Spot => group.capacity_type != CapacityType::Spot,
                    CapacityPreference::OnDemand => group.capacity_type != CapacityType::OnDemand,
                };
                let cost = group.price_per_hour_usd / f64::from(fit.per_node);
                ranked.push((g, fit, mismatch, cost));
            }
        }
        let groups = &self.policy.cfg.node_groups;
        ranked.sort_by(|a, b| {
            a.2.cmp(&b.2)
                .then(a.3.total_cmp(&b.3))
                .then(groups[a.0].name.cmp(&groups[b.0].name))
        });
        if let Some(first) = ranked.first().map(|r| groups[r.0].provider.clone()) {
            // Stable: within each half the order above is kept.
            ranked.sort_by_key(|r| groups[r.0].provider != first);
        }
        ranked.into_iter().map(|(g, fit, _, _)| (g, fit)).collect()
    }

    /// Puts empty nodes of group `g` (in flight or bought) under `remaining` sandboxes of a
    /// class; returns how many are still unserved.
    fn fill(&mut self, g: usize, spec: &SandboxSpec, fit: &Fit, mut remaining: u32) -> u32 {
        let full = (remaining / fit.per_node).min(self.fresh[g]);
        for _ in 0..full {
            self.push_planned(g, fit.cpu_left, fit.memory_left, fit.gpus_left.clone());
        }
        self.fresh[g] -= full;
        remaining -= full * fit.per_node;
        if remaining > 0 && self.fresh[g] > 0 {
            let t = self.policy.templates[g].clone();
            let gpus = vec![GPU_MILLI_PER_GPU; t.gpus.len()];
            self.push_planned(g, t.cpu_milli, t.memory_mib, gpus);
            self.fresh[g] -= 1;
            remaining -= self.absorb(spec, remaining);
        }
        remaining
    }

    fn push_planned(&mut self, g: usize, cpu: u64, memory: u64, gpus: Vec<u32>) {
        let template = &self.policy.templates[g];
        let n = self.planned[g];
        self.planned[g] += 1;
        let spec = NodeSpec {
            id: format!("planned/{}/{n}", self.group(g).name),
            ..NodeSpec::clone(template)
        };
        self.view.push(Arc::new(spec), 0, true, cpu, memory, gpus);
    }

    /// Serves pending sandboxes: existing and in-flight capacity first, then new nodes.
    fn demand(&mut self) {
        let mut index: HashMap<ClassKey<'i>, usize> = HashMap::new();
        let mut fit_shapes: HashMap<FitKey<'i>, usize> = HashMap::new();
        let mut classes: Vec<Class<'i>> = Vec::new();
        for p in self.input.pending {
            let quota = Reason::TenantGpuQuota.to_string();
            if p.reason.contains(&quota) {
                *self.unmet.entry(quota).or_default() += p.count;
                continue;
            }
            let s = &p.spec;
            let key = (
                s.tenant.as_str(),
                s.cpu_milli,
                s.memory_mib,
                s.gpu.as_ref(),
                &s.constraints,
                s.priority,
            );
            let next = classes.len();
            let i = *index.entry(key).or_insert(next);
            if i == next {
                let shapes = fit_shapes.len();
                let fit_shape = *fit_shapes
                    .entry((s.cpu_milli, s.memory_mib, s.gpu.as_ref(), &s.constraints))
                    .or_insert(shapes);
                classes.push(Class {
                    spec: s,
                    count: 0,
                    fit_shape,
                });
            }
            classes[i].count += p.count;
        }
        let mut order: Vec<usize> = (0..classes.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(classes[*i].spec.priority));
        for c in order {
            let Class {
                spec,
                count,
                fit_shape,
            } = classes[c];
            let placed = self.absorb(spec, count);
            self.absorbed += placed;
            let mut remaining = count - placed;
            if remaining == 0 {
                continue;
            }
            let ranked = self.ranked(fit_shape, spec);
            if ranked.is_empty() {
                *self
                    .unmet
                    .entry("no node group can run it".into())
                    .or_default() += remaining;
                continue;
            }
            for (g, fit) in &ranked {
                let before = remaining;
                remaining = self.fill(*g, spec, fit, remaining);
                self.absorbed += before - remaining;
            }
            let mut blocked: Vec<String> = Vec::new();
            for (g, fit) in &ranked {
                if remaining == 0 {
                    break;
                }
                if let Some(status) = self.backing_off(*g) {
                    blocked.push(format!(
                        "{} backing off ({})",
                        self.group(*g).name,
                        status.last_error.as_deref().unwrap_or("provider error")
                    ));
                    continue;
                }
                let want = remaining.div_ceil(fit.per_node);
                let mut why = format!("{remaining} pending {}", shape(spec));
                if !blocked.is_empty() {
                    let _ = write!(why, "; failover: {}", blocked.join(", "));
                }
                let granted = self.buy(*g, want, Cause::Pending, why);
                remaining = self.fill(*g, spec, fit, remaining);
                if granted < want {
                    let (_, cap) = self.caps.allowed(&self.group(*g).name);
                    blocked.push(format!("{} capped by {cap}", self.group(*g).name));
                }
            }
            if remaining > 0 {
                let reason = if blocked.is_empty() {
                    "no capacity".to_string()
                } else {
                    blocked.join(", ")
                };
                *self.unmet.entry(reason).or_default() += remaining;
            }
        }
    }

    /// Keeps `headroom_gpus[model]` whole GPUs of each model free.
    fn headroom(&mut self) {
        for (model, want) in &self.policy.cfg.headroom_gpus {
            let model = GpuModelName::resolve(model);
            let mut free: u64 = self
                .view
                .nodes()
                .iter()
                .filter(|n| n.ready && n.gpu_model.as_ref() == Some(&model))
                .map(|n| {
                    n.gpu_milli_free
                        .iter()
                        .filter(|m| **m == GPU_MILLI_PER_GPU)
                        .count() as u64
                })
                .sum();
            let mut candidates: Vec<usize> = Vec::new();
            for (g, t) in self.policy.templates.iter().enumerate() {
                if t.gpus.first().map(|d| &d.model) == Some(&model) {
                    free += u64::from(self.fresh[g]) * t.gpus.len() as u64;
                    candidates.push(g);
                }
            }
            let groups = &self.policy.cfg.node_groups;
            candidates.sort_by(|a, b| {
                let per_gpu =
                    |g: usize| groups[g].price_per_hour_usd / f64::from(groups[g].gpu_count);
                per_gpu(*a)
                    .total_cmp(&per_gpu(*b))
                    .then(groups[*a].name.cmp(&groups[*b].name))
            });
            for g in candidates {
                let short = u64::from(*want).saturating_sub(free);
                if short == 0 {
                    break;
                }
                if self.backing_off(g).is_some() {
                    continue;
                }
                let per_node = u64::from(self.group(g).gpu_count.max(1));
                let nodes = u32::try_from(short.div_ceil(per_node)).unwrap_or(u32::MAX);
                let why = format!("headroom {want} free {model} (has {free})");
                free += u64::from(self.buy(g, nodes, Cause::Headroom, why)) * per_node;
            }
            if free < u64::from(*want) {
                *self.unmet.entry(format!("headroom {model}")).or_default() +=
                    u32::try_from(u64::from(*want) - free).unwrap_or(u32::MAX);
            }
        }
    }

    fn scale_down(&self) -> Vec<Removal> {
        let nodes: Vec<NodeView> = self
            .input
            .nodes
            .iter()
            .filter_map(|n| {
                let group = n.group.clone()?;
                let used = self
                    .view
                    .index_of(&n.spec.id)
                    .and_then(|i| self.used.get(&i))
                    .copied()
                    .unwrap_or(0);
                Some(NodeView {
                    id: n.spec.id.clone(),
                    group,
                    sandboxes: n.sandboxes + used,
                    idle_since_ms: if used > 0 { None } else { n.idle_since_ms },
                    free_gpus: n
                        .gpu_milli_free
                        .iter()
                        .filter(|m| **m == GPU_MILLI_PER_GPU)
                        .count() as u32,
                    gpu_model: n.spec.gpus.first().map(|g| g.model.as_str().to_owned()),
                })
            })
            .collect();
        // Nothing is removed from a group this round buys for.
        let buying: Vec<&str> = self
            .order
            .iter()
            .map(|g| self.group(*g).name.as_str())
            .collect();
        let nodes: Vec<NodeView> = nodes
            .into_iter()
            .filter(|n| !buying.contains(&n.group.as_str()))
            .collect();
        scale_down::scale_down(
            self.input.now_ms,
            self.policy.cfg.scale_down_cooldown_s.saturating_mul(1000),
            &self.policy.cfg.node_groups,
            &self.policy.cfg.headroom_gpus,
            &nodes,
        )
    }

    fn finish(self) -> Decision {
        let scale_up = self
            .order
            .iter()
            .map(|g| {
                let bought = &self.bought[*g];
                ScaleUp {
                    group: self.group(*g).name.clone(),
                    nodes: bought.causes.values().sum(),
                    reason: bought.reasons.join("; "),
                    causes: bought.causes.clone(),
                }
            })
            .collect();
        Decision {
            scale_up,
            remove: Vec::new(),
            unmet: self.unmet,
            absorbed: self.absorbed,
            cuts: self.cuts,
            usd_per_hour: self.caps.spend_usd_per_hour(),
        }
    }
}

/// A class's shape in a reason: its GPU request, or its CPU and memory.
fn shape(spec: &SandboxSpec) -> String {
    match &spec.gpu {
        Some(gpu) => gpu.specs().join("|"),
        None => format!("cpu {}m/{}Mi", spec.cpu_milli, spec.memory_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::h100_group;
    use berth_proto::GpuRequest;
    use proptest::prelude::*;

    fn group(name: &str, provider: &str, region: &str, price: f64) -> NodeGroupConfig {
        NodeGroupConfig {
            provider: provider.into(),
            region: region.into(),
            ..h100_group(name, 0, 100, price)
        }
    }

    fn config(groups: Vec<NodeGroupConfig>) -> AutoscalerConfig {
        AutoscalerConfig {
            node_groups: groups,
            scale_down_cooldown_s: 60,
            ..AutoscalerConfig::default()
        }
    }

    fn policy(cfg: AutoscalerConfig) -> Policy {
        Policy::new(cfg, planning_placer())
    }

    fn gpu(spec: &str) -> SandboxSpec {
        let request = GpuRequest::parse(&[spec], None).expect("a valid request");
        SandboxSpec::resources("t", 1_000, 1_024, Some(request))
    }

    fn pending(n: usize, spec: &SandboxSpec) -> Vec<PendingSandbox> {
        (0..n)
            .map(|i| PendingSandbox {
                id: SandboxId(i as u64),
                count: 1,
                spec: spec.clone(),
                reason: "no node fits".into(),
            })
            .collect()
    }

    /// An existing node of `group` with `used` of its 8 GPUs taken.
    fn node(
        policy: &Policy,
        id: &str,
        group: usize,
        used: u32,
        idle_since: Option<u64>,
    ) -> ExistingNode {
        let t = &policy.templates[group];
        let spec = NodeSpec {
            id: id.into(),
            gpus: NodeSpec::uniform_gpus(id, &t.gpus[0].model, t.gpus[0].memory_mib, 8),
            ..NodeSpec::clone(t)
        };
        ExistingNode {
            spec: Arc::new(spec),
            group: Some(policy.cfg.node_groups[group].name.clone()),
            ready: true,
            cpu_milli_free: t.cpu_milli - u64::from(used) * 1_000,
            memory_mib_free: t.memory_mib - u64::from(used) * 1_024,
            gpu_milli_free: (0..8).map(|i| if i < used { 0 } else { 1_000 }).collect(),
            sandboxes: used,
            idle_since_ms: (used == 0).then_some(idle_since.unwrap_or(0)),
        }
    }

    fn input<'a>(
        pending: &'a [PendingSandbox],
        nodes: &'a [ExistingNode],
        groups: &'a BTreeMap<String, GroupStatus>,
    ) -> Input<'a> {
        Input {
            now_ms: 1_000_000,
            seed: 7,
            pending,
            nodes,
            groups,
            requested_last_minute: 0,
        }
    }

    fn ups(d: &Decision) -> Vec<(&str, u32)> {
        d.scale_up
            .iter()
            .map(|s| (s.group.as_str(), s.nodes))
            .collect()
    }

    #[test]
    fn scale_from_zero_packs_with_the_placer_and_picks_the_cheapest_group() {
        let p = policy(config(vec![
            group("dear", "aws", "us-east-1", 120.0),
            group("cheap", "gcp", "us-central1", 80.0),
        ]));
        let work = pending(20, &gpu("H100:1"));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(
            ups(&d),
            [("cheap", 3)],
            "20 one-GPU sandboxes need 3 8-GPU nodes: {d:?}"
        );
        assert!(d.scale_up[0].reason.contains("20 pending H100"), "{d:?}");
        assert!(d.unmet.is_empty());
        assert!((d.usd_per_hour - 240.0).abs() < 1e-6);

        // Mixed shapes share nodes: 3 × H100:4 and 2 × H100:2 fill exactly two nodes.
        let mut work = pending(3, &gpu("H100:4"));
        work.extend(pending(2, &gpu("H100:2")));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("cheap", 2)], "{d:?}");
    }

    #[test]
    fn capacity_already_there_or_in_flight_buys_nothing() {
        let p = policy(config(vec![group("a", "aws", "r1", 100.0)]));
        let nodes = [node(&p, "n1", 0, 5, None)];
        let work = pending(3, &gpu("H100:1"));
        let d = p.decide(&input(&work, &nodes, &BTreeMap::new()));
        assert!(d.scale_up.is_empty(), "3 free GPUs take them: {d:?}");
        assert_eq!(d.absorbed, 3);

        let work = pending(16, &gpu("H100:1"));
        let groups = BTreeMap::from([(
            "a".to_string(),
            GroupStatus {
                in_flight: 2,
                ..GroupStatus::default()
            },
        )]);
        let d = p.decide(&input(&work, &[], &groups));
        assert!(d.scale_up.is_empty(), "two nodes in flight hold 16: {d:?}");
        let work = pending(17, &gpu("H100:1"));
        let d = p.decide(&input(&work, &[], &groups));
        assert_eq!(ups(&d), [("a", 1)]);
    }

    #[test]
    fn a_stockout_moves_demand_to_the_next_region_then_the_next_provider_in_one_round() {
        let p = policy(config(vec![
            group("aws-east", "aws", "us-east-1", 90.0),
            group("gcp-central", "gcp", "us-central1", 95.0),
            group("aws-west", "aws", "us-west-2", 100.0),
        ]));
        let work = pending(8, &gpu("H100:1"));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("aws-east", 1)]);

        let stockout = |group: &str| {
            (
                group.to_string(),
                GroupStatus {
                    in_flight: 0,
                    backoff_until_ms: 2_000_000,
                    last_error: Some("stockout: InsufficientInstanceCapacity".into()),
                },
            )
        };
        let groups = BTreeMap::from([stockout("aws-east")]);
        let d = p.decide(&input(&work, &[], &groups));
        assert_eq!(
            ups(&d),
            [("aws-west", 1)],
            "same provider first, though dearer: {d:?}"
        );
        assert!(
            d.scale_up[0]
                .reason
                .contains("failover: aws-east backing off (stockout"),
            "{d:?}"
        );

        let groups = BTreeMap::from([stockout("aws-east"), stockout("aws-west")]);
        let d = p.decide(&input(&work, &[], &groups));
        assert_eq!(
            ups(&d),
            [("gcp-central", 1)],
            "then the next provider: {d:?}"
        );

        let groups = BTreeMap::from([
            stockout("aws-east"),
            stockout("aws-west"),
            stockout("gcp-central"),
        ]);
        let d = p.decide(&input(&work, &[], &groups));
        assert!(d.scale_up.is_empty());
        assert_eq!(d.unmet.values().sum::<u32>(), 8, "{d:?}");
        assert!(
            d.unmet
                .keys()
                .next()
                .is_some_and(|k| k.contains("backing off"))
        );
    }

    #[test]
    fn caps_move_demand_on_and_constraints_are_honoured() {
        let mut a = group("a", "aws", "r1", 10.0);
        a.max_nodes = 1;
        let p = policy(config(vec![a, group("b", "gcp", "r2", 20.0)]));
        let work = pending(24, &gpu("H100:1"));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("a", 1), ("b", 2)], "{d:?}");
        assert_eq!(d.cuts[0].reason, "group max_nodes 1");

        let mut pinned = gpu("H100:1");
        pinned.constraints.regions = vec!["r2".into()];
        let work = pending(1, &pinned);
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("b", 1)], "the region pin rules out a: {d:?}");

        let work = pending(2, &gpu("B200:1"));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert!(d.scale_up.is_empty());
        assert_eq!(d.unmet.get("no node group can run it"), Some(&2));
    }

    #[test]
    fn spot_preference_per_tenant() {
        let mut spot = group("spot", "aws", "r1", 40.0);
        spot.capacity_type = CapacityType::Spot;
        let mut cfg = config(vec![group("od", "aws", "r1", 30.0), spot]);
        cfg.tenant_capacity_preference
            .insert("batch".into(), CapacityPreference::Spot);
        let p = policy(cfg);
        let work = pending(1, &gpu("H100:1"));
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("od", 1)], "cheapest by default");
        let mut batch = gpu("H100:1");
        batch.tenant = "batch".into();
        let work = pending(1, &batch);
        let d = p.decide(&input(&work, &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("spot", 1)], "the tenant prefers spot");
    }

    #[test]
    fn headroom_and_min_nodes_are_kept() {
        let mut cfg = config(vec![group("a", "aws", "r1", 100.0)]);
        cfg.headroom_gpus.insert("H100".into(), 12);
        let p = policy(cfg);
        let d = p.decide(&input(&[], &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("a", 2)], "12 free H100s take two nodes: {d:?}");
        let nodes = [node(&p, "n1", 0, 4, None)];
        let d = p.decide(&input(&[], &nodes, &BTreeMap::new()));
        assert_eq!(ups(&d), [("a", 1)], "4 free + 8: {d:?}");
        // Demand eats into headroom: 4 pending use the 4 free, and 12 more are bought.
        let work = pending(4, &gpu("H100:1"));
        let d = p.decide(&input(&work, &nodes, &BTreeMap::new()));
        assert_eq!(ups(&d), [("a", 2)], "{d:?}");

        let mut g = group("a", "aws", "r1", 100.0);
        g.min_nodes = 3;
        let p = policy(config(vec![g]));
        let d = p.decide(&input(&[], &[], &BTreeMap::new()));
        assert_eq!(ups(&d), [("a", 3)]);
        assert!(d.scale_up[0].reason.contains("min_nodes 3"));
    }

    #[test]
    fn idle_nodes_go_unless_pending_work_fits_them() {
        let p = policy(config(vec![group("a", "aws", "r1", 100.0)]));
        let nodes = [
            node(&p, "idle", 0, 0, Some(0)),
            node(&p, "busy", 0, 8, None),
        ];
        let d = p.decide(&input(&[], &nodes, &BTreeMap::new()));
        let gone: Vec<&str> = d.remove.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(gone, ["idle"]);
        let work = pending(1, &gpu("H100:1"));
        let d = p.decide(&input(&work, &nodes, &BTreeMap::new()));
        assert!(
            d.remove.is_empty(),
            "the pending sandbox will land there: {d:?}"
        );
        assert!(d.scale_up.is_empty());
    }

    fn arb_spec() -> impl Strategy<Value = SandboxSpec> {
        (
            prop::sample::select(vec![
                "H100:1",
                "H100:2",
                "H100:4",
                "H100:8",
                "H100:500m",
                "T4:1",
            ]),
            0usize..3,
        )
            .prop_map(|(g, region)| {
                let mut spec = gpu(g);
                if region > 0 {
                    spec.constraints.regions = vec![format!("r{region}")];
                }
                spec
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn never_crosses_a_cap_and_never_removes_a_busy_node(
            groups in prop::collection::vec((1u32..6, 1.0f64..100.0, 1usize..3, any::<bool>()), 1..5),
            work in prop::collection::vec((arb_spec(), 1usize..40), 0..5),
            existing in prop::collection::vec((0usize..5, 0u32..9, prop::option::of(0u64..1_000_000)), 0..12),
            in_flight in prop::collection::vec(0u32..3, 5),
            backoff in prop::collection::vec(any::<bool>(), 5),
            total in 1u32..20,
            budget in 1.0f64..800.0,
            rate in 1u32..20,
            recent in 0u32..20,
            headroom in 0u32..20,
        ) {
            let groups: Vec<NodeGroupConfig> = groups
                .iter()
                .enumerate()
                .map(|(i, (max, price, region, spot))| NodeGroupConfig {
                    max_nodes: *max,
                    capacity_type: if *spot { CapacityType::Spot } else { CapacityType::OnDemand },
                    ..group(&format!("g{i}"), if i % 2 == 0 { "aws" } else { "gcp" }, &format!("r{region}"), *price)
                })
                .collect();
            let mut cfg = config(groups.clone());
            cfg.max_nodes_total = total;
            cfg.budget_usd_per_hour = budget;
            cfg.max_scale_up_nodes_per_minute = rate;
            cfg.headroom_gpus.insert("H100".into(), headroom);
            let p = policy(cfg);
            let nodes: Vec<ExistingNode> = existing
                .iter()
                .enumerate()
                .filter(|(_, (g, _, _))| *g < groups.len())
                .map(|(i, (g, used, idle))| node(&p, &format!("n{i}"), *g, *used, *idle))
                .collect();
            let status: BTreeMap<String, GroupStatus> = groups
                .iter()
                .enumerate()
                .map(|(i, g)| (g.name.clone(), GroupStatus {
                    in_flight: in_flight[i],
                    backoff_until_ms: if backoff[i] { 2_000_000 } else { 0 },
                    last_error: None,
                }))
                .collect();
            let pending: Vec<PendingSandbox> = work.iter().flat_map(|(s, n)| pending(*n, s)).collect();
            let mut inp = input(&pending, &nodes, &status);
            inp.requested_last_minute = recent;
            let d = p.decide(&inp);

            let count = |g: &str| nodes.iter().filter(|n| n.group.as_deref() == Some(g)).count() as u32
                + status[g].in_flight;
            let before: u32 = groups.iter().map(|g| count(&g.name)).sum();
            let added: u32 = d.scale_up.iter().map(|s| s.nodes).sum();
            let price = |g: &str| groups.iter().find(|x| x.name == g).map_or(0.0, |x| x.price_per_hour_usd);
            let spend_before: f64 = groups.iter().map(|g| f64::from(count(&g.name)) * g.price_per_hour_usd).sum();
            let spend_added: f64 = d.scale_up.iter().map(|s| f64::from(s.nodes) * price(&s.group)).sum();
            if added > 0 {
                prop_assert!(added <= rate.saturating_sub(recent), "rate: {d:?}");
                prop_assert!(before + added <= total, "total: {d:?}");
                prop_assert!(spend_before + spend_added <= budget + 1e-6, "budget: {d:?}");
            }
            for s in &d.scale_up {
                let g = groups.iter().find(|g| g.name == s.group).expect("a configured group");
                prop_assert!(count(&g.name) + s.nodes <= g.max_nodes, "group max: {d:?}");
                prop_assert!(status[&g.name].backoff_until_ms <= inp.now_ms, "bought from a group backing off: {d:?}");
            }
            for r in &d.remove {
                let n = nodes.iter().find(|n| n.spec.id == r.node).expect("an existing node");
                prop_assert_eq!(n.sandboxes, 0, "removed a busy node");
            }
            prop_assert_eq!(&d, &p.decide(&inp), "not deterministic");
        }
    }
}
