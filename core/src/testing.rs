//! Helpers for tests, benches and the simulator: small nodes and specs, and an `apply` that
//! checks every invariant afterwards.

use berth_proto::gpu::GpuRequest;
use berth_proto::{GpuModel, GpuModelName};

use crate::invariants;
use crate::model::{NodeSpec, Placement, SandboxSpec};
use crate::state::{Command, ItemOutcome, State, Submission};

/// A node with `count` GPUs of `model`, 64 cores and 512 GiB.
pub fn gpu_node(id: &str, model: GpuModel, count: u32) -> NodeSpec {
    let name = GpuModelName::Known(model);
    NodeSpec::simple(
        id,
        64_000,
        512 * 1024,
        NodeSpec::uniform_gpus(id, &name, model.info().memory_mib, count),
    )
}

/// A spec for tenant "t" with 1 core, 1 GiB and the given GPU specs (none = CPU-only).
pub fn spec(gpu: &[&str]) -> SandboxSpec {
    let gpu = (!gpu.is_empty()).then(|| GpuRequest::parse(gpu, None).expect("valid GPU spec"));
    SandboxSpec::resources("t", 1000, 1024, gpu)
}

/// Applies a command and panics if any invariant breaks. For tests.
pub fn apply_checked(state: &mut State, command: &Command, now_ms: u64) -> Vec<ItemOutcome> {
    let out = state.apply(command, now_ms);
    let violations = invariants::check(state);
    assert!(violations.is_empty(), "after {command:?}: {violations:?}");
    out
}

/// A one-item submit.
pub fn submit(request_id: &str, spec: SandboxSpec, placement: Option<Placement>) -> Command {
    Command::SubmitSandboxes {
        items: vec![Submission {
            request_id: request_id.into(),
            spec,
            placement,
        }],
    }
}

/// A placement on `node` at `epoch` of `milli` on each of `gpus` (option 0).
pub fn placement(node: &str, epoch: u64, gpus: &[u32], milli: u32) -> Placement {
    Placement {
        node: node.into(),
        epoch,
        option: 0,
        gpu_indices: gpus.to_vec(),
        gpu_milli_per_gpu: milli,
    }
}
