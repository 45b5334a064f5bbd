//! GPU fragmentation as the FGD paper measures it (Weng et al., USENIX ATC '23), against a
//! "typical workload": the most common sandbox shapes and their frequencies.
//!
//! For node `n` with free milli `g_i` per GPU and a shape `m`:
//! - `F_n(m) = Σ g_i · [g_i < milli_m]` when `m` fits on `n` (model, GPU count, CPU);
//! - `F_n(m) = Σ g_i` otherwise, and for CPU-only shapes.
//!
//! `F_n = Σ_m p_m · F_n(m)`. Memory plays no part, as in the paper's artifact.

use std::collections::BTreeMap;

use berth_proto::GpuModelName;
use berth_proto::gpu::{GpuModelSelector, GpuOption};

use super::view::NodeView;
use crate::model::SandboxSpec;

/// Fraction of sandboxes the typical shapes must cover.
pub const TYPICAL_COVERAGE: f64 = 0.95;
/// Most shapes kept, whatever the coverage (bounds the cost of one frag evaluation).
pub const MAX_TYPICAL_SHAPES: usize = 256;

/// One sandbox shape: what fragmentation is measured against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shape {
    /// CPU.
    pub cpu_milli: u64,
    /// Milli per GPU (1000 for whole GPUs; 0 for CPU-only).
    pub gpu_milli: u32,
    /// GPUs.
    pub gpu_count: u32,
    /// Accepted models; `None` = any.
    pub models: Option<Vec<GpuModelName>>,
}

impl Shape {
    /// The shape of a spec's first (preferred) GPU option.
    pub fn of(spec: &SandboxSpec) -> Shape {
        let option: Option<&GpuOption> = spec.gpu.as_ref().and_then(|g| g.options.first());
        match option {
            None => Shape {
                cpu_milli: spec.cpu_milli,
                gpu_milli: 0,
                gpu_count: 0,
                models: None,
            },
            Some(option) => Shape {
                cpu_milli: spec.cpu_milli,
                gpu_milli: option.amount.milli_per_gpu(),
                gpu_count: option.amount.gpu_count(),
                models: match &option.model {
                    GpuModelSelector::Any => None,
                    selector => Some(selector.models().to_vec()),
                },
            },
        }
    }

    fn accepts(&self, model: Option<&GpuModelName>) -> bool {
        match (&self.models, model) {
            (None, _) => true,
            (Some(models), Some(model)) => models.contains(model),
            (Some(_), None) => false,
        }
    }
}

/// Shapes and their probabilities.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypicalWorkload {
    /// (shape, probability); probabilities sum to 1.
    pub shapes: Vec<(Shape, f64)>,
    /// Mean memory of each shape's sandboxes (same order as `shapes`).
    pub memory_mib: Vec<u64>,
}

impl TypicalWorkload {
    /// The most common shapes of `specs` until they cover [`TYPICAL_COVERAGE`] of them
    /// (the shape that crosses the threshold is kept), renormalised. Equal counts are
    /// ordered larger-first (CPU, then milli, count, models), as the FGD artifact does.
    pub fn from_specs<'a>(specs: impl IntoIterator<Item = &'a SandboxSpec>) -> TypicalWorkload {
        let mut counts: BTreeMap<Shape, u64> = BTreeMap::new();
        let mut memory: BTreeMap<Shape, u64> = BTreeMap::new();
        for spec in specs {
            let shape = Shape::of(spec);
            *memory.entry(shape.clone()).or_default() += spec.memory_mib;
            *counts.entry(shape).or_default() += 1;
        }
        let mut workload = TypicalWorkload::from_counts(counts.clone());
        workload.memory_mib = workload
            .shapes
            .iter()
            .map(|(shape, _)| {
                memory.get(shape).copied().unwrap_or(0)
                    / counts.get(shape).copied().unwrap_or(1).max(1)
            })
            .collect();
        workload
    }

    /// As [`TypicalWorkload::from_specs`], from counted shapes.
    pub fn from_counts(counts: BTreeMap<Shape, u64>) -> TypicalWorkload {
        let total: u64 = counts.values().sum();
        if total == 0 {
            return TypicalWorkload::default();
        }
        let mut sorted: Vec<(Shape, u64)> = counts.into_iter().collect();
        sorted.sort_by(|(a, ca), (b, cb)| cb.cmp(ca).then_with(|| b.cmp(a)));
        let mut kept = Vec::new();
        let mut covered = 0u64;
        for (shape, count) in sorted {
            if covered as f64 >= TYPICAL_COVERAGE * total as f64 || kept.len() == MAX_TYPICAL_SHAPES
            {
                break;
            }
            covered += count;
            kept.push((shape, count));
        }
        TypicalWorkload {
            shapes: kept
                .into_iter()
                .map(|(s, c)| (s, c as f64 / covered as f64))
                .collect(),
            memory_mib: Vec::new(),
        }
    }

    /// `F_n` in milli-GPU for a node whose free resources are `cpu_free` and `gpu_free`.
    /// With `memory_free`, a shape whose mean memory does not fit counts every free GPU as a
    /// fragment (berth's extension); without, memory plays no part (FGD's measure).
    pub fn node_fragmentation(
        &self,
        node: &NodeView,
        cpu_free: u64,
        memory_free: Option<u64>,
        gpu_free: &[u32],
    ) -> f64 {
        let total: u64 = gpu_free.iter().map(|g| u64::from(*g)).sum();
        if total == 0 {
            return 0.0;
        }
        let mut frag = 0.0;
        for (i, (shape, p)) in self.shapes.iter().enumerate() {
            let memory_fits = match (memory_free, self.memory_mib.get(i)) {
                (Some(free), Some(needed)) => *needed <= free,
                _ => true,
            };
            let f = if memory_fits {
                shape_fragmentation(shape, node.gpu_model.as_ref(), cpu_free, gpu_free, total)
            } else {
                total
            };
            frag += p * f as f64;
        }
        frag
    }
}

