//! Conversions between the `berth.v1` wire messages and the scheduler's model, for the gRPC
//! handlers, the autoscaler and the CLI.
//!
//! Reading from the wire validates as it converts and collects every problem before
//! answering: the [`FieldErrors`] (which the service layer turns into one `INVALID_ARGUMENT`) list each bad field with
//! its full path (`spec.resources.cpu_milli: ...; spec.resources.gpu.options[0]: ...`), in
//! the order the fields are declared in the .proto. Bounds come from the model's own
//! `validate` methods, so the API and `State::apply` agree on what is acceptable.
//!
//! Writing to the wire never fails. Model fields the wire has no place for, and wire fields
//! the model does not keep, are listed on each function.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_proto::convert::{gpu_request_from_pb, gpu_request_to_pb};
use berth_proto::node::{CapacityType, TaintEffect};
use berth_proto::pb::v1 as pb;
use berth_proto::{FieldErrors, GpuModel, GpuModelName, Validator};

use crate::model::{
    Constraints, GpuDevice, NodeSpec, NodeStatus, Sandbox, SandboxId, SandboxSpec, SandboxState,
    Taint, TenantQuota, Toleration, limits,
};
use crate::state::{NodeRecord, State, StatusChange, StatusUpdate};

/// Most images a node may report as cached (`types.proto`).
pub const MAX_CACHED_IMAGES: usize = 256;

/// Highest accepted node price, in US dollars per hour.
pub const MAX_PRICE_PER_HOUR_USD: f64 = 1_000_000.0;

// ---------------------------------------------------------------------------------------
// Collecting problems

/// The error for a message that is absent.
fn missing(field: &str) -> FieldErrors {
    FieldErrors::missing(field)
}

/// How an enum value reads in an error: its .proto name, or the number when unknown.
fn enum_value<E: TryFrom<i32>>(value: i32, name: impl Fn(&E) -> &'static str) -> String {
    E::try_from(value).map_or_else(
        |_| format!("unknown value {value}"),
        |e| name(&e).to_owned(),
    )
}

