//! Nodes: an agent's inventory validated and converted, written back, and a node as the
//! API shows it (allocations per GPU, status).

use super::*;
use crate::model::MigMode;

/// Fields of `NodeInventory` in .proto order.
const INVENTORY_FIELDS: &[&str] = &[
    "node_id",
    "provider",
    "region",
    "zone",
    "instance_type",
    "capacity_type",
    "price_per_hour_usd",
    "labels",
    "taints",
    "cpu_milli",
    "memory_mib",
    "gpus",
    "cached_images",
    "driver_version",
    "cuda_version",
    "inventory_source",
    "agent_address",
    "runtime",
    "snapshot_budget_bytes",
];

/// Validates and converts an agent's inventory (errors: `INVALID_ARGUMENT` naming every bad
/// field under `field`, e.g. `"register.inventory.gpus[1].uuid: must be set"`), including
/// everything [`NodeSpec::validate`] checks.
///
/// Rules: `capacity_type` must be ON_DEMAND or SPOT; `price_per_hour_usd` finite in
/// 0..=[`MAX_PRICE_PER_HOUR_USD`] (kept as micro-dollars, rounded); each taint needs a key
/// and an effect NO_SCHEDULE or PREFER_NO_SCHEDULE; each GPU needs a unique `uuid`, a
/// `model` (resolved through the catalog; when empty, `product_name` is used instead) and
/// `health` HEALTHY or UNHEALTHY; at most [`MAX_CACHED_IMAGES`] cached images.
///
/// Kept and written back by [`node_inventory_to_pb`]: each GPU's `mig_mode` (an unknown
/// value is an error) and `nvlink_peers` (each must be the index of another GPU of the
/// node), and the node's `cached_images`.
///
/// Not kept by the model (so [`node_to_pb`] reports them empty): GPU `product_name`,
/// `health_reason`, `compute_capability`; node `driver_version`, `cuda_version`,
/// `inventory_source`.
pub fn node_spec_from_pb(
    inv: Option<&pb::NodeInventory>,
    field: &str,
) -> Result<NodeSpec, FieldErrors> {
    let inv = inv.ok_or_else(|| missing(field))?;
    let mut conversion = Validator::new();

    let capacity_type = match pb::CapacityType::try_from(inv.capacity_type) {
        Ok(pb::CapacityType::OnDemand) => CapacityType::OnDemand,
        Ok(pb::CapacityType::Spot) => CapacityType::Spot,
        Ok(pb::CapacityType::Unspecified) | Err(_) => {
            conversion.error(
                "capacity_type",
                format!(
                    "must be CAPACITY_TYPE_ON_DEMAND or CAPACITY_TYPE_SPOT, not {}",
                    enum_value(inv.capacity_type, pb::CapacityType::as_str_name)
                ),
            );
            CapacityType::OnDemand
        }
    };

    let price = inv.price_per_hour_usd;
    let price_micro_usd_per_hour =
        if price.is_finite() && (0.0..=MAX_PRICE_PER_HOUR_USD).contains(&price) {
            // At most 1e12 micro-dollars: exact in an f64 and far inside a u64.
            (price * 1_000_000.0).round() as u64
        } else {
            conversion.error(
                "price_per_hour_usd",
                format!("{price} must be a finite number in 0..={MAX_PRICE_PER_HOUR_USD}"),
            );
            0
        };

    let mut taints = Vec::with_capacity(inv.taints.len());
    for (i, t) in inv.taints.iter().enumerate() {
        if t.key.is_empty() {
            conversion.error(&format!("taints[{i}].key"), "must be set");
        }
        let effect = match pb::TaintEffect::try_from(t.effect) {
            Ok(pb::TaintEffect::NoSchedule) => TaintEffect::NoSchedule,
            Ok(pb::TaintEffect::PreferNoSchedule) => TaintEffect::PreferNoSchedule,
            Ok(pb::TaintEffect::Unspecified) | Err(_) => {
                conversion.error(
                    &format!("taints[{i}].effect"),
                    format!(
                        "must be TAINT_EFFECT_NO_SCHEDULE or TAINT_EFFECT_PREFER_NO_SCHEDULE, \
                         not {}",
                        enum_value(t.effect, pb::TaintEffect::as_str_name)
                    ),
                );
                TaintEffect::NoSchedule
            }
        };
        taints.push(Taint {
            key: t.key.clone(),
            value: t.value.clone(),
            effect,
        });
    }

    let mut gpus = Vec::with_capacity(inv.gpus.len());
    let mut uuids: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, g) in inv.gpus.iter().enumerate() {
        if g.uuid.is_empty() {
            conversion.error(&format!("gpus[{i}].uuid"), "must be set");
        } else if let Some(first) = uuids.insert(&g.uuid, i) {
            conversion.error(
                &format!("gpus[{i}].uuid"),
                format!("{:?} is also the uuid of gpus[{first}]", g.uuid),
            );
        }
        let model = if !g.model.trim().is_empty() {
            GpuModelName::resolve(&g.model)
        } else if !g.product_name.trim().is_empty() {
            GpuModelName::from_nvml_product_name(&g.product_name)
        } else {
            conversion.error(
                &format!("gpus[{i}].model"),
                "must be set (or product_name, to resolve it from)",
            );
            GpuModelName::Other(String::new())
        };
        let healthy = match pb::GpuHealth::try_from(g.health) {
            Ok(pb::GpuHealth::Healthy) => true,
            Ok(pb::GpuHealth::Unhealthy) => false,
            Ok(pb::GpuHealth::Unspecified) | Err(_) => {
                conversion.error(
                    &format!("gpus[{i}].health"),
                    format!(
                        "must be GPU_HEALTH_HEALTHY or GPU_HEALTH_UNHEALTHY, not {}",
                        enum_value(g.health, pb::GpuHealth::as_str_name)
                    ),
                );
                false
            }
        };
        gpus.push(GpuDevice {
            index: g.index,
            uuid: g.uuid.clone(),
            model,
            memory_mib: g.memory_mib,
            healthy,
            mig_mode: read_mig_mode(g.mig_mode, i, &mut conversion),
            nvlink_peers: g.nvlink_peers.clone(),
        });
    }

    let spec = NodeSpec {
        id: inv.node_id.clone(),
        provider: inv.provider.clone(),
        region: inv.region.clone(),
        zone: inv.zone.clone(),
        instance_type: inv.instance_type.clone(),
        capacity_type,
        price_micro_usd_per_hour,
        labels: btree(&inv.labels),
        taints,
        cpu_milli: inv.cpu_milli,
        memory_mib: inv.memory_mib,
        gpus,
        agent_address: inv.agent_address.clone(),
        cached_images: inv.cached_images.clone(),
        runtime: inv.runtime.clone(),
        snapshot_budget_bytes: inv.snapshot_budget_bytes,
    };
    let mut problems = Validator::new();
    spec.validate(&mut problems);
    for e in problems.errors_mut() {
        // The model calls it `id`; the wire, `node_id`.
        if e.field == "id" {
            e.field = "node_id".into();
        }
    }
    problems.absorb(conversion);
    problems.sort_by_fields(INVENTORY_FIELDS);
    problems.finish_under(field)?;
    Ok(spec)
}

