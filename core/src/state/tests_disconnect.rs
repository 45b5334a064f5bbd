//! The disconnect grace: a silent node's sandboxes are Unknown and keep their resources; a
//! report within the grace stands; after it they are Lost. Each apply is invariant-checked.

use berth_proto::{GpuModel, GpuModelName};

use super::*;
use crate::invariants::{self, Invariant};
use crate::model::{NodeStatus, SandboxState};
use crate::testing::{apply_checked, gpu_node, placement, spec, submit};

const GRACE_MS: u64 = 5_000;
const DOWN_AT_MS: u64 = 100;

/// Node n1 with `gpus` H100s and one sandbox per GPU; the first `running` reported running.
fn busy(gpus: u32, running: usize) -> (State, Vec<SandboxId>) {
    let mut state = State::new();
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", GpuModel::H100, gpus),
        },
        0,
    );
    let ids: Vec<SandboxId> = (0..gpus)
        .map(|i| {
            match apply_checked(
                &mut state,
                &submit(
                    &format!("r{i}"),
                    spec(&["H100"]),
                    Some(placement("n1", 1, &[i], 1000)),
                ),
                1,
            )[..]
            {
                [
                    ItemOutcome::Created {
                        id, bound: true, ..
                    },
                ] => id,
                ref other => panic!("{other:?}"),
            }
        })
        .collect();
    let items = ids[..running]
        .iter()
        .map(|id| StatusUpdate {
            sandbox: *id,
            node: "n1".into(),
            change: StatusChange::Running,
        })
        .collect();
    apply_checked(&mut state, &Command::UpdateSandboxes { items }, 2);
    (state, ids)
}

fn disconnect(grace_ms: u64) -> Command {
    Command::NodeDisconnected {
        node: "n1".into(),
        reason: "no heartbeat for 1600 ms".into(),
        grace_ms,
    }
}

fn state_of(state: &State, id: SandboxId) -> SandboxState {
    state.sandbox(id).expect("kept").state.clone()
}

fn gpus_held(state: &State) -> Vec<u32> {
    state.node("n1").expect("node").gpu_milli_allocated.clone()
}

#[test]
fn a_silent_node_makes_its_sandboxes_unknown_and_keeps_their_gpus() {
    let (mut state, ids) = busy(2, 1);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    let unknown = |was_running| SandboxState::Unknown {
        reason: "no heartbeat for 1600 ms".into(),
        since_ms: DOWN_AT_MS,
        lost_after_ms: DOWN_AT_MS + GRACE_MS,
        was_running,
    };
    assert_eq!(state_of(&state, ids[0]), unknown(true));
    assert_eq!(state_of(&state, ids[1]), unknown(false));
    let node = state.node("n1").expect("node");
    assert_eq!(node.status, NodeStatus::Down);
    assert_eq!(node.status_reason, "no heartbeat for 1600 ms");
    // Their GPUs, CPU and memory stay held, on the node and for the tenant.
    assert_eq!(gpus_held(&state), [1000, 1000]);
    assert_eq!(node.cpu_milli_allocated, 2_000);
    assert_eq!(
        state.tenants()["t"].gpu_milli_by_model[&GpuModelName::Known(GpuModel::H100)],
        2_000
    );
    assert_eq!(state.sandboxes_by_state().get("unknown"), Some(&2));
    assert_eq!(state.sandbox(ids[0]).and_then(|s| s.finished_ms), None);
    // Nothing new lands on the Down node.
    let out = apply_checked(
        &mut state,
        &submit("new", spec(&["H100"]), Some(placement("n1", 1, &[0], 1000))),
        200,
    );
    assert!(
        matches!(
            &out[..],
            [ItemOutcome::Created {
                bound: false,
                bind_rejected: Some(Rejection::NodeNotReady { .. }),
                ..
            }]
        ),
        "{out:?}"
    );
    // A second silence report changes nothing.
    let before = state.snapshot();
    assert_eq!(
        state.apply(&disconnect(GRACE_MS), 300),
        [ItemOutcome::Applied]
    );
    assert_eq!(
        state.sandboxes(),
        State::restore(&before).expect("ok").sandboxes()
    );
}

