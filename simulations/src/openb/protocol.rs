//! One seed of the FGD paper's experiment, driven through berth's real placement engine and
//! state machine.
//!
//! 1. Shuffle the pods (seeded); append uniformly drawn clones of the original pods until the
//!    requested GPU reaches 130 % of capacity (the artifact stops at the first clone whose
//!    per-GPU milli would cross the target — reproduced as is); drop random pods if above.
//! 2. Pods arrive one at a time and never leave. Each is placed by the [`Placer`] against the
//!    view, then submitted with its placement to [`State::apply`], which re-checks it; a pod
//!    that fits nowhere is dropped and not retried.
//! 3. After each arrival: arrived % = 100·Σ arrived GPU milli / capacity (failed pods count),
//!    allocation % = 100·allocated milli / capacity. The value "at 100 %" is the mean
//!    allocation over arrivals whose arrived % rounds (half to even) to 100, as the
//!    artifact's analysis scripts compute it.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use berth_core::invariants;
use berth_core::model::NodeSpec;
use berth_core::placement::Placer;
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::{ClusterView, NodeView};
use berth_core::state::{Command, ItemOutcome, State, Submission};

use super::trace::TracePod;

/// Requested GPU the workload is tuned to, as a multiple of capacity.
pub const TUNE_RATIO: f64 = 1.3;
/// Arrived-% buckets of the curve: 0..=130.
pub const CURVE_BUCKETS: usize = 131;

/// What one seed came to (the report's `seeds[]`, without the per-seed curve).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// Unallocated GPU % at 100 % arrived.
    pub unallocated_pct_at_100: f64,
    /// Unallocated GPU % after the last arrival (about 130 %).
    pub unallocated_pct_at_end: f64,
    /// Fragmented GPU % of capacity at 100 % arrived (FGD's measure).
    pub frag_pct_at_100: f64,
    /// Pods that fit nowhere.
    pub pods_failed: u64,

    /// GPU milli of pods that failed before 100 % arrived, by kind ("cpu", "share",
    /// "gpu-1", "gpu-8", … with "+spec" for model-constrained ones).
    pub failed_milli_before_100: std::collections::BTreeMap<String, u64>,
    /// Mean allocation % per arrived-% bucket (`None` where no arrival rounded to it).
    #[serde(skip)]
    pub curve: Vec<Option<f64>>,
}

/// The fixed inputs of a run.
pub struct Experiment<'a> {
    /// Cluster.
    pub nodes: &'a [NodeSpec],
    /// Original pods, sorted by name.
    pub pods: &'a [TracePod],
    /// Placement engine.
    pub placer: &'a Placer,
    /// The workload fragmentation is measured against (reports use it even when the policy
    /// does not).
    pub typical: &'a TypicalWorkload,
    /// Check every invariant of the state after the run (tests turn it on).
    pub check_invariants: bool,
}

