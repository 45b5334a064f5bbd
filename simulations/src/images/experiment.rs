//! One seed of the image experiment under one image rule.
//!
//! 1. The synthetic multi-cloud pool; every node holds `cached_per_node` distinct images
//!    drawn by popularity (nodes keep what they ran before, so popular images are common).
//! 2. Sandboxes of the synthetic mix, each naming an image drawn by the same popularity,
//!    arrive one at a time and never leave, until their requested GPU reaches 100 % of
//!    capacity (arrived %, as in the openb protocol; CPU-only sandboxes arrive in between).
//! 3. Each is placed by the real [`Placer`] against the view. A placement is a hit when the
//!    node held the image. With pulls on, a miss makes the node pull the image into its
//!    LRU cache of `cache_capacity` (evicting the least recently used), and the view learns
//!    it, as it would from the agent's next inventory report.
//!
//! Every rule of a seed sees the same pool, caches, arrivals and placer seed, so the
//! differences between rules are the rules'.

use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;

use berth_core::model::{NodeSpec, SandboxSpec};
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::image::ImageRule;
use berth_core::placement::view::{ClusterView, NodeView};
use berth_core::placement::{Placer, PlacerConfig, PolicyName};

use super::catalog::{Catalog, NodeCache};
use crate::synthetic;

/// Arrived GPU, as % of capacity, at which the nodes in use are counted.
pub const NODES_USED_AT_PCT: u64 = 50;

/// The pool, catalog and workload of the experiment (everything but the seed and the rule).
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Nodes of the synthetic pool.
    pub nodes: usize,
    /// Images in the catalog.
    pub images: usize,
    /// Zipf exponent of image popularity.
    pub zipf_s: f64,
    /// Images each node holds at the start.
    pub cached_per_node: usize,
    /// Images a node's cache holds at most.
    pub cache_capacity: usize,
    /// A miss makes the node pull the image (LRU eviction).
    pub pulls: bool,
    /// Placement policy.
    pub policy: PolicyName,
    /// Feasible nodes scored per decision; `None` = all.
    pub candidate_limit: Option<usize>,
}

/// What one (seed, rule) came to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleResult {
    /// The seed.
    pub seed: u64,
    /// The image rule (`off`, `tie-break`, `bonus:N`).
    pub rule: String,
    /// Sandboxes that arrived.
    pub arrived: u64,
    /// Sandboxes placed.
    pub placed: u64,
    /// Sandboxes that fit nowhere.
    pub failed: u64,
    /// Placements onto a node that held the image.
    pub hits: u64,
    /// 100 · hits / placed.
    pub hit_rate_pct: f64,
    /// Images pulled (misses, when pulls are on).
    pub pulls: u64,
    /// Unallocated GPU % of capacity after the last arrival (100 % arrived).
    pub unallocated_gpu_pct: f64,
    /// Fragmented GPU % of capacity after the last arrival (FGD's measure).
    pub frag_pct: f64,
    /// Nodes holding any sandbox when arrivals reached [`NODES_USED_AT_PCT`] % of GPU.
    pub nodes_used_at_50: u32,
}

/// A seed's inputs, shared by every rule.
pub struct Inputs {
    nodes: Vec<NodeSpec>,
    caches: Vec<NodeCache>,
    catalog: Catalog,
    arrivals: Vec<(SandboxSpec, u32)>,
    typical: TypicalWorkload,
    seed: u64,
}

/// GPU milli a sandbox asks for (its first option, as arrived % counts it).
fn gpu_milli(spec: &SandboxSpec) -> u64 {
    spec.gpu
        .as_ref()
        .and_then(|g| g.options.first())
        .map_or(0, |o| {
            u64::from(o.amount.gpu_count()) * u64::from(o.amount.milli_per_gpu())
        })
}

