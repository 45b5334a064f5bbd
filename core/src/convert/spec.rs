//! Sandbox specs: a client's spec validated and converted (with its constraints and
//! resources), and written back to the wire.

use super::*;

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
