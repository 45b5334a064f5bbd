//! `berth bench autoscale`: the time of one autoscaler policy decision on a large fleet
//! with a large backlog.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::config::{NodeGroupConfig, ProviderConfig};
use berth_autoscaler::policy::decide::{
    ExistingNode, GROUP_LABEL, Input, PendingSandbox, Policy, planning_placer,
};
use berth_scheduler::model::{NodeSpec, SandboxId};
use berth_scheduler::placement::fragmentation::TypicalWorkload;
use berth_scheduler::placement::view::ClusterView;
use berth_scheduler::placement::{Placer, PlacerConfig};
use berth_sim::synthetic;

use crate::exit::EXIT_FAILURE;

/// Arguments of `berth bench autoscale`.
#[derive(Debug, Args)]
pub(crate) struct AutoscaleArgs {
    /// Nodes in the fleet (the synthetic multi-cloud pool, T4 … B200).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    nodes: u32,
    /// Pending sandboxes: sandboxes of the synthetic mix that fit nowhere in the filled
    /// fleet, as the scheduler would report them.
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pending: u32,
    /// GPU allocation % the fleet is filled to before the decision.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u32).range(0..=100))]
    fill_pct: u32,
    /// Timed decisions; the median is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Seed of the fleet and the mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: u32,
    pending: u32,
    decision_ms: f64,
    min_ms: f64,
    max_ms: f64,
    groups: usize,
    nodes_added: u32,
    absorbed: u32,
    unmet: u32,
}

/// One node group per distinct instance of the pool (provider, region, instance type).
fn groups_of(pool: &mut [NodeSpec]) -> Vec<NodeGroupConfig> {
    let mut groups: BTreeMap<(String, String, String), NodeGroupConfig> = BTreeMap::new();
    for node in pool.iter_mut() {
        let key = (
            node.provider.clone(),
            node.region.clone(),
            node.instance_type.clone(),
        );
        let next = groups.len();
        let group = groups.entry(key).or_insert_with(|| NodeGroupConfig {
            name: format!("g{next}"),
            provider: node.provider.clone(),
            region: node.region.clone(),
            instance_type: node.instance_type.clone(),
            gpu_model: node.gpus.first().map(|g| g.model.as_str().to_owned()),
            gpu_count: node.gpus.len() as u32,
            cpu_milli: node.cpu_milli,
            memory_mib: node.memory_mib,
            price_per_hour_usd: node.price_micro_usd_per_hour as f64 / 1e6,
            capacity_type: node.capacity_type,
            min_nodes: 0,
            max_nodes: 100_000,
            labels: BTreeMap::new(),
        });
        node.labels.insert(GROUP_LABEL.into(), group.name.clone());
    }
    groups.into_values().collect()
}