impl Inputs {
    /// The pool, caches and arrivals of a seed.
    pub fn new(setup: &Setup, seed: u64) -> Inputs {
        let catalog = Catalog::new(setup.images, setup.zipf_s);
        let mut cache_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xcac4_e5ee);
        let mut nodes = synthetic::pool(setup.nodes, seed);
        let caches: Vec<NodeCache> = nodes
            .iter_mut()
            .map(|node| {
                let held = catalog.draw_distinct(setup.cached_per_node, &mut cache_rng);
                let cache = NodeCache::new(held, setup.cache_capacity);
                node.cached_images = cache.references(&catalog);
                cache
            })
            .collect();
        let capacity: u64 = nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
        let mut image_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1a6e_5eed);
        let mut arrived = 0u64;
        let mut arrivals = Vec::new();
        // 40 sandboxes per node is far more than 100 % of the pool's GPU in this mix.
        for mut spec in synthetic::sandboxes(40 * setup.nodes + 100, seed) {
            if arrived >= capacity {
                break;
            }
            arrived += gpu_milli(&spec);
            let image = catalog.draw(&mut image_rng);
            spec.image = catalog.name(image).to_owned();
            arrivals.push((spec, image));
        }
        let typical = TypicalWorkload::from_specs(arrivals.iter().map(|(s, _)| s));
        Inputs {
            nodes,
            caches,
            catalog,
            arrivals,
            typical,
            seed,
        }
    }

    /// Runs the arrivals under one rule.
    pub fn run(&self, setup: &Setup, rule: ImageRule) -> RuleResult {
        let placer = Placer::new(
            PlacerConfig {
                policy: setup.policy,
                allow_gpu_upgrade: false,
                candidate_limit: setup.candidate_limit,
                image_rule: rule,
            },
            self.typical.clone(),
        );
        let mut view = ClusterView::new();
        for node in &self.nodes {
            let free: Vec<u32> = vec![1000; node.gpus.len()];
            view.push(
                Arc::new(node.clone()),
                1,
                true,
                node.cpu_milli,
                node.memory_mib,
                free,
            );
        }
        view.shuffle_ranks(self.seed);
        let mut caches = self.caches.clone();
        let capacity = self
            .nodes
            .iter()
            .map(|n| n.gpus.len() as u64 * 1000)
            .sum::<u64>();
        let capacity_pct = capacity.max(1) as f64 / 100.0;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x9_1ace);
        let mut used = vec![false; self.nodes.len()];
        let (mut arrived_milli, mut allocated_milli) = (0u64, 0u64);
        let mut result = RuleResult {
            seed: self.seed,
            rule: rule.label(),
            arrived: 0,
            placed: 0,
            failed: 0,
            hits: 0,
            hit_rate_pct: 0.0,
            pulls: 0,
            unallocated_gpu_pct: 0.0,
            frag_pct: 0.0,
            nodes_used_at_50: 0,
        };
        let mut counted_at_50 = false;
        for (spec, image) in &self.arrivals {
            result.arrived += 1;
            arrived_milli += gpu_milli(spec);
            let decision = placer.place(&view, spec, &mut rng);
            match decision.placement {
                Some(placement) => {
                    view.reserve(spec, &placement);
                    result.placed += 1;
                    allocated_milli +=
                        u64::from(placement.gpu_milli_per_gpu) * placement.gpu_indices.len() as u64;
                    if let Some(index) = view.index_of(&placement.node) {
                        used[index as usize] = true;
                        let cache = &mut caches[index as usize];
                        if cache.holds(*image) {
                            result.hits += 1;
                        }
                        if setup.pulls && cache.start(*image) {
                            result.pulls += 1;
                            view.set_cached_images(index, &cache.references(&self.catalog));
                        }
                    }
                }
                None => result.failed += 1,
            }
            if !counted_at_50 && arrived_milli * 100 >= capacity * NODES_USED_AT_PCT {
                counted_at_50 = true;
                result.nodes_used_at_50 = used.iter().filter(|u| **u).count() as u32;
            }
        }
        let fragmentation = |n: &NodeView| {
            self.typical
                .node_fragmentation(n, n.cpu_milli_free, None, &n.gpu_milli_free)
        };
        let frag: f64 = view.nodes().iter().map(fragmentation).sum();
        result.hit_rate_pct = 100.0 * result.hits as f64 / result.placed.max(1) as f64;
        result.unallocated_gpu_pct = 100.0 - allocated_milli as f64 / capacity_pct;
        result.frag_pct = frag / capacity_pct;
        result
    }
}