impl Experiment<'_> {
    /// Total GPU milli of the cluster.
    pub fn capacity_milli(&self) -> u64 {
        self.nodes.iter().map(|n| n.gpus.len() as u64 * 1000).sum()
    }

    /// The arrival order for a seed: shuffled, then tuned to [`TUNE_RATIO`].
    pub fn workload(&self, rng: &mut ChaCha8Rng) -> Vec<&TracePod> {
        let mut pods: Vec<&TracePod> = self.pods.iter().collect();
        shuffle(&mut pods, rng);
        let target = TUNE_RATIO * self.capacity_milli() as f64;
        let mut total: u64 = pods.iter().map(|p| p.gpu_milli_total()).sum();
        if (total as f64) < target && !self.pods.is_empty() {
            loop {
                let clone = &self.pods[below(rng, self.pods.len())];
                if (total + clone.gpu_milli_per_gpu()) as f64 > target {
                    break;
                }
                total += clone.gpu_milli_total();
                pods.push(clone);
            }
        } else {
            while total as f64 > target && !pods.is_empty() {
                let victim = pods.remove(below(rng, pods.len()));
                total -= victim.gpu_milli_total();
            }
        }
        pods
    }

    /// Runs one seed.
    pub fn run(&self, seed: u64) -> Result<SeedResult, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let workload = self.workload(&mut rng);
        let mut state = State::new();
        for node in self.nodes {
            let out = state.apply(&Command::RegisterNode { spec: node.clone() }, 0);
            if out != [ItemOutcome::Applied] {
                return Err(format!("node {} refused: {out:?}", node.id));
            }
        }
        let mut view = ClusterView::from_state(&state, rng.next_u64());
        let capacity = self.capacity_milli().max(1) as f64;
        // Reported fragmentation is FGD's own measure (no memory), whatever the policy.
        let fragmentation = |n: &NodeView| {
            self.typical
                .node_fragmentation(n, n.cpu_milli_free, None, &n.gpu_milli_free)
        };
        let mut node_frag: Vec<f64> = view.nodes().iter().map(fragmentation).collect();
        let mut frag_total: f64 = node_frag.iter().sum();

        let (mut arrived, mut allocated, mut failed) = (0u64, 0u64, 0u64);
        let mut buckets = vec![(0.0f64, 0u32); CURVE_BUCKETS];
        let mut frag_at_100 = (0.0f64, 0u32);
        let mut failed_before_100 = std::collections::BTreeMap::new();
        let mut placer_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
        for (i, pod) in workload.iter().enumerate() {
            arrived += pod.gpu_milli_total();
            let decision = self.placer.place(&view, &pod.spec, &mut placer_rng);
            match decision.placement {
                Some(placement) => {
                    let item = Submission {
                        request_id: format!("{}#{i}", pod.name),
                        spec: pod.spec.clone(),
                        placement: Some(placement.clone()),
                    };
                    match state
                        .apply(&Command::SubmitSandboxes { items: vec![item] }, i as u64)
                        .as_slice()
                    {
                        [ItemOutcome::Created { bound: true, .. }] => {}
                        other => {
                            return Err(format!(
                                "apply refused the engine's placement of {}: {other:?}",
                                pod.name
                            ));
                        }
                    }
                    view.reserve(&pod.spec, &placement);
                    allocated += pod.gpu_milli_total();
                    if let Some(index) = view.index_of(&placement.node) {
                        let f = fragmentation(view.node(index));
                        frag_total += f - node_frag[index as usize];
                        node_frag[index as usize] = f;
                    }
                }
                None => {
                    failed += 1;
                    if 100.0 * arrived as f64 / capacity < 100.5 {
                        *failed_before_100.entry(pod_kind(pod)).or_default() +=
                            pod.gpu_milli_total().max(1);
                    }
                }
            }
            let arrived_pct = 100.0 * arrived as f64 / capacity;
            let alloc_pct = 100.0 * allocated as f64 / capacity;
            let bucket = arrived_pct.round_ties_even();
            if (0.0..CURVE_BUCKETS as f64).contains(&bucket) {
                let b = &mut buckets[bucket as usize];
                b.0 += alloc_pct;
                b.1 += 1;
                if bucket == 100.0 {
                    frag_at_100.0 += 100.0 * frag_total / capacity;
                    frag_at_100.1 += 1;
                }
            }
        }
        if self.check_invariants {
            if let Some(v) = invariants::check(&state).first() {
                return Err(format!("invariant violated: {v}"));
            }
        }
        let curve: Vec<Option<f64>> = buckets
            .iter()
            .map(|(sum, n)| (*n > 0).then(|| sum / f64::from(*n)))
            .collect();
        // The artifact falls back to the neighbouring buckets when none rounds to 100.
        let at_100 = curve[100]
            .or(curve[99])
            .or(curve[101])
            .ok_or("no arrival near 100 %: is the trace large enough?")?;
        Ok(SeedResult {
            seed,
            unallocated_pct_at_100: 100.0 - at_100,
            unallocated_pct_at_end: 100.0 - 100.0 * allocated as f64 / capacity,
            frag_pct_at_100: if frag_at_100.1 > 0 {
                frag_at_100.0 / f64::from(frag_at_100.1)
            } else {
                f64::NAN
            },
            pods_failed: failed,

            failed_milli_before_100: failed_before_100,
            curve,
        })
    }
}

fn pod_kind(pod: &TracePod) -> String {
    let Some(option) = pod.spec.gpu.as_ref().and_then(|g| g.options.first()) else {
        return "cpu".into();
    };
    let kind = match option.amount {
        berth_proto::gpu::GpuAmount::Shared(_) => "share".to_owned(),
        berth_proto::gpu::GpuAmount::Whole(n) => format!("gpu-{n}"),
    };
    if option.model == berth_proto::gpu::GpuModelSelector::Any {
        kind
    } else {
        format!("{kind}+spec")
    }
}

/// Uniform in `0..n` (n > 0), by rejection so there is no modulo bias.
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    let n = n as u64;
    let zone = u64::MAX - u64::MAX % n;
    loop {
        let x = rng.next_u64();
        if x < zone {
            return (x % n) as usize;
        }
    }
}

fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        items.swap(i, below(rng, i + 1));
    }
}
