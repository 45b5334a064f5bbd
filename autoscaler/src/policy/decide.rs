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

use std::collections::BTreeMap;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;

use berth_core::model::{Constraints, NodeSpec, SandboxId, SandboxSpec};
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Placer, PlacerConfig};
use berth_proto::GpuModelName;
use berth_proto::gpu::GPU_MILLI_PER_GPU;

use super::limits::{Cut, micro};
use super::round::Round;
use super::scale_down::Removal;
use crate::config::{AutoscalerConfig, NodeGroupConfig};

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
    pub(super) cfg: AutoscalerConfig,
    pub(super) templates: Vec<Arc<NodeSpec>>,
    pub(super) placer: Placer,
}

/// What one group is bought this round, by cause, with the reasons.
#[derive(Debug, Clone, Default)]
pub(super) struct Bought {
    pub(super) causes: BTreeMap<Cause, u32>,
    pub(super) reasons: Vec<String>,
}

/// Pending sandboxes with one scheduling shape.
pub(super) struct Class<'a> {
    pub(super) spec: &'a SandboxSpec,
    pub(super) count: u32,
    /// Index of its fit shape (classes differing only in tenant or priority share one).
    pub(super) fit_shape: usize,
}

pub(super) type FitKey<'a> = (
    u64,
    u64,
    Option<&'a berth_proto::GpuRequest>,
    &'a Constraints,
);

pub(super) type ClassKey<'a> = (
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CapacityPreference;
    use crate::testing::h100_group;
    use berth_proto::GpuRequest;
    use berth_proto::node::CapacityType;
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