fn btree(map: &HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn hash(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---------------------------------------------------------------------------------------
// Sandbox specs

/// Fields of `SandboxSpec` in .proto order.
const SPEC_FIELDS: &[&str] = &[
    "tenant",
    "image",
    "command",
    "env",
    "resources",
    "constraints",
    "priority",
    "timeout_ms",
    "network",
    "labels",
];

/// Validates and converts a client's spec. Errors: `INVALID_ARGUMENT` whose message names
/// every bad field with its full path under `field` (`"spec"`), e.g.
/// `"spec.resources.cpu_milli: 0 is outside 1..=1024000; spec.resources.gpu.options[0]: ..."`.
///
/// Beyond [`SandboxSpec::validate`]: `resources` must be present, the GPU request must parse
/// (a present `gpu` needs at least one option; omit it for CPU-only), each toleration needs a
/// key, and `constraints.capacity_type` must be a known value. `timeout_ms` is copied as
/// is: 0 stays 0 (the model reads it as "no limit"; applying a tenant default is the
/// caller's business).
pub fn spec_from_pb(
    spec: Option<&pb::SandboxSpec>,
    field: &str,
) -> Result<SandboxSpec, FieldErrors> {
    let spec = spec.ok_or_else(|| missing(field))?;
    let (model, problems) = read_spec(spec);
    problems.finish_under(field)?;
    Ok(model)
}

/// Validates a `CreateSandboxRequest` as a whole: the request id (1..=128 bytes) and the
/// spec, every problem reported at once (`request_id: ...; spec.tenant: ...`). Returns the
/// request id and the spec.
pub fn create_request_from_pb(
    request: &pb::CreateSandboxRequest,
) -> Result<(String, SandboxSpec), FieldErrors> {
    let mut problems = Validator::new();
    let id_len = request.request_id.len();
    if !(1..=limits::REQUEST_ID_LEN).contains(&id_len) {
        problems.error(
            "request_id",
            format!(
                "is {id_len} bytes long, outside 1..={}",
                limits::REQUEST_ID_LEN
            ),
        );
    }
    let spec = match &request.spec {
        Some(spec) => {
            let (model, spec_problems) = read_spec(spec);
            problems.nested("spec", |v| v.absorb(spec_problems));
            Some(model)
        }
        None => {
            problems.error("spec", "must be set");
            None
        }
    };
    problems.finish_under("")?;
    match spec {
        Some(spec) => Ok((request.request_id.clone(), spec)),
        None => Err(missing("spec")),
    }
}

/// Converts a spec, returning what it found wrong with paths relative to the spec, in
/// .proto field order.
fn read_spec(spec: &pb::SandboxSpec) -> (SandboxSpec, Validator) {
    let mut conversion = Validator::new();
    let (cpu_milli, memory_mib, gpu) = match &spec.resources {
        Some(resources) => {
            let gpu = match &resources.gpu {
                Some(gpu) => match gpu_request_from_pb(gpu, "resources.gpu") {
                    Ok(request) => Some(request),
                    Err(e) => {
                        conversion.errors_mut().push(e);
                        None
                    }
                },
                None => None,
            };
            (resources.cpu_milli, resources.memory_mib, gpu)
        }
        None => {
            conversion.error("resources", "must be set");
            (0, 0, None)
        }
    };
    let constraints = spec
        .constraints
        .as_ref()
        .map(|c| read_constraints(c, &mut conversion))
        .unwrap_or_default();
    let model = SandboxSpec {
        tenant: spec.tenant.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: btree(&spec.env),
        cpu_milli,
        memory_mib,
        gpu,
        constraints,
        priority: spec.priority,
        timeout_ms: spec.timeout_ms,
        network: spec.network,
        labels: btree(&spec.labels),
    };
    let mut problems = Validator::new();
    model.validate(&mut problems);
    if spec.resources.is_none() {
        // "resources: must be set" says it all; no need to add that 0 CPU is too little.
        problems
            .errors_mut()
            .retain(|e| !e.field.starts_with("resources."));
    }
    problems.absorb(conversion);
    problems.sort_by_fields(SPEC_FIELDS);
    (model, problems)
}

fn read_constraints(c: &pb::PlacementConstraints, problems: &mut Validator) -> Constraints {
    for (i, t) in c.tolerations.iter().enumerate() {
        if t.key.is_empty() {
            problems.error(&format!("constraints.tolerations[{i}].key"), "must be set");
        }
    }
    let capacity_type = match pb::CapacityType::try_from(c.capacity_type) {
        Ok(pb::CapacityType::Unspecified) => None,
        Ok(pb::CapacityType::OnDemand) => Some(CapacityType::OnDemand),
        Ok(pb::CapacityType::Spot) => Some(CapacityType::Spot),
        Err(_) => {
            problems.error(
                "constraints.capacity_type",
                format!(
                    "unknown value {} (use CAPACITY_TYPE_UNSPECIFIED for either, \
                     CAPACITY_TYPE_ON_DEMAND or CAPACITY_TYPE_SPOT)",
                    c.capacity_type
                ),
            );
            None
        }
    };
    Constraints {
        providers: c.providers.clone(),
        regions: c.regions.clone(),
        node_labels: btree(&c.node_labels),
        tolerations: c
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone(),
                value: t.value.clone(),
            })
            .collect(),
        capacity_type,
    }
}

/// Writes a spec to the wire; [`spec_from_pb`] reads it back to the same spec.
pub fn spec_to_pb(spec: &SandboxSpec) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: spec.tenant.clone(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: hash(&spec.env),
        resources: Some(resources_to_pb(spec)),
        constraints: Some(constraints_to_pb(&spec.constraints)),
        priority: spec.priority,
        timeout_ms: spec.timeout_ms,
        network: spec.network,
        labels: hash(&spec.labels),
    }
}

/// The resources a spec asks for (CPU, memory, GPU request).
pub fn resources_to_pb(spec: &SandboxSpec) -> pb::Resources {
    pb::Resources {
        cpu_milli: spec.cpu_milli,
        memory_mib: spec.memory_mib,
        gpu: spec.gpu.as_ref().map(gpu_request_to_pb),
    }
}

