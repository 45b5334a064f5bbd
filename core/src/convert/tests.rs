//! Tests of every conversion: field paths and messages, round trips, what is not kept.

use super::*;
use berth_proto::GpuRequest;

use crate::model::{Binding, Placement};
use crate::state::{Command, ItemOutcome};
use crate::testing::{apply_checked, gpu_node, spec, submit};

/// A conversion's result with the errors reduced to the message a client reads, so it
/// can be compared.
fn ok<T>(r: Result<T, FieldErrors>) -> Result<T, String> {
    r.map_err(|e| e.one_line())
}

fn message(errors: &FieldErrors) -> String {
    errors.one_line()
}

fn wire_spec() -> pb::SandboxSpec {
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
        network: true,
        labels: HashMap::from([("team".into(), "ml".into())]),
    }
}

#[test]
fn a_valid_spec_round_trips() {
    let wire = wire_spec();
    let spec = spec_from_pb(Some(&wire), "spec").expect("valid");
    assert_eq!(
        spec,
        SandboxSpec {
            tenant: "acme".into(),
            image: "python:3.12".into(),
            command: vec!["python".into(), "-c".into(), "print(1)".into()],
            env: BTreeMap::from([("A".into(), "1".into())]),
            cpu_milli: 2000,
            memory_mib: 4096,
            gpu: Some(GpuRequest::parse(&["H100!:2", "A100-80GB:2"], Some(40_000)).expect("valid")),
            constraints: Constraints {
                providers: vec!["aws".into()],
                regions: vec!["us-east-1".into()],
                node_labels: BTreeMap::from([("pool".into(), "gpu".into())]),
                tolerations: vec![Toleration {
                    key: "dedicated".into(),
                    value: String::new(),
                }],
                capacity_type: Some(CapacityType::Spot),
            },
            priority: 10,
            timeout_ms: 60_000,
            network: true,
            labels: BTreeMap::from([("team".into(), "ml".into())]),
        }
    );
    assert_eq!(spec_to_pb(&spec), wire);

    let sandbox = Sandbox {
        id: SandboxId(7),
        request_id: "req-1".into(),
        spec: spec.clone(),
        state: SandboxState::Pending,
        binding: None,
        pending_reason: Some("no node has 2 free H100".into()),
        created_revision: 3,
        created_ms: 1_000,
        scheduled_ms: None,
        started_ms: None,
        finished_ms: None,
    };
    let out = sandbox_to_pb(&sandbox, 42);
    assert_eq!(out.id, "sbx-0000000007");
    assert_eq!(out.request_id, "req-1");
    assert_eq!(out.revision, 42);
    assert_eq!(out.spec.as_ref(), Some(&wire));
    assert_eq!(
        out.status,
        Some(pb::SandboxStatus {
            state: pb::SandboxState::Pending as i32,
            reason: "no node has 2 free H100".into(),
            created_unix_ms: 1_000,
            ..Default::default()
        })
    );
    // And the wire form reads back to the same spec.
    assert_eq!(ok(spec_from_pb(out.spec.as_ref(), "spec")), Ok(spec));
}

#[test]
fn a_cpu_only_spec_has_no_gpu_request() {
    let mut wire = wire_spec();
    if let Some(r) = wire.resources.as_mut() {
        r.gpu = None;
    }
    wire.constraints = None;
    let spec = spec_from_pb(Some(&wire), "spec").expect("valid");
    assert_eq!(spec.gpu, None);
    assert_eq!(spec.constraints, Constraints::default());
}

