//! `berth sim openb`: the FGD paper's placement experiment on the Alibaba openb traces,
//! with berth's real placement engine and state machine.
//!
//! # Layout
//! - [`trace`]: reading the node and pod CSVs.
//! - [`protocol`]: one seed of the experiment.
//! - this module: running seeds in parallel and reporting (text table, JSON).

pub mod protocol;
pub mod trace;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use berth_core::placement::PolicyName;
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::image::ImageRule;
use berth_core::placement::{Placer, PlacerConfig};

use protocol::{CURVE_BUCKETS, Experiment, SeedResult};

/// The artifact's seeds.
pub const DEFAULT_SEEDS: std::ops::RangeInclusive<u64> = 42..=51;
/// Most seeds in one run.
pub const MAX_SEEDS: usize = 1000;
/// The GPU-node list the protocol uses, looked for beside the pod list by default.
pub const DEFAULT_NODE_LIST: &str = "openb_node_list_gpu_node.csv";

/// A run of the experiment.
#[derive(Debug, Clone)]
pub struct OpenbRun {
    /// Pod list CSV.
    pub pods: PathBuf,
    /// Node list CSV.
    pub nodes: PathBuf,
    /// Placement policy.
    pub policy: PolicyName,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Feasible nodes scored per decision; `None` = all (the paper's setting).
    pub candidate_limit: Option<usize>,
    /// Worker threads.
    pub threads: usize,
    /// Check state invariants after each seed.
    pub check_invariants: bool,
}

impl OpenbRun {
    /// A run with the paper's settings: every node scored, seeds 42..=51, the GPU-node list
    /// beside the pod list.
    pub fn new(pods: &Path, policy: PolicyName) -> OpenbRun {
        OpenbRun {
            pods: pods.to_owned(),
            nodes: pods
                .parent()
                .unwrap_or(Path::new("."))
                .join(DEFAULT_NODE_LIST),
            policy,
            seeds: DEFAULT_SEEDS.collect(),
            candidate_limit: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            check_invariants: false,
        }
    }

    /// Runs every seed and aggregates.
    pub fn run(&self) -> Result<Report, String> {
        if self.seeds.is_empty() || self.seeds.len() > MAX_SEEDS {
            return Err(format!("{} seeds; give 1..={MAX_SEEDS}", self.seeds.len()));
        }
        let pods = trace::load_pods(&self.pods).map_err(|e| e.to_string())?;
        let default_nodes = self
            .pods
            .parent()
            .unwrap_or(Path::new("."))
            .join(DEFAULT_NODE_LIST);
        let nodes = trace::load_nodes(&self.nodes).map_err(|e| {
            if self.nodes == default_nodes {
                format!("{e} (the node list is looked for beside --pods; give --nodes)")
            } else {
                e.to_string()
            }
        })?;
        let nodes: Vec<_> = nodes.into_iter().filter(|n| !n.gpus.is_empty()).collect();
        if nodes.is_empty() || pods.is_empty() {
            return Err("the node list has no GPU nodes, or the pod list no pods".into());
        }
        // The typical workload comes from the trace as given (before shuffling and tuning).
        let typical = TypicalWorkload::from_specs(pods.iter().map(|p| &p.spec));
        let placer = Placer::new(
            PlacerConfig {
                policy: self.policy,
                allow_gpu_upgrade: false,
                candidate_limit: self.candidate_limit,
                // The scheduler's rule; openb pods name no image, so it never applies.
                image_rule: ImageRule::DEFAULT,
            },
            typical.clone(),
        );
        let experiment = Experiment {
            nodes: &nodes,
            pods: &pods,
            placer: &placer,
            typical: &typical,
            check_invariants: self.check_invariants,
        };
        let results = run_seeds(&experiment, &self.seeds, self.threads.max(1))?;
        Ok(Report::new(
            trace_name(&self.pods),
            policy_label(self.policy),
            results,
        ))
    }
}

fn run_seeds(
    experiment: &Experiment<'_>,
    seeds: &[u64],
    threads: usize,
) -> Result<Vec<SeedResult>, String> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::with_capacity(seeds.len()));
    std::thread::scope(|scope| {
        for _ in 0..threads.min(seeds.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(seed) = seeds.get(i) else { break };
                    let result = experiment.run(*seed);
                    if let Ok(mut all) = results.lock() {
                        all.push((i, result));
                    }
                }
            });
        }
    });
    let mut all = results
        .into_inner()
        .map_err(|_| "a worker panicked".to_owned())?;
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// "default" from `openb_pod_list_default.csv`.
pub fn trace_name(pods: &Path) -> String {
    let stem = pods.file_stem().and_then(|s| s.to_str()).unwrap_or("trace");
    stem.strip_prefix("openb_pod_list_")
        .unwrap_or(stem)
        .to_owned()
}