pub(crate) fn run(args: &AutoscaleArgs) -> ExitCode {
    let mut pool = synthetic::pool(args.nodes as usize, args.seed);
    let groups = groups_of(&mut pool);
    let mut view = ClusterView::new();
    for node in &pool {
        let gpus = vec![1000; node.gpus.len()];
        view.push(
            Arc::new(node.clone()),
            0,
            true,
            node.cpu_milli,
            node.memory_mib,
            gpus,
        );
    }
    // Fill the fleet with the same mix, untimed.
    let placer = Placer::new(PlacerConfig::default(), TypicalWorkload::default());
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let capacity: u64 = pool.iter().map(|n| n.gpus.len() as u64 * 1000).sum();
    let target = capacity * u64::from(args.fill_pct) / 100;
    let (mut filled, mut misses) = (0u64, 0);
    let mut counts = vec![0u32; pool.len()];
    let fill = synthetic::sandboxes(50 * args.nodes as usize + 1000, args.seed.wrapping_add(1));
    for spec in &fill {
        if filled >= target || misses >= 1000 {
            break;
        }
        match placer.place(&view, spec, &mut rng).placement {
            Some(p) => {
                filled += u64::from(p.gpu_milli_per_gpu) * p.gpu_indices.len() as u64;
                if let Some(i) = view.index_of(&p.node) {
                    counts[i as usize] += 1;
                }
                view.reserve(spec, &p);
            }
            None => misses += 1,
        }
    }
    let nodes: Vec<ExistingNode> = view
        .nodes()
        .iter()
        .zip(&counts)
        .map(|(n, used)| ExistingNode {
            spec: n.spec.clone(),
            group: n.spec.labels.get(GROUP_LABEL).cloned(),
            ready: true,
            cpu_milli_free: n.cpu_milli_free,
            memory_mib_free: n.memory_mib_free,
            gpu_milli_free: n.gpu_milli_free.clone(),
            sandboxes: *used,
            idle_since_ms: (*used == 0).then_some(0),
        })
        .collect();
    // The backlog is what the scheduler could not place: sandboxes of the mix that fit
    // nowhere in the filled fleet (checked untimed, as the scheduler would have).
    let mut pending: Vec<PendingSandbox> = Vec::with_capacity(args.pending as usize);
    let mut draw = 0u64;
    while pending.len() < args.pending as usize && draw < 1_000 {
        let batch = synthetic::sandboxes(100_000, args.seed.wrapping_add(1_000 + draw));
        draw += 1;
        for spec in batch {
            if pending.len() == args.pending as usize {
                break;
            }
            if placer.place(&view, &spec, &mut rng).placement.is_none() {
                pending.push(PendingSandbox {
                    id: SandboxId(pending.len() as u64),
                    count: 1,
                    spec,
                    reason: "no node fits".into(),
                });
            }
        }
    }
    let cfg = AutoscalerConfig {
        max_nodes_total: 1_000_000,
        max_scale_up_nodes_per_minute: 1_000_000,
        budget_usd_per_hour: 1e9,
        providers: BTreeMap::from([(
            "sim".to_string(),
            ProviderConfig::Sim(berth_autoscaler::config::SimCloudConfig {
                seed: args.seed,
                ..Default::default()
            }),
        )]),
        node_groups: groups,
        ..AutoscalerConfig::default()
    };
    let group_count = cfg.node_groups.len();
    let policy = Policy::new(cfg, planning_placer());
    let status = BTreeMap::new();
    let input = Input {
        now_ms: 3_600_000,
        seed: args.seed,
        pending: &pending,
        nodes: &nodes,
        groups: &status,
        requested_last_minute: 0,
    };
    let mut times = Vec::new();
    let mut decision = None;
    for _ in 0..args.runs {
        let started = Instant::now();
        let d = policy.decide(&input);
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        decision = Some(d);
    }
    times.sort_by(f64::total_cmp);
    let Some(decision) = decision else {
        return ExitCode::from(EXIT_FAILURE);
    };
    let report = Report {
        nodes: args.nodes,
        pending: args.pending,
        decision_ms: times[times.len() / 2],
        min_ms: times[0],
        max_ms: times[times.len() - 1],
        groups: group_count,
        nodes_added: decision.scale_up.iter().map(|s| s.nodes).sum(),
        absorbed: decision.absorbed,
        unmet: decision.unmet.values().sum(),
    };
    if args.json {
        match serde_json::to_string(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("berth bench autoscale: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        }
    } else {
        println!(
            "{} nodes ({} groups, {}% GPU-allocated), {} pending\n  one decision: median {:.1} ms (min {:.1}, max {:.1}; {} runs)\n  adds {} nodes; {} pending fit existing capacity; {} unmet",
            report.nodes,
            report.groups,
            args.fill_pct,
            report.pending,
            report.decision_ms,
            report.min_ms,
            report.max_ms,
            args.runs,
            report.nodes_added,
            report.absorbed,
            report.unmet
        );
    }
    ExitCode::SUCCESS
}