#[test]
fn every_mistake_is_named_with_its_full_path_in_field_order() {
    let mut wire = wire_spec();
    wire.resources = Some(pb::Resources {
        cpu_milli: 0,
        memory_mib: 1024,
        gpu: Some(pb::GpuRequest {
            options: vec!["H100:0".into()],
            min_memory_mib: 0,
        }),
    });
    let err = spec_from_pb(Some(&wire), "spec").expect_err("two mistakes");
    assert_eq!(
        message(&err),
        "spec.resources.cpu_milli: 0 is outside 1..=1024000; \
         spec.resources.gpu.options[0]: GPU spec \"H100:0\": the GPU count must be at least 1"
    );

    // More, across the spec: reported in .proto field order whatever the checker.
    wire.tenant = "Bad_Tenant".into();
    wire.priority = 5000;
    if let Some(c) = wire.constraints.as_mut() {
        c.capacity_type = 9;
        c.tolerations[0].key = String::new();
    }
    let err = spec_from_pb(Some(&wire), "req.spec").expect_err("many mistakes");
    assert_eq!(
        message(&err),
        [
            "req.spec.tenant: \"Bad_Tenant\" must be lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit",
            "req.spec.resources.cpu_milli: 0 is outside 1..=1024000",
            "req.spec.resources.gpu.options[0]: GPU spec \"H100:0\": the GPU count must be \
             at least 1",
            "req.spec.constraints.tolerations[0].key: must be set",
            "req.spec.constraints.capacity_type: unknown value 9 (use \
             CAPACITY_TYPE_UNSPECIFIED for either, CAPACITY_TYPE_ON_DEMAND or \
             CAPACITY_TYPE_SPOT)",
            "req.spec.priority: 5000 is outside -1000..=1000",
        ]
        .join("; ")
    );
}

#[test]
fn missing_spec_and_resources_are_named() {
    let err = spec_from_pb(None, "spec").expect_err("no spec");
    assert_eq!(message(&err), "spec: must be set");

    let mut wire = wire_spec();
    wire.resources = None;
    let err = spec_from_pb(Some(&wire), "spec").expect_err("no resources");
    // Only the missing message: not also that its CPU and memory are 0.
    assert_eq!(message(&err), "spec.resources: must be set");
}

#[test]
fn create_request_reports_request_id_and_spec_together() {
    let mut wire = wire_spec();
    wire.tenant = String::new();
    let request = pb::CreateSandboxRequest {
        request_id: String::new(),
        spec: Some(wire),
    };
    let err = create_request_from_pb(&request).expect_err("two mistakes");
    assert_eq!(
        message(&err),
        "request_id: is 0 bytes long, outside 1..=128; spec.tenant: must be set"
    );
    let err = create_request_from_pb(&pb::CreateSandboxRequest {
        request_id: "r".into(),
        spec: None,
    })
    .expect_err("no spec");
    assert_eq!(message(&err), "spec: must be set");
    let (id, spec) = create_request_from_pb(&pb::CreateSandboxRequest {
        request_id: "r".into(),
        spec: Some(wire_spec()),
    })
    .expect("valid");
    assert_eq!(id, "r");
    assert_eq!(spec.tenant, "acme");
}

fn placement(node: &str, epoch: u64, gpus: &[u32], milli: u32) -> Placement {
    Placement {
        node: node.into(),
        epoch,
        option: 0,
        gpu_indices: gpus.to_vec(),
        gpu_milli_per_gpu: milli,
    }
}

