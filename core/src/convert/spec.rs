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
    "labels",
    "keep_alive",
    "idle_timeout_ms",
    "network",
    "auto_pause_idle_ms",
    "auto_resume",
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
    let (model, problems) = read_spec(spec, false);
    problems.finish_under(field)?;
    Ok(model)
}

/// Validates a `CreateSandboxRequest` as a whole: the request id (1..=128 bytes) and the
/// spec, every problem reported at once (`request_id: ...; spec.tenant: ...`). Returns the
/// request id and the spec.
///
/// A create must also say what to run: `command` may be empty only when `image` is set
/// (the node then runs the image's entrypoint and cmd); otherwise it is
/// `spec.command: required when spec.image is empty and spec.keep_alive is false`. [`spec_from_pb`] does not ask this,
/// because specs that only describe a shape (the autoscaler's pending demand, traces) have
/// neither.
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
            let (model, spec_problems) = read_spec(spec, true);
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
/// .proto field order; `runnable` also requires something to run (a create).
fn read_spec(spec: &pb::SandboxSpec, runnable: bool) -> (SandboxSpec, Validator) {
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
        network: berth_proto::network::network_from_pb(spec.network.as_ref(), &mut conversion),
        labels: btree(&spec.labels),
        keep_alive: spec.keep_alive,
        idle_timeout_ms: spec.idle_timeout_ms,
        auto_pause_idle_ms: spec.auto_pause_idle_ms,
        auto_resume: spec.auto_resume,
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
    if runnable && spec.image.is_empty() && spec.command.is_empty() && !spec.keep_alive {
        problems.error(
            "command",
            "required when spec.image is empty and spec.keep_alive is false",
        );
    }
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
        network: Some(berth_proto::network::network_to_pb(&spec.network)),
        labels: hash(&spec.labels),
        keep_alive: spec.keep_alive,
        idle_timeout_ms: spec.idle_timeout_ms,
        auto_pause_idle_ms: spec.auto_pause_idle_ms,
        auto_resume: spec.auto_resume,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::fixtures::*;

    use berth_proto::GpuRequest;

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
                network: crate::network::NetworkPolicy::EgressAll,
                labels: BTreeMap::from([("team".into(), "ml".into())]),
                keep_alive: true,
                idle_timeout_ms: 30_000,
                auto_pause_idle_ms: 0,
                auto_resume: false,
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
            snapshot: None,
            placement_note: None,
            pool: None,
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
}
