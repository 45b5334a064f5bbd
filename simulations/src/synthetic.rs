//! Synthetic pools and workloads: a multi-cloud GPU fleet (T4 through B200 instance types
//! across providers and regions) and a sandbox mix like an AI-agent platform's (mostly
//! CPU-only and fractional-GPU sandboxes, some single GPUs, a few whole 8-GPU boxes).
//! Seeded, so a benchmark or test sees the same cluster every time.

use std::collections::BTreeMap;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use berth_core::model::{NodeSpec, SandboxSpec};
use berth_proto::gpu::GpuRequest;
use berth_proto::node::CapacityType;
use berth_proto::{GpuModel, GpuModelName};

/// An instance type of the synthetic fleet.
struct InstanceType {
    provider: &'static str,
    name: &'static str,
    gpu: Option<(GpuModel, u32)>,
    cpu_milli: u64,
    memory_mib: u64,
    price_usd_per_hour: f64,
    /// Relative share of the fleet.
    weight: u32,
}

const GIB: u64 = 1024;

const FLEET: &[InstanceType] = &[
    InstanceType {
        provider: "aws",
        name: "c7i.16xlarge",
        gpu: None,
        cpu_milli: 64_000,
        memory_mib: 128 * GIB,
        price_usd_per_hour: 2.86,
        weight: 20,
    },
    InstanceType {
        provider: "aws",
        name: "g4dn.12xlarge",
        gpu: Some((GpuModel::T4, 4)),
        cpu_milli: 48_000,
        memory_mib: 192 * GIB,
        price_usd_per_hour: 3.91,
        weight: 12,
    },
    InstanceType {
        provider: "gcp",
        name: "g2-standard-48",
        gpu: Some((GpuModel::L4, 4)),
        cpu_milli: 48_000,
        memory_mib: 192 * GIB,
        price_usd_per_hour: 4.00,
        weight: 14,
    },
    InstanceType {
        provider: "aws",
        name: "g5.48xlarge",
        gpu: Some((GpuModel::A10, 8)),
        cpu_milli: 192_000,
        memory_mib: 768 * GIB,
        price_usd_per_hour: 16.29,
        weight: 10,
    },
    InstanceType {
        provider: "aws",
        name: "g6e.48xlarge",
        gpu: Some((GpuModel::L40S, 8)),
        cpu_milli: 192_000,
        memory_mib: 1536 * GIB,
        price_usd_per_hour: 30.13,
        weight: 8,
    },
    InstanceType {
        provider: "gcp",
        name: "a2-highgpu-8g",
        gpu: Some((GpuModel::A100_40GB, 8)),
        cpu_milli: 96_000,
        memory_mib: 680 * GIB,
        price_usd_per_hour: 29.39,
        weight: 6,
    },
    InstanceType {
        provider: "gcp",
        name: "a2-ultragpu-8g",
        gpu: Some((GpuModel::A100_80GB, 8)),
        cpu_milli: 96_000,
        memory_mib: 1360 * GIB,
        price_usd_per_hour: 40.22,
        weight: 6,
    },
    InstanceType {
        provider: "coreweave",
        name: "rtxpro6000-8x",
        gpu: Some((GpuModel::RtxPro6000, 8)),
        cpu_milli: 128_000,
        memory_mib: 1024 * GIB,
        price_usd_per_hour: 24.00,
        weight: 4,
    },
    InstanceType {
        provider: "aws",
        name: "p5.48xlarge",
        gpu: Some((GpuModel::H100, 8)),
        cpu_milli: 192_000,
        memory_mib: 2048 * GIB,
        price_usd_per_hour: 98.32,
        weight: 10,
    },
    InstanceType {
        provider: "gcp",
        name: "a3-highgpu-8g",
        gpu: Some((GpuModel::H100, 8)),
        cpu_milli: 208_000,
        memory_mib: 1872 * GIB,
        price_usd_per_hour: 88.25,
        weight: 5,
    },
    InstanceType {
        provider: "aws",
        name: "p5e.48xlarge",
        gpu: Some((GpuModel::H200, 8)),
        cpu_milli: 192_000,
        memory_mib: 2048 * GIB,
        price_usd_per_hour: 110.0,
        weight: 3,
    },
    InstanceType {
        provider: "aws",
        name: "p6-b200.48xlarge",
        gpu: Some((GpuModel::B200, 8)),
        cpu_milli: 192_000,
        memory_mib: 2048 * GIB,
        price_usd_per_hour: 113.9,
        weight: 2,
    },
];

const REGIONS: &[(&str, &[&str])] = &[
    ("aws", &["us-east-1", "us-west-2", "eu-west-1"]),
    ("gcp", &["us-central1", "europe-west4"]),
    ("coreweave", &["us-east-04"]),
];

fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
    let total: u64 = items.iter().map(|i| u64::from(weight(i))).sum();
    let mut x = rng.next_u64() % total.max(1);
    for item in items {
        let w = u64::from(weight(item));
        if x < w {
            return item;
        }
        x -= w;
    }
    &items[items.len() - 1]
}