fn created(out: &[ItemOutcome]) -> SandboxId {
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
fn busy_node() -> (State, [SandboxId; 3]) {
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

#[test]
fn node_to_pb_lists_gpu_allocations_with_their_sandboxes() {
    let (mut state, [a, b, c]) = busy_node();
    let record = state.node("n1").expect("registered");
    let node = node_to_pb(record, &state);
    assert_eq!(node.status, pb::NodeStatus::Ready as i32);
    assert_eq!(node.epoch, record.epoch);
    assert_eq!(node.cpu_milli_allocated, 3000);
    assert_eq!(node.memory_mib_allocated, 3 * 1024);
    assert_eq!(node.sandboxes, 3);
    assert_eq!(
        node.gpu_allocations,
        [
            pb::GpuAllocation {
                index: 0,
                allocated_milli: 1000,
                sandbox_ids: vec![a.to_string()],
            },
            pb::GpuAllocation {
                index: 1,
                allocated_milli: 750,
                sandbox_ids: vec![b.to_string(), c.to_string()],
            },
            pb::GpuAllocation {
                index: 2,
                allocated_milli: 0,
                sandbox_ids: vec![],
            },
        ]
    );
    // The inventory reads back to the node's spec.
    assert_eq!(
        ok(node_spec_from_pb(node.inventory.as_ref(), "inventory")),
        Ok(record.spec.clone())
    );

    // Once `b` exits, it is off GPU 1 but still shows where it ran.
    let update = status_update_from_pb(
        "n1",
        &pb::SandboxStatusUpdate {
            sandbox_id: b.to_string(),
            state: pb::SandboxState::Exited as i32,
            exit_code: 3,
            reason: String::new(),
            at_unix_ms: 0,
        },
    )
    .expect("valid");
    assert_eq!(
        apply_checked(
            &mut state,
            &Command::UpdateSandboxes {
                items: vec![update]
            },
            20
        ),
        [ItemOutcome::Applied]
    );
    let node = node_to_pb(state.node("n1").expect("registered"), &state);
    assert_eq!(node.gpu_allocations[1].allocated_milli, 250);
    assert_eq!(node.gpu_allocations[1].sandbox_ids, [c.to_string()]);
    assert_eq!(node.sandboxes, 2);

    let exited = state.sandbox(b).expect("kept");
    let out = sandbox_to_pb_with_gpus(exited, state.node("n1").map(|n| &n.spec), state.revision());
    assert_eq!(out.revision, state.revision());
    assert_eq!(
        out.status,
        Some(pb::SandboxStatus {
            state: pb::SandboxState::Exited as i32,
            node_id: "n1".into(),
            gpu_indices: vec![1],
            gpu_uuids: vec!["GPU-n1-1".into()],
            gpu_milli_per_gpu: 500,
            gpu_model: "H100".into(),
            exit_code: 3,
            reason: String::new(),
            created_unix_ms: 11,
            scheduled_unix_ms: 11,
            started_unix_ms: 0,
            finished_unix_ms: 20,
            explanation: None,
        })
    );
    // Without the node, no UUIDs; with another node, none either.
    let bare = sandbox_to_pb(exited, 1);
    assert_eq!(bare.status.map(|s| s.gpu_uuids), Some(vec![]));
    let other = gpu_node("n2", GpuModel::H100, 2);
    let out = sandbox_to_pb_with_gpus(exited, Some(&other), 1);
    assert_eq!(out.status.map(|s| s.gpu_uuids), Some(vec![]));
}

#[test]
fn lost_and_failed_sandboxes_show_their_reason() {
    let (mut state, [a, ..]) = busy_node();
    apply_checked(
        &mut state,
        &Command::SetNodeStatus {
            node: "n1".into(),
            status: NodeStatus::Down,
            reason: "heartbeats stopped".into(),
        },
        30,
    );
    let lost = state.sandbox(a).expect("kept");
    let SandboxState::Lost { reason } = &lost.state else {
        panic!("{:?}", lost.state)
    };
    let status = sandbox_to_pb(lost, 9).status.expect("status");
    assert_eq!(status.state, pb::SandboxState::Lost as i32);
    assert_eq!(&status.reason, reason);
    assert_eq!(status.node_id, "n1");
    assert_eq!(status.finished_unix_ms, 30);
    let node = node_to_pb(state.node("n1").expect("kept"), &state);
    assert_eq!(node.status, pb::NodeStatus::Down as i32);
    assert_eq!(node.status_reason, "heartbeats stopped");

    let mut failed = lost.clone();
    failed.state = SandboxState::Failed {
        reason: "timeout".into(),
    };
    let status = sandbox_to_pb(&failed, 9).status.expect("status");
    assert_eq!(status.state, pb::SandboxState::Failed as i32);
    assert_eq!(status.reason, "timeout");
    assert_eq!(status.exit_code, 0);
}

#[test]
fn state_filters_match_exactly() {
    let running = SandboxState::Running;
    let exited = SandboxState::Exited { code: 1 };
    assert!(sandbox_state_matches(
        pb::SandboxState::Running as i32,
        &running
    ));
    assert!(!sandbox_state_matches(
        pb::SandboxState::Running as i32,
        &exited
    ));
    assert!(sandbox_state_matches(
        pb::SandboxState::Exited as i32,
        &exited
    ));
    assert!(!sandbox_state_matches(
        pb::SandboxState::Unspecified as i32,
        &running
    ));
    assert!(!sandbox_state_matches(99, &running));
    assert!(!sandbox_state_matches(-1, &running));
    assert_eq!(
        sandbox_state_to_pb(&SandboxState::Lost { reason: "x".into() }),
        pb::SandboxState::Lost
    );
    assert!(node_status_matches(
        pb::NodeStatus::Draining as i32,
        NodeStatus::Draining
    ));
    assert!(!node_status_matches(
        pb::NodeStatus::Ready as i32,
        NodeStatus::Cordoned
    ));
    assert!(!node_status_matches(0, NodeStatus::Ready));
    assert!(!node_status_matches(17, NodeStatus::Ready));
    assert_eq!(node_status_to_pb(NodeStatus::Down), pb::NodeStatus::Down);
}

fn wire_inventory() -> pb::NodeInventory {
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
    }
}

#[test]
fn node_inventory_converts_and_keeps_what_the_model_holds() {
    let spec = node_spec_from_pb(Some(&wire_inventory()), "register.inventory").expect("valid");
    assert_eq!(
        spec,
        NodeSpec {
            id: "gpu-1.us-east".into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            instance_type: "p5.48xlarge".into(),
            capacity_type: CapacityType::Spot,
            price_micro_usd_per_hour: 12_345_679,
            labels: BTreeMap::from([("pool".into(), "h100".into())]),
            taints: vec![Taint {
                key: "dedicated".into(),
                value: "ml".into(),
                effect: TaintEffect::PreferNoSchedule,
            }],
            cpu_milli: 190_000,
            memory_mib: 2_000_000,
            gpus: vec![
                GpuDevice {
                    index: 0,
                    uuid: "GPU-abc-0".into(),
                    model: GpuModelName::Known(GpuModel::H100),
                    memory_mib: 81_559,
                    healthy: true,
                    mig_mode: crate::model::MigMode::Disabled,
                    nvlink_peers: vec![1],
                },
                GpuDevice {
                    index: 1,
                    uuid: "GPU-abc-1".into(),
                    model: GpuModelName::Known(GpuModel::H100),
                    memory_mib: 81_559,
                    healthy: false,
                    mig_mode: crate::model::MigMode::Disabled,
                    nvlink_peers: vec![0],
                },
            ],
            agent_address: "10.0.0.5:7071".into(),
            cached_images: vec!["python:3.12".into()],
        }
    );
    let back = node_inventory_to_pb(&spec);
    assert_eq!(back.price_per_hour_usd, 12.345_679);
    assert_eq!(back.gpus[0].model, "H100");
    assert_eq!(back.gpus[0].product_name, "");
    assert_eq!(back.gpus[1].health, pb::GpuHealth::Unhealthy as i32);
    assert_eq!(back.cached_images, ["python:3.12"]);
    assert_eq!(back.gpus[0].mig_mode, pb::MigMode::Disabled as i32);
    assert_eq!(back.gpus[1].nvlink_peers, [0]);
    assert_eq!(ok(node_spec_from_pb(Some(&back), "inventory")), Ok(spec));
}

#[test]
fn mig_mode_nvlink_peers_and_cached_images_are_checked() {
    let mut inv = wire_inventory();
    inv.gpus[0].mig_mode = 9;
    inv.gpus[0].nvlink_peers = vec![1, 0, 7];
    inv.cached_images = (0..=MAX_CACHED_IMAGES)
        .map(|i| format!("img:{i}"))
        .collect();
    let err = node_spec_from_pb(Some(&inv), "register.inventory").expect_err("bad");
    assert_eq!(
        message(&err),
        "register.inventory.gpus[0].nvlink_peers[1]: 0 is not the index of another GPU of this \
         node; register.inventory.gpus[0].nvlink_peers[2]: 7 is not the index of another GPU \
         of this node; register.inventory.gpus[0].mig_mode: unknown value 9; \
         register.inventory.cached_images: 257 images; the limit is 256"
    );
    let mut enabled = wire_inventory();
    enabled.gpus[1].mig_mode = pb::MigMode::Enabled as i32;
    let spec = node_spec_from_pb(Some(&enabled), "inventory").expect("valid");
    assert_eq!(spec.gpus[1].mig_mode, crate::model::MigMode::Enabled);
}

#[test]
fn node_inventory_errors_name_every_field() {
    let err = node_spec_from_pb(None, "register.inventory").expect_err("absent");
    assert_eq!(message(&err), "register.inventory: must be set");

    let mut inv = wire_inventory();
    inv.node_id = "Node_1".into();
    inv.capacity_type = pb::CapacityType::Unspecified as i32;
    inv.price_per_hour_usd = f64::NAN;
    inv.taints[0].effect = 7;
    inv.gpus[1].index = 5;
    inv.gpus[1].uuid = "GPU-abc-0".into();
    inv.gpus[1].product_name = String::new();
    inv.gpus[0].health = pb::GpuHealth::Unspecified as i32;
    inv.cached_images = vec![String::new(); MAX_CACHED_IMAGES + 1];
    let err = node_spec_from_pb(Some(&inv), "inv").expect_err("many mistakes");
    assert_eq!(
        message(&err),
        [
            "inv.node_id: \"Node_1\" must be lowercase letters, digits, '-' and '.', \
             starting and ending with a letter or digit",
            "inv.capacity_type: must be CAPACITY_TYPE_ON_DEMAND or CAPACITY_TYPE_SPOT, \
             not CAPACITY_TYPE_UNSPECIFIED",
            "inv.price_per_hour_usd: NaN must be a finite number in 0..=1000000",
            "inv.taints[0].effect: must be TAINT_EFFECT_NO_SCHEDULE or \
             TAINT_EFFECT_PREFER_NO_SCHEDULE, not unknown value 7",
            "inv.gpus[0].health: must be GPU_HEALTH_HEALTHY or GPU_HEALTH_UNHEALTHY, \
             not GPU_HEALTH_UNSPECIFIED",
            "inv.gpus[1].index: is 5; GPUs must be listed in index order 0..n",
            "inv.gpus[1].uuid: \"GPU-abc-0\" is also the uuid of gpus[0]",
            "inv.gpus[1].model: must be set (or product_name, to resolve it from)",
            "inv.cached_images: 257 images; the limit is 256",
        ]
        .join("; ")
    );
}

#[test]
fn quota_round_trips() {
    let wire = pb::TenantQuota {
        tenant: "acme".into(),
        max_concurrent_sandboxes: 50,
        max_gpus_per_model: HashMap::from([("H100".into(), 8), ("A100-80GB".into(), 0)]),
        max_creates_per_second: 0,
        priority: 0,
    };
    let (tenant, quota) = quota_from_pb(Some(&wire), "quota").expect("valid");
    assert_eq!(tenant, "acme");
    assert_eq!(
        quota,
        TenantQuota {
            max_concurrent_sandboxes: Some(50),
            max_gpu_milli_per_model: BTreeMap::from([
                (GpuModelName::Known(GpuModel::A100_80GB), 0),
                (GpuModelName::Known(GpuModel::H100), 8000),
            ]),
        }
    );
    assert_eq!(quota_to_pb(&tenant, &quota), wire);

    // Aliases resolve to the canonical name; 0 concurrent is unlimited; the fields the
    // model does not keep come back as 0.
    let wire = pb::TenantQuota {
        tenant: "t".into(),
        max_concurrent_sandboxes: 0,
        max_gpus_per_model: HashMap::from([("a10g".into(), 2)]),
        max_creates_per_second: 100,
        priority: 5,
    };
    let (tenant, quota) = quota_from_pb(Some(&wire), "quota").expect("valid");
    assert_eq!(quota.max_concurrent_sandboxes, None);
    assert_eq!(
        quota_to_pb(&tenant, &quota),
        pb::TenantQuota {
            tenant: "t".into(),
            max_concurrent_sandboxes: 0,
            max_gpus_per_model: HashMap::from([("A10".into(), 2)]),
            max_creates_per_second: 0,
            priority: 0,
        }
    );
}

#[test]
fn quota_errors_name_tenant_and_model_keys() {
    let err = quota_from_pb(None, "quota").expect_err("absent");
    assert_eq!(message(&err), "quota: must be set");
    let wire = pb::TenantQuota {
        tenant: String::new(),
        max_concurrent_sandboxes: 1,
        max_gpus_per_model: HashMap::from([
            ("H10".into(), 1),
            ("H100".into(), 1),
            ("h100".into(), 2),
        ]),
        max_creates_per_second: 0,
        priority: 0,
    };
    let err = quota_from_pb(Some(&wire), "quota").expect_err("bad");
    assert_eq!(
        message(&err),
        [
            "quota.tenant: must be set",
            "quota.max_gpus_per_model[\"H10\"]: \"H10\" is not a GPU model of the catalog \
             (T4, L4, A10, L40S, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H200, B200)",
            "quota.max_gpus_per_model[\"h100\"]: \"h100\" and \"H100\" are both the model H100",
        ]
        .join("; ")
    );
}

#[test]
fn status_updates_parse_or_name_their_fields() {
    let update =
        |id: &str, state: pb::SandboxState, code: i32, reason: &str| pb::SandboxStatusUpdate {
            sandbox_id: id.into(),
            state: state as i32,
            exit_code: code,
            reason: reason.into(),
            at_unix_ms: 5,
        };
    assert_eq!(
        ok(status_update_from_pb(
            "n1",
            &update("sbx-0000000012", pb::SandboxState::Running, 0, "")
        )),
        Ok(StatusUpdate {
            sandbox: SandboxId(12),
            node: "n1".into(),
            change: StatusChange::Running,
        })
    );
    assert_eq!(
        ok(status_update_from_pb(
            "n1",
            &update("sbx-0000000012", pb::SandboxState::Exited, 137, "")
        ))
        .map(|u| u.change),
        Ok(StatusChange::Exited { code: 137 })
    );
    assert_eq!(
        ok(status_update_from_pb(
            "n1",
            &update("sbx-0000000012", pb::SandboxState::Failed, 0, "OOM killed")
        ))
        .map(|u| u.change),
        Ok(StatusChange::Failed {
            reason: "OOM killed".into()
        })
    );
    assert_eq!(
        ok(status_update_from_pb(
            "n1",
            &update("sbx-0000000012", pb::SandboxState::Failed, 0, "")
        ))
        .map(|u| u.change),
        Ok(StatusChange::Failed {
            reason: "reported failed by node n1".into()
        })
    );

    let err = status_update_from_pb("n1", &update("12", pb::SandboxState::Lost, 0, ""))
        .expect_err("two mistakes");
    assert_eq!(
        message(&err),
        "sandbox_id: \"12\" is not a sandbox id (sbx-NNNNNNNNNN); \
         state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED or SANDBOX_STATE_FAILED, \
         not SANDBOX_STATE_LOST"
    );
    let mut unknown = update("sbx-x", pb::SandboxState::Running, 0, "");
    unknown.state = 42;
    let err = status_update_from_pb("n1", &unknown).expect_err("two mistakes");
    assert_eq!(
        message(&err),
        "sandbox_id: \"sbx-x\" is not a sandbox id (sbx-NNNNNNNNNN); \
         state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED or SANDBOX_STATE_FAILED, \
         not unknown value 42"
    );
    let err = status_update_from_pb(
        "n1",
        &update("sbx-0000000001", pb::SandboxState::Pending, 0, ""),
    )
    .expect_err("pending is not reportable");
    assert_eq!(
        message(&err),
        "state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED or SANDBOX_STATE_FAILED, \
         not SANDBOX_STATE_PENDING"
    );
}

#[test]
fn bindings_without_a_model_or_gpus_report_empty_fields() {
    let mut cpu_only = Sandbox {
        id: SandboxId(1),
        request_id: "r".into(),
        spec: spec(&[]),
        state: SandboxState::Running,
        binding: Some(Binding {
            placement: placement("n1", 1, &[], 0),
            gpu_model: None,
            bound_revision: 2,
        }),
        pending_reason: Some("stale".into()),
        created_revision: 1,
        created_ms: 1,
        scheduled_ms: Some(2),
        started_ms: Some(3),
        finished_ms: None,
    };
    let status = sandbox_to_pb(&cpu_only, 4).status.expect("status");
    assert_eq!(
        status,
        pb::SandboxStatus {
            state: pb::SandboxState::Running as i32,
            node_id: "n1".into(),
            created_unix_ms: 1,
            scheduled_unix_ms: 2,
            started_unix_ms: 3,
            ..Default::default()
        }
    );
    assert_eq!(
        sandbox_to_pb(&cpu_only, 4)
            .spec
            .and_then(|s| s.resources)
            .map(|r| r.gpu),
        Some(None)
    );
    cpu_only.binding = None;
    assert_eq!(
        sandbox_to_pb(&cpu_only, 4).status.map(|s| s.node_id),
        Some(String::new())
    );
}
