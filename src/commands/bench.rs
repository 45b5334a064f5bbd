//! `berth bench …`: benchmarks that print figures comparable across runs.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Subcommand};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;

use berth_scheduler::config::PolicyName;
use berth_scheduler::placement::fragmentation::TypicalWorkload;
use berth_scheduler::placement::view::ClusterView;
use berth_scheduler::placement::{DEFAULT_CANDIDATE_LIMIT, Placer, PlacerConfig};
use berth_scheduler::state::{Command, State};
use berth_sim::images::catalog::Catalog;
use berth_sim::synthetic;

use crate::exit::EXIT_FAILURE;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Placement decision latency on a synthetic multi-cloud pool (T4 … B200), half full.
    Place(PlaceArgs),
    /// Create throughput and latency through a local Raft cluster of real scheduler
    /// processes (fsync on), or through `--target`.
    Create(super::bench_create::CreateArgs),
    /// Leader failover: kill -9 the leader of a local cluster N times; time from the kill
    /// to the first acknowledged create.
    Failover(super::bench_failover::FailoverArgs),
    /// etcd's own write benchmark (`etcdctl check perf`, `--load=l` by default) against a
    /// 3-member etcd on loopback in a temporary directory, for comparison with `bench
    /// create` on the same machine.
    EtcdPerf(super::bench_etcd::EtcdPerfArgs),
    /// The time of one autoscaler policy decision for a large fleet and backlog.
    Autoscale(super::bench_autoscale::AutoscaleArgs),
    /// A burst of small sandboxes onto `berth dev` from many clients: nothing may be lost,
    /// no leader may change, no heartbeat may be late.
    Burst(super::bench_burst::BurstArgs),
    /// Exec round trips into a long-lived sandbox on `berth dev` (gVisor), through the
    /// leader and a follower, beside bare `runsc exec` into the same sandbox.
    Exec(super::bench_exec::ExecArgs),
    /// Pause and resume latency by sandbox memory on `berth dev` (gVisor), beside bare
    /// `runsc checkpoint`/`restore`, `runsc pause`/`resume` and the cgroup freezer.
    Resume(super::bench_resume::ResumeArgs),
    /// Create-to-running latency of creates served by a warm pool beside cold creates, on
    /// `berth dev` (gVisor).
    Pool(super::bench_pool::PoolArgs),
    /// The control plane at fleet scale: emulated agents (one connection and certificate
    /// each), sandboxes filled and held, RSS and CPU per replica, a wiped follower's
    /// snapshot install, and every agent's re-registration after the leader is killed.
    Fleet(super::bench_fleet::FleetArgs),
}

/// Arguments of `berth bench place`.
#[derive(Debug, Args)]
pub(crate) struct PlaceArgs {
    /// Nodes in the pool.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    nodes: u32,
    /// Sandboxes placed and timed.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    sandboxes: u32,
    /// Placement policy.
    #[arg(long, default_value = "berth")]
    policy: PolicyName,
    /// GPU allocation % to fill the pool to before timing.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=95))]
    fill_pct: u32,
    /// Feasible nodes scored per decision.
    #[arg(long, default_value_t = DEFAULT_CANDIDATE_LIMIT)]
    candidate_limit: usize,
    /// Seed of the pool and the mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give sandboxes images from a catalog of this many (Zipf 1) and let each node cache
    /// 8 of them, so image affinity does its work in the timed decisions [default: no
    /// images, as in openb].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    images: Option<u32>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PlaceReport {
    nodes: u32,
    policy: &'static str,
    sandboxes: u32,
    placed: u64,
    unplaceable: u64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    placements_per_s: f64,
    /// Placements onto a node holding the image, % (with `--images`).
    #[serde(skip_serializing_if = "Option::is_none")]
    image_hit_pct: Option<f64>,
}

impl BenchCommand {
    pub(crate) fn run(self) -> ExitCode {
        match self {
            BenchCommand::Place(args) => place(&args),
            BenchCommand::Create(args) => super::bench_create::run(&args),
            BenchCommand::Failover(args) => super::bench_failover::failover(&args),
            BenchCommand::EtcdPerf(args) => super::bench_etcd::run(&args),
            BenchCommand::Autoscale(args) => super::bench_autoscale::run(&args),
            BenchCommand::Burst(args) => super::bench_burst::run(&args),
            BenchCommand::Exec(args) => super::bench_exec::run(&args),
            BenchCommand::Resume(args) => super::bench_resume::run(&args),
            BenchCommand::Pool(args) => super::bench_pool::run(&args),
            BenchCommand::Fleet(args) => super::bench_fleet::run(&args),
        }
    }
}