/// Placement constraints on the wire (`None` capacity type is `UNSPECIFIED`).
pub fn constraints_to_pb(c: &Constraints) -> pb::PlacementConstraints {
    pb::PlacementConstraints {
        providers: c.providers.clone(),
        regions: c.regions.clone(),
        node_labels: hash(&c.node_labels),
        tolerations: c
            .tolerations
            .iter()
            .map(|t| pb::Toleration {
                key: t.key.clone(),
                value: t.value.clone(),
            })
            .collect(),
        capacity_type: c
            .capacity_type
            .map_or(pb::CapacityType::Unspecified, capacity_type_to_pb)
            as i32,
    }
}

/// A capacity type on the wire.
pub fn capacity_type_to_pb(c: CapacityType) -> pb::CapacityType {
    match c {
        CapacityType::OnDemand => pb::CapacityType::OnDemand,
        CapacityType::Spot => pb::CapacityType::Spot,
    }
}

/// A taint effect on the wire.
pub fn taint_effect_to_pb(e: TaintEffect) -> pb::TaintEffect {
    match e {
        TaintEffect::NoSchedule => pb::TaintEffect::NoSchedule,
        TaintEffect::PreferNoSchedule => pb::TaintEffect::PreferNoSchedule,
    }
}

// ---------------------------------------------------------------------------------------
// Sandboxes

/// A sandbox as the API shows it, viewed at `revision`.
///
/// The status carries state, node, GPU indices, milli per GPU, bound model, exit code
/// (`Exited` only, else 0), reason (`Failed`/`Lost` reason, or the pending reason while
/// `Pending`, else empty) and times (0 when not reached). Node and GPUs come from the
/// binding, which is kept for the record once the sandbox is terminal, so a Lost sandbox
/// still shows where it ran. Left empty: `gpu_uuids` (the sandbox does not hold them; use
/// [`sandbox_to_pb_with_gpus`], which the agent's `AssignSandbox` needs) and
/// `explanation` (the model keeps only the one-line pending reason).
pub fn sandbox_to_pb(s: &Sandbox, revision: u64) -> pb::Sandbox {
    sandbox_to_pb_with_gpus(s, None, revision)
}

/// As [`sandbox_to_pb_with_gpus`], looking the bound node up in `state` (what the API
/// answers: the GPU UUIDs are filled whenever the node is still registered).
pub fn sandbox_to_pb_in(s: &Sandbox, state: &State) -> pb::Sandbox {
    let node = s
        .binding
        .as_ref()
        .and_then(|b| state.node(&b.placement.node))
        .map(|r| &r.spec);
    sandbox_to_pb_with_gpus(s, node, state.revision())
}

/// As [`sandbox_to_pb`], and fills `gpu_uuids` from `node`, the inventory of the node the
/// sandbox is bound to (ignored when it is another node). The UUIDs are those the node
/// reports now at the bound indices; when any bound index is missing from the inventory
/// the list is left empty rather than misaligned with `gpu_indices`.
pub fn sandbox_to_pb_with_gpus(s: &Sandbox, node: Option<&NodeSpec>, revision: u64) -> pb::Sandbox {
    let mut status = pb::SandboxStatus {
        state: sandbox_state_to_pb(&s.state) as i32,
        created_unix_ms: s.created_ms,
        scheduled_unix_ms: s.scheduled_ms.unwrap_or(0),
        started_unix_ms: s.started_ms.unwrap_or(0),
        finished_unix_ms: s.finished_ms.unwrap_or(0),
        ..Default::default()
    };
    match &s.state {
        SandboxState::Pending => status.reason = s.pending_reason.clone().unwrap_or_default(),
        SandboxState::Exited { code } => status.exit_code = *code,
        SandboxState::Failed { reason } | SandboxState::Lost { reason } => {
            status.reason = reason.clone();
        }
        SandboxState::Scheduled | SandboxState::Running => {}
    }
    if let Some(binding) = &s.binding {
        let placement = &binding.placement;
        status.node_id = placement.node.clone();
        status.gpu_indices = placement.gpu_indices.clone();
        status.gpu_milli_per_gpu = placement.gpu_milli_per_gpu;
        status.gpu_model = binding
            .gpu_model
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        if let Some(node) = node.filter(|n| n.id == placement.node) {
            let uuids: Option<Vec<String>> = placement
                .gpu_indices
                .iter()
                .map(|i| {
                    node.gpus
                        .iter()
                        .find(|g| g.index == *i)
                        .map(|g| g.uuid.clone())
                })
                .collect();
            status.gpu_uuids = uuids.unwrap_or_default();
        }
    }
    pb::Sandbox {
        id: s.id.to_string(),
        request_id: s.request_id.clone(),
        spec: Some(spec_to_pb(&s.spec)),
        status: Some(status),
        revision,
    }
}

