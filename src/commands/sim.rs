//! `berth sim …`: capacity-planning simulations.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth_scheduler::config::PolicyName;
use berth_sim::openb::{MAX_SEEDS, OpenbRun};

use crate::exit::EXIT_FAILURE;

/// Simulations.
#[derive(Debug, Subcommand)]
pub(crate) enum SimCommand {
    /// The FGD paper's placement experiment on an Alibaba openb trace: pods arrive in a
    /// seeded random order up to 130 % of GPU capacity; report unallocated GPU % at 100 %.
    Openb(OpenbArgs),
    /// Image-aware placement: on a synthetic pool where nodes cache images of a skewed
    /// catalog, place the same arrivals under each image rule (off, on, bonus:N) and report
    /// cache hit rate beside packing quality for each.
    Images(super::sim_images::ImagesArgs),
    /// Deterministic Raft chaos: replicas over a seeded faulty network with crashes; checks
    /// that no acknowledged create is lost, nothing is double-allocated, replicas converge
    /// and progress resumes. A failure prints SEED=… and replays exactly.
    Chaos(ChaosArgs),
    /// Run a scenario file (pool, autoscaler, workload) in virtual time; writes
    /// summary.json, series.csv, SVG plots and report.html.
    Run(super::sim_run::RunArgs),
    /// Run A's workload on A's and B's pools and autoscalers, side by side.
    Compare(super::sim_run::CompareArgs),
}

/// Arguments of `berth sim openb`.
#[derive(Debug, Args)]
pub(crate) struct OpenbArgs {
    /// Pod list CSV (openb_pod_list_*.csv).
    #[arg(long)]
    pods: PathBuf,
    /// Node list CSV [default: openb_node_list_gpu_node.csv beside --pods].
    #[arg(long)]
    nodes: Option<PathBuf>,
    /// Placement policy: random, bestfit, fgd (the paper's baselines) or berth.
    #[arg(long, default_value = "berth")]
    policy: PolicyName,
    /// Seeds: "42..51" (inclusive), "7", or "1,2,3".
    #[arg(long, default_value = "42..51", value_parser = parse_seeds)]
    seeds: Seeds,
    /// Feasible nodes scored per decision ("all" is the paper's setting; the scheduler's
    /// default is 64).
    #[arg(long, default_value = "all", value_parser = parse_limit)]
    candidate_limit: Limit,
    /// Worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Check every state invariant after each seed.
    #[arg(long)]
    check_invariants: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `berth sim chaos`.
#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// Number of seeds to run.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Replicas per cluster (3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    replicas: u64,
    /// Virtual milliseconds of faults per seed.
    #[arg(long, default_value_t = 12_000)]
    fault_ms: u64,
    /// Worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Print one line per seed, not only failures.
    #[arg(long)]
    verbose: bool,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Seeds(pub(crate) Vec<u64>);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit(pub(crate) Option<usize>);

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("all"),
        }
    }
}

pub(crate) fn parse_seeds(text: &str) -> Result<Seeds, String> {
    let seeds: Vec<u64> = if let Some((a, b)) = text.split_once("..") {
        let a: u64 = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not a seed"))?;
        let b: u64 = b
            .trim()
            .trim_start_matches('=')
            .parse()
            .map_err(|_| format!("{b:?} is not a seed"))?;
        if b < a {
            return Err(format!("empty range {text:?}"));
        }
        if b - a >= MAX_SEEDS as u64 {
            return Err(format!("{text:?} is more than {MAX_SEEDS} seeds"));
        }
        (a..=b).collect()
    } else {
        text.split(',')
            .map(|s| s.trim().parse().map_err(|_| format!("{s:?} is not a seed")))
            .collect::<Result<_, _>>()?
    };
    if seeds.is_empty() || seeds.len() > MAX_SEEDS {
        return Err(format!("give 1..={MAX_SEEDS} seeds"));
    }
    Ok(Seeds(seeds))
}

pub(crate) fn parse_limit(text: &str) -> Result<Limit, String> {
    if text == "all" {
        return Ok(Limit(None));
    }
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(Limit(Some(n))),
        _ => Err(format!("{text:?} is not a positive number or \"all\"")),
    }
}

impl SimCommand {
    pub(crate) fn run(self) -> ExitCode {
        match self {
            SimCommand::Openb(args) => openb(args),
            SimCommand::Images(args) => super::sim_images::run(&args),
            SimCommand::Chaos(args) => chaos(&args),
            SimCommand::Run(args) => super::sim_run::run(&args),
            SimCommand::Compare(args) => super::sim_run::compare(&args),
        }
    }
}

fn openb(args: OpenbArgs) -> ExitCode {
    let mut run = OpenbRun::new(&args.pods, args.policy);
    if let Some(nodes) = args.nodes {
        run.nodes = nodes;
    }
    run.seeds = args.seeds.0;
    run.candidate_limit = args.candidate_limit.0;
    run.check_invariants = args.check_invariants;
    if let Some(threads) = args.threads {
        run.threads = threads.max(1);
    }
    match run.run() {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth sim openb: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn chaos(args: &ChaosArgs) -> ExitCode {
    use berth_scheduler::replication::harness::{self, ChaosConfig, ChaosReport};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    let cfg = ChaosConfig {
        replicas: args.replicas as usize,
        fault_ms: args.fault_ms,
        ..ChaosConfig::default()
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get));
    let next = AtomicU64::new(args.start);
    let end = args.start.saturating_add(args.seeds);
    let results: Mutex<Vec<ChaosReport>> = Mutex::new(Vec::new());
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end {
                        return;
                    }
                    let report = harness::run(seed, &cfg);
                    if args.verbose || !report.violations.is_empty() {
                        println!("{}", report.summary());
                    }
                    if let Ok(mut r) = results.lock() {
                        r.push(report);
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let failed: Vec<u64> = results
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| r.seed)
        .collect();
    let sum = |f: fn(&ChaosReport) -> u64| results.iter().map(f).sum::<u64>();
    let summary = serde_json::json!({
        "seeds": results.len(),
        "replicas": args.replicas,
        "failed_seeds": failed,
        "acked_creates": sum(|r| r.acked_creates),
        "acked_deletes": sum(|r| r.acked_deletes),
        "crashes": sum(|r| r.crashes),
        "lost_writes": sum(|r| r.lost_writes),
        "partitions": sum(|r| r.partitions),
        "messages_dropped": sum(|r| r.messages_dropped),
        "elections": sum(|r| r.leader_changes),
        "max_recovery_ms": results.iter().filter_map(|r| r.recovery_ms).max(),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{} seeds, {} failed; {} creates acknowledged, {} crashes ({} mid-write), {} partitions, {} elections; {:.1} s",
            results.len(),
            failed.len(),
            summary["acked_creates"],
            summary["crashes"],
            summary["lost_writes"],
            summary["partitions"],
            summary["elections"],
            started.elapsed().as_secs_f64()
        );
    }
    for seed in &failed {
        eprintln!(
            "SEED={seed} replays with: berth sim chaos --start {seed} --seeds 1 --replicas {} --verbose",
            args.replicas
        );
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}