/// `n` nodes of the synthetic fleet.
pub fn pool(n: usize, seed: u64) -> Vec<NodeSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let instance = pick(&mut rng, FLEET, |t| t.weight);
            let regions = REGIONS
                .iter()
                .find(|(p, _)| *p == instance.provider)
                .map_or(&["local"][..], |(_, r)| r);
            let region = regions[(rng.next_u64() % regions.len() as u64) as usize];
            let id = format!("{}-{}-{i:05}", instance.provider, region);
            let gpus = match instance.gpu {
                Some((model, count)) => NodeSpec::uniform_gpus(
                    &id,
                    &GpuModelName::Known(model),
                    model.info().memory_mib,
                    count,
                ),
                None => Vec::new(),
            };
            let spot = rng.next_u64() % 5 == 0;
            let mut labels = BTreeMap::new();
            labels.insert(
                "berth.dev/instance-type".to_owned(),
                instance.name.to_owned(),
            );
            NodeSpec {
                id,
                provider: instance.provider.into(),
                region: region.into(),
                zone: format!("{region}a"),
                instance_type: instance.name.into(),
                capacity_type: if spot {
                    CapacityType::Spot
                } else {
                    CapacityType::OnDemand
                },
                price_micro_usd_per_hour: (instance.price_usd_per_hour
                    * if spot { 0.4 } else { 1.0 }
                    * 1e6) as u64,
                labels,
                taints: Vec::new(),
                cpu_milli: instance.cpu_milli,
                memory_mib: instance.memory_mib,
                gpus,
                agent_address: String::new(),
                cached_images: Vec::new(),
                runtime: String::new(),
                snapshot_budget_bytes: 0,
            }
        })
        .collect()
}

/// A sandbox shape of the mix, with its relative frequency.
struct Shape {
    cpu_milli: u64,
    memory_mib: u64,
    gpu: &'static [&'static str],
    weight: u32,
}

const MIX: &[Shape] = &[
    Shape {
        cpu_milli: 1000,
        memory_mib: 2 * GIB,
        gpu: &[],
        weight: 30,
    },
    Shape {
        cpu_milli: 2000,
        memory_mib: 4 * GIB,
        gpu: &[],
        weight: 15,
    },
    Shape {
        cpu_milli: 4000,
        memory_mib: 16 * GIB,
        gpu: &[],
        weight: 5,
    },
    Shape {
        cpu_milli: 2000,
        memory_mib: 8 * GIB,
        gpu: &["any:250m"],
        weight: 8,
    },
    Shape {
        cpu_milli: 4000,
        memory_mib: 16 * GIB,
        gpu: &["L4:500m", "T4:500m"],
        weight: 8,
    },
    Shape {
        cpu_milli: 4000,
        memory_mib: 24 * GIB,
        gpu: &["L4", "A10"],
        weight: 8,
    },
    Shape {
        cpu_milli: 8000,
        memory_mib: 64 * GIB,
        gpu: &["L40S"],
        weight: 5,
    },
    Shape {
        cpu_milli: 8000,
        memory_mib: 128 * GIB,
        gpu: &["H100", "A100-80GB"],
        weight: 8,
    },
    Shape {
        cpu_milli: 16_000,
        memory_mib: 256 * GIB,
        gpu: &["H100:2"],
        weight: 4,
    },
    Shape {
        cpu_milli: 32_000,
        memory_mib: 512 * GIB,
        gpu: &["H100:4", "A100-80GB:4"],
        weight: 3,
    },
    Shape {
        cpu_milli: 96_000,
        memory_mib: 1024 * GIB,
        gpu: &["H100!:8"],
        weight: 2,
    },
    Shape {
        cpu_milli: 96_000,
        memory_mib: 1024 * GIB,
        gpu: &["B200:8", "H200:8"],
        weight: 1,
    },
    Shape {
        cpu_milli: 8000,
        memory_mib: 64 * GIB,
        gpu: &["RTX-PRO-6000"],
        weight: 2,
    },
    Shape {
        cpu_milli: 4000,
        memory_mib: 32 * GIB,
        gpu: &["A100-40GB"],
        weight: 1,
    },
];

/// `m` sandboxes of the mix; one in ten is pinned to a provider.
pub fn sandboxes(m: usize, seed: u64) -> Vec<SandboxSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    (0..m)
        .map(|i| {
            let shape = pick(&mut rng, MIX, |s| s.weight);
            let gpu = (!shape.gpu.is_empty())
                .then(|| GpuRequest::parse(shape.gpu, None))
                .and_then(Result::ok);
            let mut spec = SandboxSpec::resources(
                &format!("tenant-{}", i % 50),
                shape.cpu_milli,
                shape.memory_mib,
                gpu,
            );
            if rng.next_u64() % 10 == 0 {
                spec.constraints.providers =
                    vec![["aws", "gcp"][(rng.next_u64() % 2) as usize].to_owned()];
            }
            spec
        })
        .collect()
}
