//! Fixtures shared by the conversions' tests: wire messages, a busy node, result helpers.

use super::*;
use crate::state::{Command, ItemOutcome};
use crate::testing::{apply_checked, gpu_node, placement, spec, submit};

/// A conversion's result with the errors reduced to the message a client reads, so it
/// can be compared.
pub(super) fn ok<T>(r: Result<T, FieldErrors>) -> Result<T, String> {
    r.map_err(|e| e.one_line())
}

pub(super) fn message(errors: &FieldErrors) -> String {
    errors.one_line()
}

pub(super) fn wire_spec() -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "acme".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "-c".into(), "print(1)".into()],
        env: HashMap::from([("A".into(), "1".into())]),
        resources: Some(pb::Resources {
            cpu_milli: 2000,
            memory_mib: 4096,
            gpu: Some(pb::GpuRequest {
                options: vec!["H100!:2".into(), "A100-80GB:2".into()],
                min_memory_mib: 40_000,
            }),
        }),
        constraints: Some(pb::PlacementConstraints {
            providers: vec!["aws".into()],
            regions: vec!["us-east-1".into()],
            node_labels: HashMap::from([("pool".into(), "gpu".into())]),
            tolerations: vec![pb::Toleration {
                key: "dedicated".into(),
                value: String::new(),
            }],
            capacity_type: pb::CapacityType::Spot as i32,
        }),
        priority: 10,
        timeout_ms: 60_000,
        network: Some(pb::NetworkPolicy {
            mode: pb::NetworkMode::EgressAll as i32,
            allow: vec![],
        }),
        labels: HashMap::from([("team".into(), "ml".into())]),
        keep_alive: true,
        idle_timeout_ms: 30_000,
        auto_pause_idle_ms: 0,
        auto_resume: false,
    }
}

pub(super) fn created(out: &[ItemOutcome]) -> SandboxId {
    match out {
        [
            ItemOutcome::Created {
                id, bound: true, ..
            },
        ] => *id,
        other => panic!("expected one bound Created, got {other:?}"),
    }
}

/// A node "n1" with 3 H100s: `a` holds GPU 0 whole; `b` (500m) and `c` (250m) share GPU 1.
pub(super) fn busy_node() -> (State, [SandboxId; 3]) {
    let mut state = State::new();
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", GpuModel::H100, 3),
        },
        0,
    );
    let epoch = state.node("n1").expect("registered").epoch;
    let a = created(&apply_checked(
        &mut state,
        &submit(
            "a",
            spec(&["H100"]),
            Some(placement("n1", epoch, &[0], 1000)),
        ),
        10,
    ));
    let b = created(&apply_checked(
        &mut state,
        &submit(
            "b",
            spec(&["H100:500m"]),
            Some(placement("n1", epoch, &[1], 500)),
        ),
        11,
    ));
    let c = created(&apply_checked(
        &mut state,
        &submit(
            "c",
            spec(&["H100:250m"]),
            Some(placement("n1", epoch, &[1], 250)),
        ),
        12,
    ));
    (state, [a, b, c])
}

pub(super) fn wire_inventory() -> pb::NodeInventory {
    let gpu = |index: u32, health: pb::GpuHealth| pb::Gpu {
        index,
        uuid: format!("GPU-abc-{index}"),
        model: String::new(),
        product_name: "NVIDIA H100 80GB HBM3".into(),
        memory_mib: 81_559,
        mig_mode: pb::MigMode::Disabled as i32,
        health: health as i32,
        health_reason: String::new(),
        compute_capability: "9.0".into(),
        nvlink_peers: vec![1 - index],
    };
    pb::NodeInventory {
        node_id: "gpu-1.us-east".into(),
        provider: "aws".into(),
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        instance_type: "p5.48xlarge".into(),
        capacity_type: pb::CapacityType::Spot as i32,
        price_per_hour_usd: 12.345_678_9,
        labels: HashMap::from([("pool".into(), "h100".into())]),
        taints: vec![pb::Taint {
            key: "dedicated".into(),
            value: "ml".into(),
            effect: pb::TaintEffect::PreferNoSchedule as i32,
        }],
        cpu_milli: 190_000,
        memory_mib: 2_000_000,
        gpus: vec![
            gpu(0, pb::GpuHealth::Healthy),
            gpu(1, pb::GpuHealth::Unhealthy),
        ],
        cached_images: vec!["python:3.12".into()],
        driver_version: "550.54".into(),
        cuda_version: "12.4".into(),
        inventory_source: "nvml".into(),
        agent_address: "10.0.0.5:7071".into(),
        runtime: String::new(),
        snapshot_budget_bytes: 0,
    }
}
