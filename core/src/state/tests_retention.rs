//! Snapshot retention in the state machine: a paused sandbox past the retention the
//! leader used is Failed, naming the field, and off its node's snapshot index; one resumed
//! meanwhile, or not that old, is refused and stays. Each apply is invariant-checked.

use berth_proto::GpuModel;

use super::tests_pause::{cpu_only, pause, report, running_on};
use super::*;
use crate::model::{SandboxSpec, SandboxState, SnapshotMode};
use crate::testing::{apply_checked, gpu_node};

/// A sandbox on n1, paused at 20 ms.
fn paused() -> (State, SandboxId) {
    let (mut state, id) = running_on(gpu_node("n1", GpuModel::H100, 4), cpu_only(), &[]);
    pause(&mut state, id, false);
    let change = StatusChange::Paused {
        bytes: 4096,
        mode: SnapshotMode::Memory,
    };
    assert_eq!(
        report(&mut state, id, change, 20),
        vec![ItemOutcome::Applied]
    );
    (state, id)
}

fn expire(state: &mut State, id: SandboxId, retention_ms: u64, now_ms: u64) -> Vec<ItemOutcome> {
    let cmd = Command::ExpireSnapshots {
        items: vec![(id, retention_ms)],
    };
    apply_checked(state, &cmd, now_ms)
}

#[test]
fn a_paused_sandbox_past_its_retention_fails_and_leaves_its_nodes_snapshot_index() {
    let (mut state, id) = paused();
    let of_t = |tenant: &str| if tenant == "t" { 100 } else { 5 };
    assert!(state.snapshots_older(119, of_t, 10).is_empty(), "not yet");
    assert_eq!(state.snapshots_older(120, of_t, 10), vec![(id, 100)]);
    assert!(state.snapshots_older(120, of_t, 0).is_empty(), "bounded");
    assert!(
        state.snapshots_older(1 << 40, |_| 0, 10).is_empty(),
        "a retention of 0 keeps it forever"
    );

    assert_eq!(
        expire(&mut state, id, 100, 119),
        vec![ItemOutcome::Rejected(Rejection::SnapshotKept {
            id,
            taken_ms: 20,
            retention_ms: 100
        })],
        "apply re-checks the age against the entry's clock"
    );
    assert_eq!(
        expire(&mut state, id, 0, 1 << 40),
        vec![ItemOutcome::Rejected(Rejection::SnapshotKept {
            id,
            taken_ms: 20,
            retention_ms: 0
        })]
    );
    assert_eq!(state.sandbox(id).expect("kept").state, SandboxState::Paused);

    assert_eq!(expire(&mut state, id, 100, 120), vec![ItemOutcome::Applied]);
    let sandbox = state.sandbox(id).expect("kept as a record");
    match &sandbox.state {
        SandboxState::Failed { reason } => assert_eq!(
            reason,
            "its snapshot was kept for 100 ms ([scheduler.sessions] snapshot_retention_ms) \
             and deleted"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(sandbox.finished_ms, Some(120));
    assert!(sandbox.snapshot.is_none());
    assert!(state.node("n1").expect("node").snapshots.is_empty());
    let tenant = &state.tenants()["t"];
    assert_eq!((tenant.active_sandboxes, tenant.paused_sandboxes), (0, 0));
    assert!(state.snapshots_older(1 << 40, of_t, 10).is_empty());
    assert!(matches!(
        expire(&mut state, id, 100, 130)[..],
        [ItemOutcome::Rejected(Rejection::InvalidTransition { .. })]
    ));
}

#[test]
fn a_sandbox_resumed_after_the_leader_picked_it_is_refused_and_stays() {
    let (mut state, id) = paused();
    let picked = state.snapshots_older(1_000, |_| 100, 10);
    assert_eq!(picked, vec![(id, 100)]);
    let resume = Command::ResumeSandboxes { items: vec![id] };
    assert_eq!(
        apply_checked(&mut state, &resume, 1_000),
        vec![ItemOutcome::Applied]
    );
    assert!(
        state.snapshots_older(2_000, |_| 100, 10).is_empty(),
        "a resuming sandbox's snapshot is not expired"
    );
    assert!(matches!(
        expire(&mut state, id, 100, 1_001)[..],
        [ItemOutcome::Rejected(Rejection::InvalidTransition {
            state: "pending",
            ..
        })]
    ));
    let sandbox = state.sandbox(id).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Pending);
    assert!(sandbox.snapshot.is_some(), "it resumes from its snapshot");
    assert!(state.node("n1").expect("node").snapshots.contains(&id));
    assert!(matches!(
        expire(&mut state, SandboxId(999), 100, 1_002)[..],
        [ItemOutcome::Rejected(Rejection::UnknownSandbox(_))]
    ));
}

#[test]
fn looking_for_old_snapshots_costs_nothing_while_none_is_paused() {
    let (state, _) = running_on(gpu_node("n1", GpuModel::H100, 4), cpu_only(), &[]);
    let older = state.snapshots_older(u64::MAX, |_| panic!("no paused sandbox to ask about"), 10);
    assert!(older.is_empty());
}

#[test]
fn a_paused_sandbox_past_its_idle_limit_ends_even_without_a_retention() {
    let (mut state, id) = running_on(
        gpu_node("n1", GpuModel::H100, 4),
        SandboxSpec {
            idle_timeout_ms: 50,
            keep_alive: true,
            ..cpu_only()
        },
        &[],
    );
    pause(&mut state, id, false);
    let change = StatusChange::Paused {
        bytes: 4096,
        mode: SnapshotMode::Memory,
    };
    report(&mut state, id, change, 20);
    // Paused time counts toward idle: 50 ms after the pause it is due, retention or not.
    assert!(state.snapshots_older(69, |_| 0, 10).is_empty());
    assert_eq!(state.snapshots_older(70, |_| 0, 10), vec![(id, 0)]);
    assert_eq!(expire(&mut state, id, 0, 70), vec![ItemOutcome::Applied]);
    let s = state.sandbox(id).expect("kept");
    let SandboxState::Failed { reason } = &s.state else {
        panic!("{:?}", s.state)
    };
    assert!(reason.contains("idle_timeout_ms = 50"), "{reason}");
    assert!(state.node("n1").expect("n1").snapshots.is_empty());
}