/// A sandbox's state on the wire.
pub fn sandbox_state_to_pb(s: &SandboxState) -> pb::SandboxState {
    match s {
        SandboxState::Pending => pb::SandboxState::Pending,
        SandboxState::Scheduled => pb::SandboxState::Scheduled,
        SandboxState::Running => pb::SandboxState::Running,
        SandboxState::Exited { .. } => pb::SandboxState::Exited,
        SandboxState::Failed { .. } => pb::SandboxState::Failed,
        SandboxState::Lost { .. } => pb::SandboxState::Lost,
    }
}

/// Whether a sandbox state matches a list filter value (the raw `i32` of the request).
/// `UNSPECIFIED` and unknown values match nothing; an empty filter list (match all) is the
/// caller's to handle.
pub fn sandbox_state_matches(filter: i32, s: &SandboxState) -> bool {
    pb::SandboxState::try_from(filter)
        .is_ok_and(|f| f != pb::SandboxState::Unspecified && f == sandbox_state_to_pb(s))
}

// ---------------------------------------------------------------------------------------
// Nodes

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
/// Not kept by the model (so [`node_to_pb`] reports them empty): GPU `product_name`,
/// `mig_mode`, `health_reason`, `compute_capability`, `nvlink_peers`; node
/// `cached_images`, `driver_version`, `cuda_version`, `inventory_source`.
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
        });
    }

    if inv.cached_images.len() > MAX_CACHED_IMAGES {
        conversion.error(
            "cached_images",
            format!(
                "{} images; the limit is {MAX_CACHED_IMAGES}",
                inv.cached_images.len()
            ),
        );
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
                ..Default::default()
            })
            .collect(),
        agent_address: spec.agent_address.clone(),
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

// ---------------------------------------------------------------------------------------
// Quotas

/// Fields of `TenantQuota` in .proto order.
const QUOTA_FIELDS: &[&str] = &[
    "tenant",
    "max_concurrent_sandboxes",
    "max_gpus_per_model",
    "max_creates_per_second",
    "priority",
];

/// Validates and converts a quota; returns the tenant and its quota. `tenant` must be a
/// valid tenant name; `max_concurrent_sandboxes` 0 means unlimited (`None`); each key of
/// `max_gpus_per_model` must name a catalog model (canonical name or alias, any case, at
/// most once per model; e.g. `max_gpus_per_model["H10"]: ...` otherwise), and its whole
/// GPUs become milli-GPUs (x1000). A value of 0 forbids that model; absent models are
/// unlimited.
///
/// Not kept by the model (nothing enforces them yet): `max_creates_per_second` and
/// `priority` are accepted and dropped; [`quota_to_pb`] reports them as 0.
pub fn quota_from_pb(
    q: Option<&pb::TenantQuota>,
    field: &str,
) -> Result<(String, TenantQuota), FieldErrors> {
    let q = q.ok_or_else(|| missing(field))?;
    let mut problems = Validator::new();
    problems.identifier("tenant", &q.tenant, limits::TENANT_LEN);
    // Sorted, so the errors come in the same order every time.
    let mut entries: Vec<(&String, &u32)> = q.max_gpus_per_model.iter().collect();
    entries.sort();
    let mut seen: BTreeMap<GpuModel, &str> = BTreeMap::new();
    let mut max_gpu_milli_per_model = BTreeMap::new();
    for (name, gpus) in entries {
        let path = format!("max_gpus_per_model[{name:?}]");
        match GpuModel::from_name(name) {
            None => problems.error(
                &path,
                format!(
                    "{name:?} is not a GPU model of the catalog ({})",
                    GpuModel::ALL.map(GpuModel::name).join(", ")
                ),
            ),
            Some(model) => {
                if let Some(first) = seen.insert(model, name) {
                    problems.error(
                        &path,
                        format!("{name:?} and {first:?} are both the model {model}"),
                    );
                } else {
                    max_gpu_milli_per_model
                        .insert(GpuModelName::Known(model), u64::from(*gpus) * 1000);
                }
            }
        }
    }
    problems.sort_by_fields(QUOTA_FIELDS);
    problems.finish_under(field)?;
    let quota = TenantQuota {
        max_concurrent_sandboxes: (q.max_concurrent_sandboxes > 0)
            .then_some(q.max_concurrent_sandboxes),
        max_gpu_milli_per_model,
    };
    Ok((q.tenant.clone(), quota))
}