fn place(args: &PlaceArgs) -> ExitCode {
    let catalog = args.images.map(|n| Catalog::new(n as usize, 1.0));
    let mut image_rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x1a6e);
    let mut state = State::new();
    for mut node in synthetic::pool(args.nodes as usize, args.seed) {
        if let Some(catalog) = &catalog {
            node.cached_images = catalog
                .draw_distinct(8, &mut image_rng)
                .into_iter()
                .map(|k| catalog.name(k).to_owned())
                .collect();
        }
        state.apply(&Command::RegisterNode { spec: node }, 0);
    }
    let mut view = ClusterView::from_state(&state, args.seed);
    let gpu_capacity: u64 = view
        .nodes()
        .iter()
        .map(|n| n.spec.gpus.len() as u64 * 1000)
        .sum();
    let mut mix = synthetic::sandboxes(args.sandboxes as usize + 1, args.seed);
    if let Some(catalog) = &catalog {
        for spec in &mut mix {
            spec.image = catalog.name(catalog.draw(&mut image_rng)).to_owned();
        }
    }
    let typical = TypicalWorkload::from_specs(&mix);
    let placer = Placer::new(
        PlacerConfig {
            policy: args.policy,
            allow_gpu_upgrade: true,
            candidate_limit: Some(args.candidate_limit.max(1)),
            ..PlacerConfig::default()
        },
        typical,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);

    // Fill to the target allocation with the same mix, untimed.
    let target = gpu_capacity * u64::from(args.fill_pct) / 100;
    let mut filled = 0u64;
    let mut fill = synthetic::sandboxes(50 * args.nodes as usize + 1000, args.seed.wrapping_add(1))
        .into_iter();
    let mut misses = 0;
    while filled < target && misses < 1000 {
        let Some(spec) = fill.next() else { break };
        match placer.place(&view, &spec, &mut rng).placement {
            Some(p) => {
                filled += u64::from(p.gpu_milli_per_gpu) * p.gpu_indices.len() as u64;
                view.reserve(&spec, &p);
            }
            None => misses += 1,
        }
    }

    let mut latencies_ns: Vec<u64> = Vec::with_capacity(args.sandboxes as usize);
    let (mut placed, mut unplaceable, mut cached) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for spec in mix.iter().take(args.sandboxes as usize) {
        let t = Instant::now();
        let decision = placer.place(&view, spec, &mut rng);
        if let Some(p) = &decision.placement {
            view.reserve(spec, p);
        }
        latencies_ns.push(t.elapsed().as_nanos() as u64);
        cached += u64::from(decision.explanation.image_cached == Some(true));
        match decision.placement {
            Some(p) => {
                placed += 1;
                // Keep the pool near its fill level: what lands leaves again.
                view.release(spec, &p);
            }
            None => unplaceable += 1,
        }
    }
    let total = started.elapsed().as_secs_f64();
    latencies_ns.sort_unstable();
    let quantile = |q: f64| {
        latencies_ns[((latencies_ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
    };
    let report = PlaceReport {
        nodes: args.nodes,
        policy: args.policy.as_str(),
        sandboxes: args.sandboxes,
        placed,
        unplaceable,
        p50_us: quantile(0.5),
        p99_us: quantile(0.99),
        max_us: quantile(1.0),
        placements_per_s: f64::from(args.sandboxes) / total.max(1e-9),
        image_hit_pct: catalog
            .is_some()
            .then(|| 100.0 * cached as f64 / placed.max(1) as f64),
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("berth bench place: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    } else {
        println!(
            "{} nodes, policy {}, {} sandboxes ({} placed, {} unplaceable; pool {}% GPU-allocated)\n  per-sandbox decision: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs\n  {:.0} placements/s on one core",
            report.nodes,
            report.policy,
            report.sandboxes,
            report.placed,
            report.unplaceable,
            args.fill_pct,
            report.p50_us,
            report.p99_us,
            report.max_us,
            report.placements_per_s
        );
        if let Some(hit) = report.image_hit_pct {
            println!(
                "  images: {} in the catalog, 8 cached per node; {hit:.1}% of placements onto a node holding the image",
                args.images.unwrap_or(0)
            );
        }
    }
    ExitCode::SUCCESS
}
