//! Sandboxes as the API shows them: status, binding, GPU UUIDs; states and state filters.

use super::*;

/// A sandbox as the API shows it, viewed at `revision`.
///
/// The status carries state, node, GPU indices, milli per GPU, bound model, exit code
/// (`Exited` only, else 0), reason (`Failed`/`Lost` reason, why its node is down and how
/// long it has while `Unknown`, or the pending reason while `Pending`, else empty) and times (0 when not reached). Node and GPUs come from the
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
        SandboxState::Unknown {
            reason,
            since_ms,
            lost_after_ms,
            ..
        } => {
            let node = s
                .binding
                .as_ref()
                .map_or("?", |b| b.placement.node.as_str());
            status.reason = format!(
                "node {node} is down ({reason}); Lost unless it comes back within {} ms",
                lost_after_ms.saturating_sub(*since_ms)
            );
        }
        SandboxState::Paused => {
            if let Some(snap) = &s.snapshot {
                let what = match snap.mode {
                    SnapshotMode::Memory => "memory and files",
                    SnapshotMode::FilesystemOnly => "files only; processes restart on resume",
                };
                status.reason = format!(
                    "paused to node {} ({} bytes, {what})",
                    snap.node, snap.bytes
                );
                status.node_id = snap.node.clone();
            }
        }
        SandboxState::Standby { .. } => {
            status.reason =
                "on standby: frozen in place, holding its memory but no CPU; resume thaws it"
                    .into();
        }
        SandboxState::Scheduled | SandboxState::Running | SandboxState::Pausing => {}
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
    status.pool = s.pool.clone().unwrap_or_default();
    if let Some(note) = &s.placement_note {
        status.explanation = Some(pb::PlacementExplanation {
            summary: note.clone(),
            ..Default::default()
        });
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
        SandboxState::Unknown { .. } => pb::SandboxState::Unknown,
        SandboxState::Pausing => pb::SandboxState::Pausing,
        SandboxState::Paused => pb::SandboxState::Paused,
        SandboxState::Standby { .. } => pb::SandboxState::Standby,
    }
}

/// Whether a sandbox state matches a list filter value (the raw `i32` of the request).
/// `UNSPECIFIED` and unknown values match nothing; an empty filter list (match all) is the
/// caller's to handle.
pub fn sandbox_state_matches(filter: i32, s: &SandboxState) -> bool {
    pb::SandboxState::try_from(filter)
        .is_ok_and(|f| f != pb::SandboxState::Unspecified && f == sandbox_state_to_pb(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::fixtures::*;
    use crate::model::Binding;
    use crate::state::Command;
    use crate::testing::{apply_checked, placement, spec};

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
    fn an_unknown_sandbox_shows_its_node_and_grace() {
        let (mut state, [a, ..]) = busy_node();
        apply_checked(
            &mut state,
            &Command::NodeDisconnected {
                node: "n1".into(),
                reason: "no heartbeat for 1600 ms".into(),
                grace_ms: 5_000,
            },
            30,
        );
        let unknown = state.sandbox(a).expect("kept");
        let status = sandbox_to_pb_in(unknown, &state).status.expect("status");
        assert_eq!(status.state, pb::SandboxState::Unknown as i32);
        assert_eq!(
            status.reason,
            "node n1 is down (no heartbeat for 1600 ms); Lost unless it comes back within 5000 ms"
        );
        assert_eq!(status.node_id, "n1");
        assert_eq!(status.finished_unix_ms, 0, "not finished");
        assert!(sandbox_state_matches(
            pb::SandboxState::Unknown as i32,
            &unknown.state
        ));
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
            snapshot: None,
            placement_note: None,
            pool: None,
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