/// A node's inventory on the wire, as far as the model keeps it (see
/// [`node_spec_from_pb`] for what is not kept; those fields are empty/UNSPECIFIED).
pub fn node_inventory_to_pb(spec: &NodeSpec) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: spec.id.clone(),
        provider: spec.provider.clone(),
        region: spec.region.clone(),
        zone: spec.zone.clone(),
        instance_type: spec.instance_type.clone(),
        capacity_type: capacity_type_to_pb(spec.capacity_type) as i32,
        price_per_hour_usd: spec.price_micro_usd_per_hour as f64 / 1_000_000.0,
        labels: hash(&spec.labels),
        taints: spec
            .taints
            .iter()
            .map(|t| pb::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: taint_effect_to_pb(t.effect) as i32,
            })
            .collect(),
        cpu_milli: spec.cpu_milli,
        memory_mib: spec.memory_mib,
        gpus: spec
            .gpus
            .iter()
            .map(|g| pb::Gpu {
                index: g.index,
                uuid: g.uuid.clone(),
                model: g.model.as_str().to_owned(),
                memory_mib: g.memory_mib,
                health: if g.healthy {
                    pb::GpuHealth::Healthy
                } else {
                    pb::GpuHealth::Unhealthy
                } as i32,
                mig_mode: mig_mode_to_pb(g.mig_mode) as i32,
                nvlink_peers: g.nvlink_peers.clone(),
                ..Default::default()
            })
            .collect(),
        cached_images: spec.cached_images.clone(),
        agent_address: spec.agent_address.clone(),
        runtime: spec.runtime.clone(),
        snapshot_budget_bytes: spec.snapshot_budget_bytes,
        ..Default::default()
    }
}

