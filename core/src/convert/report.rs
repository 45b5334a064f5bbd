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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::fixtures::*;

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
}