#[test]
fn an_agent_back_within_the_grace_has_its_report_stand() {
    // 0 and 1 running, 2 and 3 running, 4 only scheduled.
    let (mut state, ids) = busy(5, 4);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    let epoch = state.node("n1").expect("node").epoch;
    let has = BTreeMap::from([
        (ids[0], StatusChange::Running),
        (ids[1], StatusChange::Exited { code: 3 }),
        (
            ids[2],
            StatusChange::Failed {
                reason: "OOM killed".into(),
            },
        ),
    ]);
    apply_checked(
        &mut state,
        &Command::RegisterAgent {
            spec: gpu_node("n1", GpuModel::H100, 5),
            has,
        },
        2_000,
    );
    assert_eq!(state_of(&state, ids[0]), SandboxState::Running);
    assert_eq!(state_of(&state, ids[1]), SandboxState::Exited { code: 3 });
    assert_eq!(
        state_of(&state, ids[2]),
        SandboxState::Failed {
            reason: "OOM killed".into()
        }
    );
    // Running before, and the agent does not have it: it restarted without it.
    assert_eq!(
        state_of(&state, ids[3]),
        SandboxState::Lost {
            reason: "the agent on n1 restarted without it".into()
        }
    );
    // Never started: Scheduled again, to be assigned anew.
    assert_eq!(state_of(&state, ids[4]), SandboxState::Scheduled);
    assert_eq!(
        state.sandbox(ids[1]).and_then(|s| s.finished_ms),
        Some(2_000)
    );
    let node = state.node("n1").expect("node");
    assert_eq!(node.status, NodeStatus::Ready);
    assert!(node.epoch > epoch);
    assert_eq!(gpus_held(&state), [1000, 0, 0, 0, 1000]);
    assert!(state.disconnect_grace_over(u64::MAX, 10).is_empty());
}

#[test]
fn a_scheduled_sandbox_the_agent_reports_running_is_running() {
    let (mut state, ids) = busy(1, 0);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    apply_checked(
        &mut state,
        &Command::RegisterAgent {
            spec: gpu_node("n1", GpuModel::H100, 1),
            has: [(ids[0], StatusChange::Running)].into(),
        },
        1_000,
    );
    let sandbox = state.sandbox(ids[0]).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Running);
    assert_eq!(sandbox.started_ms, Some(1_000));
}

#[test]
fn an_end_reported_on_the_old_stream_stands_and_running_waits_for_registration() {
    let (mut state, ids) = busy(2, 2);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    let report = |id, change| Command::UpdateSandboxes {
        items: vec![StatusUpdate {
            sandbox: id,
            node: "n1".into(),
            change,
        }],
    };
    apply_checked(
        &mut state,
        &report(ids[0], StatusChange::Exited { code: 0 }),
        500,
    );
    assert_eq!(state_of(&state, ids[0]), SandboxState::Exited { code: 0 });
    assert_eq!(gpus_held(&state), [0, 1000]);
    // "Still running" does not bring a sandbox back while its node is Down.
    assert_eq!(
        apply_checked(&mut state, &report(ids[1], StatusChange::Running), 600),
        [ItemOutcome::Applied]
    );
    assert_eq!(state_of(&state, ids[1]).name(), "unknown");
}

#[test]
fn the_grace_ending_makes_unknown_sandboxes_lost_and_frees_their_gpus() {
    let (mut state, ids) = busy(2, 1);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    let end = DOWN_AT_MS + GRACE_MS;
    assert!(state.disconnect_grace_over(end - 1, 10).is_empty());
    assert_eq!(state.disconnect_grace_over(end, 10), ids);
    assert_eq!(state.disconnect_grace_over(end, 1), ids[..1]);

    // The leader's clock ran ahead of the entry's: refused, nothing changes.
    let expire = Command::ExpireDisconnected { items: ids.clone() };
    assert_eq!(
        apply_checked(&mut state, &expire, end - 1),
        ids.iter()
            .map(|id| ItemOutcome::Rejected(Rejection::GraceNotOver {
                id: *id,
                lost_after_ms: end
            }))
            .collect::<Vec<_>>()
    );
    assert_eq!(gpus_held(&state), [1000, 1000]);

    assert_eq!(
        apply_checked(&mut state, &expire, end),
        [ItemOutcome::Applied, ItemOutcome::Applied]
    );
    for id in &ids {
        assert_eq!(
            state_of(&state, *id),
            SandboxState::Lost {
                reason: "node n1 did not come back within the 5000 ms disconnect grace \
                         (down: no heartbeat for 1600 ms)"
                    .into()
            }
        );
        assert_eq!(state.sandbox(*id).and_then(|s| s.finished_ms), Some(end));
    }
    assert_eq!(gpus_held(&state), [0, 0]);
    assert!(state.node("n1").expect("node").sandboxes.is_empty());
    // Expiring again is refused: they are Lost, not Unknown.
    assert!(matches!(
        apply_checked(&mut state, &expire, end + 1)[0],
        ItemOutcome::Rejected(Rejection::InvalidTransition { .. })
    ));

    // The agent comes back late, still running the first: Lost stands.
    apply_checked(
        &mut state,
        &Command::RegisterAgent {
            spec: gpu_node("n1", GpuModel::H100, 2),
            has: [(ids[0], StatusChange::Running)].into(),
        },
        end + 1_000,
    );
    assert_eq!(state_of(&state, ids[0]).name(), "lost");
    assert_eq!(gpus_held(&state), [0, 0]);
}