fn policy_label(policy: PolicyName) -> &'static str {
    policy.as_str()
}

/// Unallocated GPU % at 100 % arrived, mean of 10 seeds, from the FGD paper's artifact
/// (`analysis_allo_discrete.csv`): Random, DotProd, GpuClustering, GpuPacking, BestFit, FGD.
const PUBLISHED: &[(&str, [f64; 6])] = &[
    ("default", [13.70, 9.38, 8.35, 8.22, 7.14, 4.77]),
    ("cpu050", [10.98, 6.97, 6.48, 6.54, 6.44, 5.00]),
    ("gpushare40", [15.14, 10.70, 10.24, 10.23, 8.56, 6.04]),
    ("gpuspec10", [13.74, 9.83, 8.04, 7.76, 6.90, 5.34]),
    ("multigpu20", [13.08, 8.15, 6.66, 6.50, 6.27, 4.47]),
];

/// The paper's figure for a trace and one of its policies (`random`, `bestfit`, `fgd`).
pub fn published(trace: &str, policy: &str) -> Option<f64> {
    let column = match policy {
        "random" => 0,
        "bestfit" => 4,
        "fgd" => 5,
        _ => return None,
    };
    PUBLISHED
        .iter()
        .find(|(t, _)| *t == trace)
        .map(|(_, row)| row[column])
}

/// Results of all seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Trace name.
    pub trace: String,
    /// Policy name.
    pub policy: String,
    /// Per seed.
    pub seeds: Vec<SeedResult>,
    /// Mean over seeds.
    pub mean_unallocated_pct_at_100: f64,
    /// Mean over seeds.
    pub mean_unallocated_pct_at_end: f64,
    /// Mean allocation % per arrived-% bucket, over the seeds that reached it.
    pub curve: Vec<CurvePoint>,
}

/// One point of the curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Arrived %.
    pub arrived_pct: u32,
    /// Allocation %.
    pub alloc_pct: f64,
}

impl Report {
    fn new(trace: String, policy: &str, results: Vec<SeedResult>) -> Report {
        let n = results.len().max(1) as f64;
        let mean = |f: fn(&SeedResult) -> f64| results.iter().map(f).sum::<f64>() / n;
        let curve = (0..CURVE_BUCKETS)
            .filter_map(|b| {
                let values: Vec<f64> = results.iter().filter_map(|r| r.curve[b]).collect();
                (!values.is_empty()).then(|| CurvePoint {
                    arrived_pct: b as u32,
                    alloc_pct: values.iter().sum::<f64>() / values.len() as f64,
                })
            })
            .collect();
        Report {
            trace,
            policy: policy.to_owned(),
            mean_unallocated_pct_at_100: mean(|r| r.unallocated_pct_at_100),
            mean_unallocated_pct_at_end: mean(|r| r.unallocated_pct_at_end),
            seeds: results,
            curve,
        }
    }

    /// A table for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "openb trace {:?}, policy {}, {} seeds",
            self.trace,
            self.policy,
            self.seeds.len()
        );
        let _ = writeln!(
            out,
            "{:>6}  {:>18}  {:>18}  {:>15}  {:>11}",
            "seed", "unallocated @100%", "unallocated @end", "frag @100%", "pods failed"
        );
        for s in &self.seeds {
            let _ = writeln!(
                out,
                "{:>6}  {:>17.2}%  {:>17.2}%  {:>14.2}%  {:>11}",
                s.seed,
                s.unallocated_pct_at_100,
                s.unallocated_pct_at_end,
                s.frag_pct_at_100,
                s.pods_failed
            );
        }
        let _ = writeln!(
            out,
            "{:>6}  {:>17.2}%  {:>17.2}%",
            "mean", self.mean_unallocated_pct_at_100, self.mean_unallocated_pct_at_end
        );
        let mut published_line = Vec::new();
        for policy in ["random", "bestfit", "fgd"] {
            if let Some(p) = published(&self.trace, policy) {
                published_line.push(format!("{policy} {p:.2}%"));
            }
        }
        if !published_line.is_empty() {
            let _ = writeln!(
                out,
                "published (FGD paper, unallocated @100%): {}",
                published_line.join(", ")
            );
        }
        out
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}
