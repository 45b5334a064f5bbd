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
        Ok(pb::SandboxState::Running) if u.pause_failed => Some(StatusChange::PauseFailed {
            reason: u.reason.clone(),
        }),
        Ok(pb::SandboxState::Running) => Some(StatusChange::Running),
        Ok(pb::SandboxState::Exited) => Some(StatusChange::Exited { code: u.exit_code }),
        Ok(pb::SandboxState::Failed) => Some(StatusChange::Failed {
            reason: if u.reason.is_empty() {
                format!("reported failed by node {node}")
            } else {
                u.reason.clone()
            },
        }),
        Ok(pb::SandboxState::Standby) => Some(StatusChange::Standby),
        Ok(pb::SandboxState::Paused) => Some(StatusChange::Paused {
            bytes: u.snapshot_bytes,
            mode: if u.snapshot_filesystem_only {
                SnapshotMode::FilesystemOnly
            } else {
                SnapshotMode::Memory
            },
        }),
        _ => {
            problems.error(
                "state",
                format!(
                    "must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED, \
                     SANDBOX_STATE_FAILED, SANDBOX_STATE_PAUSED or SANDBOX_STATE_STANDBY, not {}",
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

/// What an agent's `Register.running` lists: each sandbox it has, with its state there
/// (as [`status_update_from_pb`] reads a report). The state machine lets each report
/// stand. An entry that does not read (a malformed id, a state an agent cannot report) is
/// left out, as a sandbox the agent does not have, and named in the second value with its
/// path under `field` (`register.running[3].state: ...`) for the caller to log.
pub fn observed_from_pb(
    node: &str,
    observed: &[pb::ObservedSandbox],
    field: &str,
) -> (BTreeMap<SandboxId, StatusChange>, Option<FieldErrors>) {
    let mut has = BTreeMap::new();
    let mut problems = Vec::new();
    for (i, o) in observed.iter().enumerate() {
        let report = pb::SandboxStatusUpdate {
            sandbox_id: o.sandbox_id.clone(),
            state: o.state,
            exit_code: o.exit_code,
            reason: o.reason.clone(),
            at_unix_ms: 0,
            snapshot_bytes: o.snapshot_bytes,
            snapshot_filesystem_only: o.snapshot_filesystem_only,
            pause_failed: false,
        };
        match status_update_from_pb(node, &report) {
            Ok(update) => {
                has.insert(update.sandbox, update.change);
            }
            Err(errors) => problems.extend(errors.0.into_iter().map(|e| berth_proto::FieldError {
                field: format!("{field}[{i}].{}", e.field),
                message: e.message,
            })),
        }
    }
    (has, (!problems.is_empty()).then_some(FieldErrors(problems)))
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
                ..Default::default()
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
         state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED, SANDBOX_STATE_FAILED, \
         SANDBOX_STATE_PAUSED or SANDBOX_STATE_STANDBY, not SANDBOX_STATE_LOST"
        );
        let mut unknown = update("sbx-x", pb::SandboxState::Running, 0, "");
        unknown.state = 42;
        let err = status_update_from_pb("n1", &unknown).expect_err("two mistakes");
        assert_eq!(
            message(&err),
            "sandbox_id: \"sbx-x\" is not a sandbox id (sbx-NNNNNNNNNN); \
         state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED, SANDBOX_STATE_FAILED, \
         SANDBOX_STATE_PAUSED or SANDBOX_STATE_STANDBY, not unknown value 42"
        );
        let err = status_update_from_pb(
            "n1",
            &update("sbx-0000000001", pb::SandboxState::Pending, 0, ""),
        )
        .expect_err("pending is not reportable");
        assert_eq!(
            message(&err),
            "state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED, SANDBOX_STATE_FAILED, \
         SANDBOX_STATE_PAUSED or SANDBOX_STATE_STANDBY, not SANDBOX_STATE_PENDING"
        );
    }

    #[test]
    fn a_registration_lists_each_sandbox_with_its_state_and_names_what_does_not_read() {
        let observed = |id: &str, state: pb::SandboxState, code: i32| pb::ObservedSandbox {
            sandbox_id: id.into(),
            state: state as i32,
            exit_code: code,
            reason: String::new(),
            epoch: 4,
            ..Default::default()
        };
        let (has, problems) = observed_from_pb(
            "n1",
            &[
                observed("sbx-0000000001", pb::SandboxState::Running, 0),
                observed("sbx-0000000002", pb::SandboxState::Exited, 3),
                observed("sbx-0000000003", pb::SandboxState::Failed, 0),
                observed("nope", pb::SandboxState::Running, 0),
                observed("sbx-0000000005", pb::SandboxState::Unknown, 0),
                observed("sbx-0000000006", pb::SandboxState::Standby, 0),
            ],
            "register.running",
        );
        assert_eq!(
            has,
            BTreeMap::from([
                (SandboxId(1), StatusChange::Running),
                (SandboxId(2), StatusChange::Exited { code: 3 }),
                (
                    SandboxId(3),
                    StatusChange::Failed {
                        reason: "reported failed by node n1".into()
                    }
                ),
                (SandboxId(6), StatusChange::Standby),
            ])
        );
        assert_eq!(
            problems.map(|p| p.one_line()).unwrap_or_default(),
            "register.running[3].sandbox_id: \"nope\" is not a sandbox id (sbx-NNNNNNNNNN); \
             register.running[4].state: must be SANDBOX_STATE_RUNNING, SANDBOX_STATE_EXITED, \
             SANDBOX_STATE_FAILED, SANDBOX_STATE_PAUSED or SANDBOX_STATE_STANDBY, not \
             SANDBOX_STATE_UNKNOWN"
        );
    }
}
