//! `berth sim images`: image-aware placement measured. On the synthetic pool with images
//! cached on some nodes, the same arrivals are placed under each image rule (off, the
//! default, bonuses) in one run, and each reports its cache hit rate beside its packing
//! quality.
//!
//! # Layout
//! - [`catalog`]: the image catalog (Zipf popularity) and per-node LRU caches.
//! - [`experiment`]: one seed under one rule.
//! - this module: running seeds × rules in parallel and reporting (text, JSON).

pub mod catalog;
pub mod experiment;

use std::fmt::Write as _;

use serde::Serialize;

use berth_core::placement::image::ImageRule;

pub use experiment::{Inputs, RuleResult, Setup};

/// Most seeds in one run.
pub const MAX_SEEDS: usize = 1000;
/// Most rules compared in one run.
pub const MAX_RULES: usize = 16;

/// A run: seeds × rules on one setup.
#[derive(Debug, Clone)]
pub struct ImagesRun {
    /// Pool, catalog and workload.
    pub setup: Setup,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Rules compared, in report order.
    pub rules: Vec<ImageRule>,
    /// Worker threads.
    pub threads: usize,
}

/// Mean over seeds of one rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleSummary {
    /// The rule.
    pub rule: String,
    /// Placements onto a node that held the image, %.
    pub hit_rate_pct: f64,
    /// Images pulled.
    pub pulls: f64,
    /// Unallocated GPU % after the last arrival.
    pub unallocated_gpu_pct: f64,
    /// Fragmented GPU % after the last arrival.
    pub frag_pct: f64,
    /// Sandboxes that fit nowhere.
    pub failed: f64,
    /// Nodes in use at 50 % arrived.
    pub nodes_used_at_50: f64,
}

/// Results of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The setup.
    pub setup: Setup,
    /// Seeds run.
    pub seeds: Vec<u64>,
    /// Mean per rule, in the order given.
    pub rules: Vec<RuleSummary>,
    /// Per seed and rule.
    pub results: Vec<RuleResult>,
}

impl ImagesRun {
    /// Runs every seed under every rule.
    pub fn run(&self) -> Result<Report, String> {
        if self.seeds.is_empty() || self.seeds.len() > MAX_SEEDS {
            return Err(format!("{} seeds; give 1..={MAX_SEEDS}", self.seeds.len()));
        }
        if self.rules.is_empty() || self.rules.len() > MAX_RULES {
            return Err(format!("{} rules; give 1..={MAX_RULES}", self.rules.len()));
        }
        if self.setup.nodes == 0 {
            return Err("the pool needs at least one node".into());
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..self.threads.clamp(1, self.seeds.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(seed) = self.seeds.get(i) else { break };
                        let inputs = Inputs::new(&self.setup, *seed);
                        let per_rule: Vec<RuleResult> = self
                            .rules
                            .iter()
                            .map(|rule| inputs.run(&self.setup, *rule))
                            .collect();
                        if let Ok(mut all) = results.lock() {
                            all.push((i, per_rule));
                        }
                    }
                });
            }
        });
        let mut all = results
            .into_inner()
            .map_err(|_| "a worker panicked".to_owned())?;
        all.sort_by_key(|(i, _)| *i);
        let results: Vec<RuleResult> = all.into_iter().flat_map(|(_, r)| r).collect();
        let rules = self
            .rules
            .iter()
            .map(|rule| summarise(&rule.label(), &results))
            .collect();
        Ok(Report {
            setup: self.setup.clone(),
            seeds: self.seeds.clone(),
            rules,
            results,
        })
    }
}

fn summarise(rule: &str, results: &[RuleResult]) -> RuleSummary {
    let of_rule: Vec<&RuleResult> = results.iter().filter(|r| r.rule == rule).collect();
    let n = of_rule.len().max(1) as f64;
    let mean = |f: fn(&RuleResult) -> f64| of_rule.iter().map(|r| f(r)).sum::<f64>() / n;
    RuleSummary {
        rule: rule.to_owned(),
        hit_rate_pct: mean(|r| r.hit_rate_pct),
        pulls: mean(|r| r.pulls as f64),
        unallocated_gpu_pct: mean(|r| r.unallocated_gpu_pct),
        frag_pct: mean(|r| r.frag_pct),
        failed: mean(|r| r.failed as f64),
        nodes_used_at_50: mean(|r| f64::from(r.nodes_used_at_50)),
    }
}

impl Report {
    /// A table for people: one line per rule, means over the seeds.
    pub fn to_text(&self) -> String {
        let s = &self.setup;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "image placement: {} synthetic nodes, {} images (zipf {}), {} cached per node, {}, policy {}, candidate limit {}, {} seeds ({}); means",
            s.nodes,
            s.images,
            s.zipf_s,
            s.cached_per_node,
            if s.pulls {
                format!("a miss pulls (LRU of {})", s.cache_capacity)
            } else {
                "no pulls".to_owned()
            },
            s.policy.as_str(),
            s.candidate_limit
                .map_or_else(|| "all".to_owned(), |l| l.to_string()),
            self.seeds.len(),
            seed_list(&self.seeds),
        );
        let _ = writeln!(
            out,
            "{:<10}  {:>8}  {:>9}  {:>22}  {:>10}  {:>8}  {:>15}",
            "rule",
            "hit rate",
            "pulls",
            "unallocated GPU @100%",
            "frag @100%",
            "failed",
            "nodes used @50%"
        );
        for r in &self.rules {
            let _ = writeln!(
                out,
                "{:<10}  {:>7.1}%  {:>9.1}  {:>21.2}%  {:>9.2}%  {:>8.1}  {:>15.1}",
                r.rule,
                r.hit_rate_pct,
                r.pulls,
                r.unallocated_gpu_pct,
                r.frag_pct,
                r.failed,
                r.nodes_used_at_50
            );
        }
        out
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

fn seed_list(seeds: &[u64]) -> String {
    let contiguous = seeds.windows(2).all(|w| w[1] == w[0] + 1);
    match (seeds.first(), seeds.last()) {
        (Some(a), Some(b)) if contiguous && seeds.len() > 1 => format!("{a}..{b}"),
        _ => seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}
