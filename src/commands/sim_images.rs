//! `berth sim images`: cache hit rate and packing quality per image rule, in one run.

use std::process::ExitCode;

use clap::Args;

use berth_scheduler::config::PolicyName;
use berth_scheduler::placement::DEFAULT_CANDIDATE_LIMIT;
use berth_scheduler::placement::image::ImageRule;
use berth_sim::images::{ImagesRun, MAX_RULES, Setup};

use super::sim::{Limit, Seeds, parse_limit, parse_seeds};
use crate::exit::EXIT_FAILURE;

/// Arguments of `berth sim images`.
#[derive(Debug, Args)]
pub(crate) struct ImagesArgs {
    /// Nodes of the synthetic pool.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    nodes: u32,
    /// Image rules compared, comma-separated: off, on (the default rule), tie-break,
    /// bonus:N (N points on the policy's 0..100 score).
    #[arg(long, default_value = "off,on", value_parser = parse_rules)]
    rules: Rules,
    /// Seeds: "1..10" (inclusive), "7", or "1,2,3".
    #[arg(long, default_value = "1..10", value_parser = parse_seeds)]
    seeds: Seeds,
    /// Images in the catalog.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    images: u32,
    /// Zipf exponent of image popularity (0 = uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Images each node holds at the start.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=256))]
    cached_per_node: u32,
    /// Images a node's cache holds at most (LRU).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    cache_capacity: u32,
    /// Keep caches as they start: a miss pulls nothing.
    #[arg(long)]
    no_pulls: bool,
    /// Placement policy.
    #[arg(long, default_value = "berth")]
    policy: PolicyName,
    /// Feasible nodes scored per decision (the scheduler's default), or "all".
    #[arg(long, default_value_t = Limit(Some(DEFAULT_CANDIDATE_LIMIT)), value_parser = parse_limit)]
    candidate_limit: Limit,
    /// Worker threads [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone)]
struct Rules(Vec<ImageRule>);

fn parse_rules(text: &str) -> Result<Rules, String> {
    let rules: Vec<ImageRule> = text
        .split(',')
        .map(|r| r.trim().parse())
        .collect::<Result<_, _>>()?;
    if rules.is_empty() || rules.len() > MAX_RULES {
        return Err(format!("give 1..={MAX_RULES} rules"));
    }
    Ok(Rules(rules))
}

pub(crate) fn run(args: &ImagesArgs) -> ExitCode {
    if !(0.0..=4.0).contains(&args.zipf) {
        eprintln!("berth sim images: --zipf {} is outside 0..=4", args.zipf);
        return ExitCode::from(EXIT_FAILURE);
    }
    let run = ImagesRun {
        setup: Setup {
            nodes: args.nodes as usize,
            images: args.images as usize,
            zipf_s: args.zipf,
            cached_per_node: args.cached_per_node as usize,
            cache_capacity: args.cache_capacity as usize,
            pulls: !args.no_pulls,
            policy: args.policy,
            candidate_limit: args.candidate_limit.0,
        },
        seeds: args.seeds.0.clone(),
        rules: args.rules.0.clone(),
        threads: args.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        }),
    };
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
            eprintln!("berth sim images: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