/// A node as the API shows it: inventory, status and reason, epoch, CPU/memory allocated,
/// and one `GpuAllocation` per GPU of the inventory (in inventory order) with the
/// milli-GPU allocated and the ids of the Scheduled/Running sandboxes bound to it, in id
/// order. `last_heartbeat_unix_ms` is 0: liveness is not in the replicated state, so the
/// caller fills it from the leader's own tracking if it has it.
pub fn node_to_pb(record: &NodeRecord, state: &State) -> pb::Node {
    let mut by_gpu: BTreeMap<u32, Vec<SandboxId>> = BTreeMap::new();
    for id in &record.sandboxes {
        let Some(binding) = state.sandbox(*id).and_then(|s| s.binding.as_ref()) else {
            continue;
        };
        if binding.placement.node != record.spec.id {
            continue;
        }
        // A set: a GPU listed twice in a placement still names the sandbox once.
        let indices: BTreeSet<u32> = binding.placement.gpu_indices.iter().copied().collect();
        for index in indices {
            by_gpu.entry(index).or_default().push(*id);
        }
    }
    let gpu_allocations = record
        .spec
        .gpus
        .iter()
        .enumerate()
        .map(|(position, gpu)| pb::GpuAllocation {
            index: gpu.index,
            allocated_milli: record
                .gpu_milli_allocated
                .get(position)
                .copied()
                .unwrap_or(0),
            sandbox_ids: by_gpu
                .get(&gpu.index)
                .map(|ids| ids.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        })
        .collect();
    pb::Node {
        inventory: Some(node_inventory_to_pb(&record.spec)),
        status: node_status_to_pb(record.status) as i32,
        epoch: record.epoch,
        cpu_milli_allocated: record.cpu_milli_allocated,
        memory_mib_allocated: record.memory_mib_allocated,
        gpu_allocations,
        sandboxes: u32::try_from(record.sandboxes.len()).unwrap_or(u32::MAX),
        last_heartbeat_unix_ms: 0,
        status_reason: record.status_reason.clone(),
    }
}

/// A node status on the wire.
pub fn node_status_to_pb(s: NodeStatus) -> pb::NodeStatus {
    match s {
        NodeStatus::Ready => pb::NodeStatus::Ready,
        NodeStatus::Cordoned => pb::NodeStatus::Cordoned,
        NodeStatus::Draining => pb::NodeStatus::Draining,
        NodeStatus::Down => pb::NodeStatus::Down,
    }
}

/// Whether a node status matches a `ListNodesRequest.statuses` value (raw `i32`).
/// `UNSPECIFIED` and unknown values match nothing.
pub fn node_status_matches(filter: i32, s: NodeStatus) -> bool {
    pb::NodeStatus::try_from(filter)
        .is_ok_and(|f| f != pb::NodeStatus::Unspecified && f == node_status_to_pb(s))
}

/// A GPU's MIG mode from the wire; an unknown value is a problem of `gpus[i].mig_mode`.
fn read_mig_mode(value: i32, i: usize, problems: &mut Validator) -> MigMode {
    match pb::MigMode::try_from(value) {
        Ok(pb::MigMode::Unspecified) => MigMode::Unknown,
        Ok(pb::MigMode::Disabled) => MigMode::Disabled,
        Ok(pb::MigMode::Enabled) => MigMode::Enabled,
        Ok(pb::MigMode::Unsupported) => MigMode::Unsupported,
        Err(_) => {
            problems.error(
                &format!("gpus[{i}].mig_mode"),
                format!("unknown value {value}"),
            );
            MigMode::Unknown
        }
    }
}

/// A MIG mode on the wire.
pub fn mig_mode_to_pb(m: MigMode) -> pb::MigMode {
    match m {
        MigMode::Unknown => pb::MigMode::Unspecified,
        MigMode::Disabled => pb::MigMode::Disabled,
        MigMode::Enabled => pb::MigMode::Enabled,
        MigMode::Unsupported => pb::MigMode::Unsupported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::fixtures::*;

    use crate::state::{Command, ItemOutcome};
    use crate::testing::{apply_checked, gpu_node};

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
                ..Default::default()
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
        let out =
            sandbox_to_pb_with_gpus(exited, state.node("n1").map(|n| &n.spec), state.revision());
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
                usage: None,
                pool: String::new(),
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
                runtime: String::new(),
                snapshot_budget_bytes: 0,
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
}
