//! Agent reports: a sandbox status update from a node agent, validated and converted.

use super::*;

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
