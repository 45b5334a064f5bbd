//! One decision round of the autoscaler's policy ([`super::decide::Policy::decide`]):
//! `min_nodes`, pending demand (placed on the existing fleet first, then on templates of
//! groups, with failover past groups backing off), headroom, then scale-down.

use super::limits::{Caps, Cut, Fleet};
use super::scale_down::{self, NodeView, Removal};
use crate::config::{CapacityPreference, NodeGroupConfig};
use berth_core::model::{NodeSpec, SandboxSpec};
use berth_core::placement::filters::Reason;
use berth_core::placement::view::ClusterView;
use berth_proto::GpuModelName;
use berth_proto::gpu::GPU_MILLI_PER_GPU;
use berth_proto::node::CapacityType;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use super::decide::*;

pub(super) struct Round<'p, 'i> {
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
    pub(super) fn new(policy: &'p Policy, input: &'i Input<'i>) -> Self {
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

    pub(super) fn group(&self, g: usize) -> &'p NodeGroupConfig {
        &self.policy.cfg.node_groups[g]
    }

    pub(super) fn backing_off(&self, g: usize) -> Option<&'i GroupStatus> {
        let status = self.input.groups.get(&self.group(g).name)?;
        (status.backoff_until_ms > self.input.now_ms).then_some(status)
    }

    /// Buys up to `want` nodes of group `g` under the caps; returns how many.
    pub(super) fn buy(&mut self, g: usize, want: u32, cause: Cause, why: String) -> u32 {
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
    pub(super) fn min_nodes(&mut self) {
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
    pub(super) fn absorb(&mut self, spec: &SandboxSpec, count: u32) -> u32 {
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
    pub(super) fn fit(&mut self, class: usize, spec: &SandboxSpec, g: usize) -> Option<Fit> {
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

    pub(super) fn preference(&self, spec: &SandboxSpec) -> CapacityPreference {
        self.policy
            .cfg
            .tenant_capacity_preference
            .get(&spec.tenant)
            .copied()
            .unwrap_or(self.policy.cfg.capacity_preference)
    }

    /// Groups that can run the class, in the order to try them: preferred capacity type,
    /// then cheapest per sandbox slot; after the first, same provider before others.
    pub(super) fn ranked(&mut self, class: usize, spec: &SandboxSpec) -> Vec<(usize, Fit)> {
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
    pub(super) fn fill(
        &mut self,
        g: usize,
        spec: &SandboxSpec,
        fit: &Fit,
        mut remaining: u32,
    ) -> u32 {
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

    pub(super) fn push_planned(&mut self, g: usize, cpu: u64, memory: u64, gpus: Vec<u32>) {
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
    pub(super) fn demand(&mut self) {
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
    pub(super) fn headroom(&mut self) {
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

    pub(super) fn scale_down(&self) -> Vec<Removal> {
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

    pub(super) fn finish(self) -> Decision {
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
pub(super) fn shape(spec: &SandboxSpec) -> String {
    match &spec.gpu {
        Some(gpu) => gpu.specs().join("|"),
        None => format!("cpu {}m/{}Mi", spec.cpu_milli, spec.memory_mib),
    }
}
