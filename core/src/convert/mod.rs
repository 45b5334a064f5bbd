//! Conversions between the `berth.v1` wire messages and the scheduler's model, for the gRPC
//! handlers, the autoscaler and the CLI.
//!
//! Reading from the wire validates as it converts and collects every problem before
//! answering: the [`FieldErrors`] (which the service layer turns into one
//! `INVALID_ARGUMENT`) list each bad field with its full path (`spec.resources.cpu_milli: ...; spec.resources.gpu.options[0]: ...`), in
//! the order the fields are declared in the .proto. Bounds come from the model's own
//! `validate` methods, so the API and `State::apply` agree on what is acceptable.
//!
//! Writing to the wire never fails. Model fields the wire has no place for, and wire fields
//! the model does not keep, are listed on each function.
//!
//! One file per thing converted: `spec.rs` (sandbox specs), `sandbox.rs`, `node.rs`,
//! `quota.rs` and `report.rs` (agent status reports); each file's tests are beside its code, with shared fixtures in `fixtures.rs`
//! (and the create's checks at the door, NUL bytes, env names, image references, something
//! to run, in `spec_checks.rs`). Every
//! public function is re-exported here, so callers name `berth_core::convert::X`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_proto::convert::{gpu_request_from_pb, gpu_request_to_pb};
use berth_proto::node::{CapacityType, TaintEffect};
use berth_proto::pb::v1 as pb;
use berth_proto::{FieldErrors, GpuModel, GpuModelName, Validator};

use crate::model::{
    Constraints, GpuDevice, NodeSpec, NodeStatus, Sandbox, SandboxId, SandboxSpec, SandboxState,
    SnapshotMode, Taint, TenantQuota, Toleration, limits,
};
use crate::state::{NodeRecord, State, StatusChange, StatusUpdate};

pub use crate::model::MAX_CACHED_IMAGES;

/// Highest accepted node price, in US dollars per hour.
pub const MAX_PRICE_PER_HOUR_USD: f64 = 1_000_000.0;

// Helpers shared by the conversions.

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

#[cfg(test)]
mod fixtures;
mod node;
mod quota;
mod report;
mod sandbox;
mod spec;
#[cfg(test)]
mod spec_checks;

pub use node::{
    mig_mode_to_pb, node_inventory_to_pb, node_spec_from_pb, node_status_matches,
    node_status_to_pb, node_to_pb,
};
pub use quota::{quota_from_pb, quota_to_pb};
pub use report::{observed_from_pb, status_update_from_pb};
pub use sandbox::{
    sandbox_state_matches, sandbox_state_to_pb, sandbox_to_pb, sandbox_to_pb_in,
    sandbox_to_pb_with_gpus,
};
pub use spec::{
    capacity_type_to_pb, constraints_to_pb, create_request_from_pb, resources_to_pb, spec_from_pb,
    spec_to_pb, taint_effect_to_pb,
};