/// A tenant's quota on the wire. Milli-GPU limits are shown in whole GPUs, rounded down
/// (limits set through the API are always whole). `max_creates_per_second` and `priority`
/// are 0: the model does not keep them.
pub fn quota_to_pb(tenant: &str, quota: &TenantQuota) -> pb::TenantQuota {
    pb::TenantQuota {
        tenant: tenant.to_owned(),
        max_concurrent_sandboxes: quota.max_concurrent_sandboxes.unwrap_or(0),
        max_gpus_per_model: quota
            .max_gpu_milli_per_model
            .iter()
            .map(|(model, milli)| {
                (
                    model.as_str().to_owned(),
                    u32::try_from(milli / 1000).unwrap_or(u32::MAX),
                )
            })
            .collect(),
        max_creates_per_second: 0,
        priority: 0,
    }
}

// ---------------------------------------------------------------------------------------
// Agent reports

/// An agent's status report from `node` -> a state-machine update. `sandbox_id` must parse
/// as `sbx-NNNNNNNNNN`; `state` must be RUNNING, EXITED (with `exit_code`) or FAILED (with
/// `reason`; an empty reason becomes `"reported failed by node <node>"`). Both problems are
/// reported at once, with bare paths (`sandbox_id`, `state`). `at_unix_ms` is not used: the
/// state machine stamps the time of the command that applies the update.
pub fn status_update_from_pb(
    node: &str,
    u: &pb::SandboxStatusUpdate,
) -> Result<StatusUpdate, FieldErrors> {
    let mut problems = Validator::new();
    let sandbox = match u.sandbox_id.parse::<SandboxId>() {
        Ok(id) => Some(id),
        Err(message) => {
            problems.error("sandbox_id", message);
            None
        }
    };
    let change = match pb::SandboxState::try_from(u.state) {
        Ok(pb::SandboxState::Running) => Some(StatusChange::Running),
        Ok(pb::SandboxState::Exited) => Some(StatusChange::Exited { code: u.exit_code }),
        Ok(pb::SandboxState::Failed) => Some(StatusChange::Failed {
            reason: if u.reason.is_empty() {
                format!("reported failed by node {node}")
            } else {
                u.reason.clone()
            },
        }),
        _ => {
            problems.error(
                "state",
                format!(
                    "must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED or \
                     SANDBOX_STATE_FAILED, not {}",
                    enum_value(u.state, pb::SandboxState::as_str_name)
                ),
            );
            None
        }
    };
    problems.finish_under("")?;
    match (sandbox, change) {
        (Some(sandbox), Some(change)) => Ok(StatusUpdate {
            sandbox,
            node: node.to_owned(),
            change,
        }),
        _ => Err(FieldErrors::one("state", "invalid sandbox status update")),
    }
}

#[cfg(test)]
mod tests {
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
                gpu: Some(
                    GpuRequest::parse(&["H100!:2", "A100-80GB:2"], Some(40_000)).expect("valid")
                ),
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
                    },
                    GpuDevice {
                        index: 1,
                        uuid: "GPU-abc-1".into(),
                        model: GpuModelName::Known(GpuModel::H100),
                        memory_mib: 81_559,
                        healthy: false,
                    },
                ],
                agent_address: "10.0.0.5:7071".into(),
            }
        );
        let back = node_inventory_to_pb(&spec);
        assert_eq!(back.price_per_hour_usd, 12.345_679);
        assert_eq!(back.gpus[0].model, "H100");
        assert_eq!(back.gpus[0].product_name, "");
        assert_eq!(back.gpus[1].health, pb::GpuHealth::Unhealthy as i32);
        assert!(back.cached_images.is_empty());
        assert_eq!(ok(node_spec_from_pb(Some(&back), "inventory")), Ok(spec));
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
}
