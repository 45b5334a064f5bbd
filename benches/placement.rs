//! Placement decision latency on the synthetic multi-cloud pool, half full — the figure
//! DESIGN.md targets (p99 ≤ 50 µs per sandbox at 10,000 nodes). `berth bench place` prints
//! the same measurement with percentiles.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_scheduler::config::PolicyName;
use berth_scheduler::placement::fragmentation::TypicalWorkload;
use berth_scheduler::placement::view::ClusterView;
use berth_scheduler::placement::{DEFAULT_CANDIDATE_LIMIT, Placer, PlacerConfig};
use berth_scheduler::state::{Command, State};
use berth_sim::synthetic;

/// A view of `nodes` synthetic nodes filled to about half their GPUs, and the engine.
fn half_full(
    nodes: usize,
    policy: PolicyName,
) -> (
    ClusterView,
    Placer,
    Vec<berth_scheduler::model::SandboxSpec>,
) {
    let mut state = State::new();
    for node in synthetic::pool(nodes, 1) {
        state.apply(&Command::RegisterNode { spec: node }, 0);
    }
    let mut view = ClusterView::from_state(&state, 1);
    let mix = synthetic::sandboxes(4096, 2);
    let placer = Placer::new(
        PlacerConfig {
            policy,
            allow_gpu_upgrade: true,
            candidate_limit: Some(DEFAULT_CANDIDATE_LIMIT),
            ..PlacerConfig::default()
        },
        TypicalWorkload::from_specs(&mix),
    );
    let capacity: u64 = view
        .nodes()
        .iter()
        .map(|n| n.spec.gpus.len() as u64 * 1000)
        .sum();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut filled = 0;
    for spec in synthetic::sandboxes(nodes * 40, 3) {
        if filled >= capacity / 2 {
            break;
        }
        if let Some(p) = placer.place(&view, &spec, &mut rng).placement {
            filled += u64::from(p.gpu_milli_per_gpu) * p.gpu_indices.len() as u64;
            view.reserve(&spec, &p);
        }
    }
    (view, placer, mix)
}

fn place_one(c: &mut Criterion) {
    let mut group = c.benchmark_group("place_one_sandbox");
    for nodes in [1_000, 10_000] {
        for policy in [PolicyName::Berth, PolicyName::Fgd] {
            let (view, placer, mix) = half_full(nodes, policy);
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let mut i = 0;
            group.bench_with_input(BenchmarkId::new(policy.as_str(), nodes), &nodes, |b, _| {
                b.iter(|| {
                    i = (i + 1) % mix.len();
                    black_box(placer.place(&view, &mix[i], &mut rng))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, place_one);
criterion_main!(benches);
