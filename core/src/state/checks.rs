//! The checks `apply` makes of what a log entry asks for: a GPU request well formed, a
//! placement that fits the node as it is now, constraints met.

use berth_proto::gpu::{
    GpuAmount, GpuModelSelector, GpuRequest,
    request::{MAX_GPU_OPTIONS, MAX_GPUS_PER_SANDBOX},
};

use berth_proto::{GpuModelName, Validator};

use super::NodeRecord;
use super::command::Rejection;
use crate::model::{NodeSpec, NodeStatus, Placement, SandboxSpec};

/// Checks that a GPU request read from a log entry is well formed (the wire parser already
/// guarantees this for requests that came through the API; entries are checked anyway).
pub(super) fn validate_gpu_request(gpu: &GpuRequest, v: &mut Validator) {
    // What the parser would build from this request's own spec strings must be this request:
    // an entry can then hold nothing the API could not have accepted.
    if GpuRequest::parse(&gpu.specs(), gpu.min_memory_mib).as_ref() != Ok(gpu) {
        v.error(
            "",
            format!("{gpu} is not a request the GPU spec parser accepts"),
        );
        return;
    }
    v.check(
        (1..=MAX_GPU_OPTIONS).contains(&gpu.options.len()),
        "options",
        || {
            format!(
                "{} options; 1..={MAX_GPU_OPTIONS} allowed",
                gpu.options.len()
            )
        },
    );
    for (i, option) in gpu.options.iter().enumerate() {
        let ok = match option.amount {
            GpuAmount::Whole(n) => (1..=MAX_GPUS_PER_SANDBOX).contains(&n),
            GpuAmount::Shared(m) => (1..1000).contains(&m),
        };
        v.check(ok, &format!("options[{i}]"), || {
            format!("{option} has an amount out of range")
        });
    }
}

/// Re-checks a placement against the node as it is now. Returns the bound GPU model.
pub(crate) fn check_fit(
    spec: &SandboxSpec,
    node: &NodeRecord,
    placement: &Placement,
) -> Result<Option<GpuModelName>, Rejection> {
    let node_id = &node.spec.id;
    if placement.epoch != node.epoch {
        return Err(Rejection::StaleEpoch {
            node: node_id.clone(),
            planned: placement.epoch,
            current: node.epoch,
        });
    }
    if node.status != NodeStatus::Ready {
        return Err(Rejection::NodeNotReady {
            node: node_id.clone(),
            status: node.status,
        });
    }
    check_constraints(spec, &node.spec)?;
    for (resource, free, need) in [
        ("cpu_milli", node.cpu_milli_free(), spec.cpu_milli),
        ("memory_mib", node.memory_mib_free(), spec.memory_mib),
    ] {
        if free < need {
            return Err(Rejection::Insufficient {
                node: node_id.clone(),
                resource,
                free,
                need,
            });
        }
    }
    let Some(request) = &spec.gpu else {
        if !placement.gpu_indices.is_empty() {
            return Err(Rejection::PlanMismatch(
                "a CPU-only sandbox was given GPUs".into(),
            ));
        }
        return Ok(None);
    };
    let option = request
        .options
        .get(placement.option as usize)
        .ok_or_else(|| {
            Rejection::PlanMismatch(format!("option {} does not exist", placement.option))
        })?;
    if placement.gpu_indices.len() != option.amount.gpu_count() as usize {
        return Err(Rejection::PlanMismatch(format!(
            "{} GPUs given; {option} asks for {}",
            placement.gpu_indices.len(),
            option.amount.gpu_count()
        )));
    }
    if placement.gpu_milli_per_gpu != option.amount.milli_per_gpu() {
        return Err(Rejection::PlanMismatch(format!(
            "{} milli per GPU given; {option} asks for {}",
            placement.gpu_milli_per_gpu,
            option.amount.milli_per_gpu()
        )));
    }
    let mut model: Option<&GpuModelName> = None;
    for (k, index) in placement.gpu_indices.iter().enumerate() {
        let gpu_err = |why: String| Rejection::Gpu {
            node: node_id.clone(),
            index: *index,
            why,
        };
        if placement.gpu_indices[..k].contains(index) {
            return Err(gpu_err("listed twice".into()));
        }
        let gpu = node
            .spec
            .gpus
            .get(*index as usize)
            .ok_or_else(|| gpu_err("does not exist".into()))?;
        if !gpu.healthy {
            return Err(gpu_err("is unhealthy".into()));
        }
        // The state machine enforces `!` and the model ladder; whether upgrades are wanted
        // at all is the placement engine's (operator-configured) choice.
        if !option.accepts(&gpu.model, true) {
            return Err(gpu_err(format!(
                "is a {}, which {option} does not accept",
                gpu.model
            )));
        }
        if model.is_some_and(|m| m != &gpu.model) {
            return Err(gpu_err(
                "is a different model from the other GPUs in the plan".into(),
            ));
        }
        model = Some(&gpu.model);
        if let Some(min) = request.min_memory_mib {
            if gpu.memory_mib < min {
                return Err(gpu_err(format!(
                    "has {} MiB; the request needs {min}",
                    gpu.memory_mib
                )));
            }
        }
        let free = node.gpu_milli_free(*index as usize);
        if free < placement.gpu_milli_per_gpu {
            return Err(gpu_err(format!(
                "has {free} milli free; the sandbox needs {}",
                placement.gpu_milli_per_gpu
            )));
        }
    }
    if matches!(option.model, GpuModelSelector::Model(_)) && model.is_none() {
        return Err(Rejection::PlanMismatch("no GPUs given".into()));
    }
    Ok(model.cloned())
}

/// Hard constraints of a sandbox against a node: the placement engine's own inventory
/// filters, so placement and `apply` agree on what fits.
pub(crate) fn check_constraints(spec: &SandboxSpec, node: &NodeSpec) -> Result<(), Rejection> {
    crate::placement::filters::check_spec(spec, node).map_err(|reason| Rejection::Constraint {
        node: node.id.clone(),
        why: reason.to_string(),
    })
}