/// `F_n(m)` for one shape.
fn shape_fragmentation(
    shape: &Shape,
    model: Option<&GpuModelName>,
    cpu_free: u64,
    gpu_free: &[u32],
    total: u64,
) -> u64 {
    if shape.gpu_milli == 0 || !shape.accepts(model) {
        return total;
    }
    let fitting = gpu_free.iter().filter(|g| **g >= shape.gpu_milli).count() as u32;
    if fitting >= shape.gpu_count && cpu_free >= shape.cpu_milli {
        gpu_free
            .iter()
            .filter(|g| **g < shape.gpu_milli)
            .map(|g| u64::from(*g))
            .sum()
    } else {
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use crate::model::NodeSpec;

    fn node(model: &str, gpus: u32) -> NodeView {
        let model = GpuModelName::resolve(model);
        let spec = NodeSpec::simple(
            "n",
            64_000,
            256_000,
            NodeSpec::uniform_gpus("n", &model, 16_000, gpus),
        );
        NodeView {
            spec: Arc::new(spec),
            epoch: 1,
            ready: true,
            cpu_milli_free: 64_000,
            memory_mib_free: 256_000,
            gpu_milli_free: vec![1000; gpus as usize],
            gpu_model: Some(model),
            rank: 0,
        }
    }

    fn shape(cpu: u64, milli: u32, count: u32, models: Option<&[&str]>) -> Shape {
        Shape {
            cpu_milli: cpu,
            gpu_milli: milli,
            gpu_count: count,
            models: models.map(|m| m.iter().map(|s| GpuModelName::resolve(s)).collect()),
        }
    }

    #[test]
    fn fragmentation_follows_the_paper() {
        let workload = TypicalWorkload {
            shapes: vec![
                (shape(4000, 500, 1, None), 0.5),
                (shape(8000, 1000, 2, None), 0.25),
                (shape(2000, 0, 0, None), 0.25),
            ],
            memory_mib: Vec::new(),
        };
        let n = node("T4", 2);
        // Free [1000, 300]: the half-GPU shape fits (300 is a fragment), the 2-GPU shape does
        // not (everything is a fragment), the CPU shape counts everything.
        let frag = workload.node_fragmentation(&n, 64_000, None, &[1000, 300]);
        assert!(
            (frag - (0.5 * 300.0 + 0.25 * 1300.0 + 0.25 * 1300.0)).abs() < 1e-9,
            "{frag}"
        );
        // No CPU left: nothing fits, all of it is a fragment.
        assert!((workload.node_fragmentation(&n, 0, None, &[1000, 300]) - 1300.0).abs() < 1e-9);
        // A model constraint that excludes the node makes all of it a fragment too.
        let pinned = TypicalWorkload {
            shapes: vec![(shape(1000, 500, 1, Some(&["V100M16"])), 1.0)],
            memory_mib: Vec::new(),
        };
        assert!((pinned.node_fragmentation(&n, 64_000, None, &[1000, 300]) - 1300.0).abs() < 1e-9);
        // With memory: a shape whose memory does not fit counts every free GPU.
        let memory = TypicalWorkload {
            shapes: vec![(shape(1000, 500, 1, None), 1.0)],
            memory_mib: vec![300_000],
        };
        assert!(
            (memory.node_fragmentation(&n, 64_000, Some(512_000), &[1000, 300]) - 300.0).abs()
                < 1e-9
        );
        assert!(
            (memory.node_fragmentation(&n, 64_000, Some(100_000), &[1000, 300]) - 1300.0).abs()
                < 1e-9
        );
    }

    #[test]
    fn typical_shapes_cover_95_percent_and_renormalise() {
        let mut counts = BTreeMap::new();
        counts.insert(shape(1000, 0, 0, None), 90);
        counts.insert(shape(1000, 1000, 1, None), 6);
        counts.insert(shape(2000, 1000, 1, None), 4);
        let workload = TypicalWorkload::from_counts(counts);
        assert_eq!(workload.shapes.len(), 2);
        assert!((workload.shapes[0].1 - 90.0 / 96.0).abs() < 1e-12);
        let sum: f64 = workload.shapes.iter().map(|(_, p)| p).sum();
        assert!((sum - 1.0).abs() < 1e-12);
    }
}