#[test]
fn a_zero_grace_loses_at_once_and_a_long_one_is_capped() {
    let (mut state, ids) = busy(1, 1);
    apply_checked(&mut state, &disconnect(0), DOWN_AT_MS);
    assert_eq!(
        state_of(&state, ids[0]),
        SandboxState::Lost {
            reason: "node n1 is down: no heartbeat for 1600 ms".into()
        }
    );
    assert_eq!(gpus_held(&state), [0]);

    let (mut state, ids) = busy(1, 1);
    apply_checked(&mut state, &disconnect(u64::MAX), DOWN_AT_MS);
    let SandboxState::Unknown { lost_after_ms, .. } = state_of(&state, ids[0]) else {
        panic!("not unknown")
    };
    assert_eq!(lost_after_ms, DOWN_AT_MS + MAX_DISCONNECT_GRACE_MS);
}

#[test]
fn deleting_an_unknown_sandbox_releases_it() {
    let (mut state, ids) = busy(1, 1);
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    apply_checked(
        &mut state,
        &Command::DeleteSandboxes {
            items: vec![ids[0]],
        },
        200,
    );
    assert!(state.sandbox(ids[0]).is_none());
    assert_eq!(gpus_held(&state), [0]);
}

#[test]
fn the_disconnect_grace_is_a_function_of_the_entries_alone() {
    let run = || {
        let (mut state, ids) = busy(3, 2);
        apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
        let expire = Command::ExpireDisconnected { items: ids.clone() };
        apply_checked(&mut state, &expire, DOWN_AT_MS + 1);
        apply_checked(
            &mut state,
            &Command::RegisterAgent {
                spec: gpu_node("n1", GpuModel::H100, 3),
                has: [(ids[0], StatusChange::Exited { code: 1 })].into(),
            },
            DOWN_AT_MS + 2,
        );
        apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS + 3);
        apply_checked(&mut state, &expire, DOWN_AT_MS + 3 + GRACE_MS);
        state
    };
    let (a, b) = (run(), run());
    assert_eq!(a.snapshot(), b.snapshot(), "replicas hold identical bytes");
    let restored = State::restore(&a.snapshot()).expect("restores");
    assert_eq!(restored, a);
    assert_eq!(a.sandboxes_by_state().get("exited"), Some(&1));
    assert_eq!(a.sandboxes_by_state().get("lost"), Some(&2));
}

#[test]
fn snapshots_carry_unknown_sandboxes_and_older_formats_are_refused_by_version() {
    let (mut state, _) = busy(2, 1);
    let mut old = state.snapshot();
    old[6] = 4;
    assert!(matches!(
        State::restore(&old),
        Err(crate::state::snapshot::SnapshotError::UnsupportedVersion(4))
    ));
    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    assert_eq!(State::restore(&state.snapshot()).expect("restores"), state);
}

#[test]
fn the_checker_finds_unknown_on_a_ready_node_and_running_on_a_down_one() {
    let (mut state, ids) = busy(2, 2);
    let mut broken = state.clone();
    if let Some(s) = broken.sandboxes.get_mut(&ids[0]) {
        s.state = SandboxState::Unknown {
            reason: String::new(),
            since_ms: 10,
            lost_after_ms: 5,
            was_running: true,
        };
    }
    let found: Vec<Invariant> = invariants::check(&broken)
        .into_iter()
        .map(|v| v.invariant)
        .filter(|i| *i == Invariant::UnknownOnlyOnDownNodes)
        .collect();
    assert_eq!(
        found.len(),
        2,
        "grace ends before it began, on a Ready node"
    );

    apply_checked(&mut state, &disconnect(GRACE_MS), DOWN_AT_MS);
    if let Some(s) = state.sandboxes.get_mut(&ids[1]) {
        s.state = SandboxState::Running;
    }
    assert!(
        invariants::check(&state)
            .iter()
            .any(|v| v.invariant == Invariant::UnknownOnlyOnDownNodes)
    );
}
