//! Standby in the state machine: a frozen sandbox keeps its memory on its node and gives
//! back its CPU; a resume thaws it on the same node when the CPU is free there (and tells
//! its agent with a new assignment); it may be paused to disk from standby; the leader
//! finds those frozen long enough; a registration's report stands. Each apply is
//! invariant-checked.

use super::tests_pause::{cpu_only, pause, report, running_on};
use super::*;
use crate::model::{NodeSpec, SandboxState};
use crate::testing::{apply_checked, placement, submit};

/// Node n1 with 2 cores and 8 GiB, running one sandbox of 1 core and 1 GiB.
fn running_small() -> (State, SandboxId) {
    running_on(NodeSpec::simple("n1", 2000, 8192, vec![]), cpu_only(), &[])
}

fn standby(state: &mut State, id: SandboxId, now_ms: u64) -> Vec<ItemOutcome> {
    apply_checked(
        state,
        &Command::StandbySandboxes { items: vec![id] },
        now_ms,
    )
}

fn resume(state: &mut State, id: SandboxId, now_ms: u64) -> Vec<ItemOutcome> {
    apply_checked(state, &Command::ResumeSandboxes { items: vec![id] }, now_ms)
}

fn held(state: &State) -> (u64, u64) {
    let node = state.node("n1").expect("n1");
    (node.cpu_milli_allocated, node.memory_mib_allocated)
}

/// Takes 1 core of n1 with another sandbox (request id `name`); its id.
fn fill(state: &mut State, name: &str) -> SandboxId {
    let epoch = state.node("n1").expect("n1").epoch;
    let out = apply_checked(
        state,
        &submit(name, cpu_only(), Some(placement("n1", epoch, &[], 0))),
        5,
    );
    let [
        ItemOutcome::Created {
            id, bound: true, ..
        },
    ] = out[..]
    else {
        panic!("{out:?}");
    };
    id
}

#[test]
fn standby_gives_back_cpu_keeps_memory_and_thaws_on_the_same_node() {
    let (mut state, id) = running_small();
    assert_eq!(held(&state), (1000, 1024));
    assert_eq!(standby(&mut state, id, 10), vec![ItemOutcome::Applied]);
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Standby { since_ms: 10 }
    );
    assert_eq!(held(&state), (0, 1024), "standby holds memory, not CPU");
    assert!(state.node("n1").expect("n1").standby.contains(&id));
    // A repeat does nothing; the agent's own report of it is an acknowledgement.
    assert_eq!(standby(&mut state, id, 11), vec![ItemOutcome::Applied]);
    report(&mut state, id, StatusChange::Standby, 12);
    report(&mut state, id, StatusChange::Running, 13);
    assert!(matches!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Standby { .. }
    ));
    let bound_before = state.sandbox(id).and_then(|s| s.binding.clone());

    assert_eq!(resume(&mut state, id, 20), vec![ItemOutcome::Applied]);
    let sandbox = state.sandbox(id).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Scheduled);
    let binding = sandbox.binding.as_ref().expect("still bound");
    let before = bound_before.expect("bound");
    assert_eq!(
        binding.placement, before.placement,
        "the same node and GPUs"
    );
    assert!(
        binding.bound_revision > before.bound_revision,
        "a new assignment tells the agent to thaw it"
    );
    assert!(
        sandbox
            .placement_note
            .as_deref()
            .is_some_and(|n| n.contains("thawed from standby on n1")),
        "{:?}",
        sandbox.placement_note
    );
    assert_eq!(held(&state), (1000, 1024));
    assert!(state.node("n1").expect("n1").standby.is_empty());
    report(&mut state, id, StatusChange::Running, 21);
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Running
    );
}

#[test]
fn a_thaw_needs_the_cpu_free_on_its_node_and_a_pause_from_standby_takes_it_back() {
    let (mut state, id) = running_small();
    standby(&mut state, id, 10);
    let filler = fill(&mut state, "f1");
    let other = fill(&mut state, "f2");
    assert_eq!(held(&state), (2000, 3072));
    let out = resume(&mut state, id, 20);
    let [ItemOutcome::Rejected(Rejection::NoRoomToThaw { free, need, .. })] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!((*free, *need), (0, 1000));
    assert!(matches!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Standby { .. }
    ));
    let out = pause(&mut state, id, false);
    assert!(
        matches!(
            out[..],
            [ItemOutcome::Rejected(Rejection::NoRoomToThaw { .. })]
        ),
        "{out:?}"
    );

    // Room again: a pause from standby holds its CPU while the checkpoint is taken.
    apply_checked(
        &mut state,
        &Command::DeleteSandboxes {
            items: vec![filler, other],
        },
        30,
    );
    assert_eq!(pause(&mut state, id, false), vec![ItemOutcome::Applied]);
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Pausing
    );
    assert_eq!(held(&state), (1000, 1024));
}

#[test]
fn the_leader_finds_sandboxes_on_standby_long_enough() {
    let (mut state, id) = running_small();
    assert!(state.standby_over(100_000, 15_000, 10).is_empty());
    standby(&mut state, id, 1_000);
    assert!(state.standby_over(15_999, 15_000, 10).is_empty());
    assert_eq!(state.standby_over(16_000, 15_000, 10), vec![id]);
    assert!(state.standby_over(16_000, 15_000, 0).is_empty());
}

#[test]
fn a_failed_freeze_runs_on_when_its_cpu_is_free_and_fails_when_it_is_not() {
    let (mut state, id) = running_small();
    standby(&mut state, id, 10);
    let failed = StatusChange::PauseFailed {
        reason: "no freezer".into(),
    };
    report(&mut state, id, failed.clone(), 11);
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Running
    );
    assert_eq!(held(&state), (1000, 1024));

    standby(&mut state, id, 20);
    fill(&mut state, "f1");
    fill(&mut state, "f2");
    report(&mut state, id, failed, 21);
    let sandbox = state.sandbox(id).expect("kept");
    let SandboxState::Failed { reason } = &sandbox.state else {
        panic!("{:?}", sandbox.state);
    };
    assert!(
        reason.contains("could not be frozen (no freezer)"),
        "{reason}"
    );
    assert!(state.node("n1").expect("n1").standby.is_empty());
}

#[test]
fn a_registration_lets_the_agents_standby_report_stand() {
    let (mut state, id) = running_small();
    standby(&mut state, id, 10);
    let spec = state.node("n1").expect("n1").spec.clone();
    // The node goes down and comes back with the sandbox still frozen.
    apply_checked(
        &mut state,
        &Command::NodeDisconnected {
            node: "n1".into(),
            reason: "silent".into(),
            grace_ms: 60_000,
        },
        20,
    );
    assert!(matches!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Unknown { .. }
    ));
    assert_eq!(held(&state), (0, 1024), "Unknown keeps what standby held");
    let has = BTreeMap::from([(id, StatusChange::Standby)]);
    apply_checked(&mut state, &Command::RegisterAgent { spec, has }, 30);
    assert!(matches!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Standby { .. }
    ));
    assert_eq!(held(&state), (0, 1024));

    // An agent that comes back without it loses it.
    let spec = state.node("n1").expect("n1").spec.clone();
    let has = BTreeMap::new();
    apply_checked(&mut state, &Command::RegisterAgent { spec, has }, 40);
    assert!(matches!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Lost { .. }
    ));
    assert_eq!(held(&state), (0, 0));
    assert!(state.node("n1").expect("n1").standby.is_empty());
}
