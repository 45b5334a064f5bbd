//! Pause and resume in the state machine: a paused sandbox holds nothing on its node, its
//! snapshot is indexed on the node that holds it, resume goes through placement again, and
//! GPU sandboxes are refused unless the filesystem-only pause is allowed. Each apply is
//! invariant-checked.

use berth_proto::GpuModel;

use super::*;
use crate::model::{NodeSpec, NodeStatus, SandboxSpec, SandboxState, SnapshotMode};
use crate::testing::{apply_checked, gpu_node, placement, spec, submit};

/// Node n1 (4 H100s, 8 cores, 16 GiB) running one sandbox of `spec`, bound with `gpus`.
fn running(spec: SandboxSpec, gpus: &[u32]) -> (State, SandboxId) {
    running_on(gpu_node("n1", GpuModel::H100, 4), spec, gpus)
}

/// Node n1 as `node` says, running one sandbox of `spec`, bound with `gpus`.
pub(super) fn running_on(node: NodeSpec, spec: SandboxSpec, gpus: &[u32]) -> (State, SandboxId) {
    let mut state = State::new();
    apply_checked(&mut state, &Command::RegisterNode { spec: node }, 0);
    let milli = if gpus.is_empty() { 0 } else { 1000 };
    let out = apply_checked(
        &mut state,
        &submit("r1", spec, Some(placement("n1", 1, gpus, milli))),
        1,
    );
    let [
        ItemOutcome::Created {
            id, bound: true, ..
        },
    ] = out[..]
    else {
        panic!("{out:?}");
    };
    report(&mut state, id, StatusChange::Running, 2);
    (state, id)
}

pub(super) fn report(
    state: &mut State,
    id: SandboxId,
    change: StatusChange,
    now_ms: u64,
) -> Vec<ItemOutcome> {
    let items = vec![StatusUpdate {
        sandbox: id,
        node: "n1".into(),
        change,
    }];
    apply_checked(state, &Command::UpdateSandboxes { items }, now_ms)
}

pub(super) fn pause(state: &mut State, id: SandboxId, fs_only: bool) -> Vec<ItemOutcome> {
    let cmd = Command::PauseSandboxes {
        items: vec![id],
        gpu_filesystem_only: fs_only,
    };
    apply_checked(state, &cmd, 10)
}

fn paused_report(bytes: u64) -> StatusChange {
    StatusChange::Paused {
        bytes,
        mode: SnapshotMode::Memory,
    }
}

pub(super) fn cpu_only() -> SandboxSpec {
    spec(&[])
}

#[test]
fn a_paused_sandbox_releases_its_node_and_resumes_through_placement() {
    let (mut state, id) = running(cpu_only(), &[]);
    assert_eq!(pause(&mut state, id, false), vec![ItemOutcome::Applied]);
    let node = state.node("n1").expect("node");
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Pausing
    );
    assert_eq!(
        node.cpu_milli_allocated, 1000,
        "pausing still holds its CPU"
    );

    assert_eq!(
        report(&mut state, id, paused_report(4096), 20),
        vec![ItemOutcome::Applied]
    );
    let sandbox = state.sandbox(id).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Paused);
    assert!(sandbox.binding.is_none());
    let snap = sandbox.snapshot.as_ref().expect("snapshot recorded");
    assert_eq!(
        (snap.node.as_str(), snap.bytes, snap.taken_ms),
        ("n1", 4096, 20)
    );
    let node = state.node("n1").expect("node");
    assert_eq!(
        (node.cpu_milli_allocated, node.memory_mib_allocated),
        (0, 0)
    );
    assert!(node.sandboxes.is_empty());
    assert!(node.snapshots.contains(&id));
    let tenant = &state.tenants()["t"];
    assert_eq!((tenant.active_sandboxes, tenant.paused_sandboxes), (0, 1));

    let resume = Command::ResumeSandboxes { items: vec![id] };
    assert_eq!(
        apply_checked(&mut state, &resume, 30),
        vec![ItemOutcome::Applied]
    );
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Pending
    );
    assert_eq!(
        state.pending().len(),
        1,
        "a resumed sandbox is placed again"
    );
    let epoch = state.node("n1").expect("node").epoch;
    let bind = Command::BindSandboxes {
        items: vec![(id, placement("n1", epoch, &[], 0))],
    };
    assert_eq!(
        apply_checked(&mut state, &bind, 31),
        vec![ItemOutcome::Applied]
    );
    assert!(
        state.sandbox(id).expect("kept").snapshot.is_some(),
        "the snapshot stays until it runs again"
    );
    report(&mut state, id, StatusChange::Running, 40);
    let sandbox = state.sandbox(id).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Running);
    assert!(sandbox.snapshot.is_none());
    assert!(state.node("n1").expect("node").snapshots.is_empty());
    let tenant = &state.tenants()["t"];
    assert_eq!((tenant.active_sandboxes, tenant.paused_sandboxes), (1, 0));
}

#[test]
fn a_gpu_sandbox_is_refused_unless_filesystem_only_is_allowed() {
    let (mut state, id) = running(spec(&["H100"]), &[0]);
    assert_eq!(
        pause(&mut state, id, false),
        vec![ItemOutcome::Rejected(Rejection::GpuPause(id))]
    );
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Running
    );
    assert_eq!(pause(&mut state, id, true), vec![ItemOutcome::Applied]);
    let fs_only = StatusChange::Paused {
        bytes: 1,
        mode: SnapshotMode::FilesystemOnly,
    };
    report(&mut state, id, fs_only, 20);
    assert_eq!(
        state.node("n1").expect("node").gpu_milli_allocated,
        vec![0; 4]
    );
    assert!(state.tenants()["t"].gpu_milli_by_model.is_empty());
}

#[test]
fn deleting_a_paused_sandbox_forgets_its_snapshot() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(1), 20);
    let delete = Command::DeleteSandboxes { items: vec![id] };
    assert_eq!(
        apply_checked(&mut state, &delete, 30),
        vec![ItemOutcome::Applied]
    );
    assert!(state.sandbox(id).is_none());
    assert!(state.node("n1").expect("node").snapshots.is_empty());
    let tenant = &state.tenants()["t"];
    assert_eq!((tenant.active_sandboxes, tenant.paused_sandboxes), (0, 0));
}

#[test]
fn only_running_sandboxes_pause_and_only_paused_ones_resume() {
    let (mut state, id) = running(cpu_only(), &[]);
    let resume = Command::ResumeSandboxes { items: vec![id] };
    assert_eq!(
        apply_checked(&mut state, &resume, 5),
        vec![ItemOutcome::Applied],
        "resuming a running sandbox is a no-op"
    );
    report(&mut state, id, StatusChange::Exited { code: 0 }, 6);
    assert!(matches!(
        pause(&mut state, id, false)[..],
        [ItemOutcome::Rejected(Rejection::InvalidTransition { .. })]
    ));
    assert!(matches!(
        apply_checked(&mut state, &resume, 7)[..],
        [ItemOutcome::Rejected(Rejection::InvalidTransition { .. })]
    ));
}

#[test]
fn resume_checks_the_concurrency_quota_again() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(1), 20);
    let quota = Command::SetTenantQuota {
        tenant: "t".into(),
        quota: crate::model::TenantQuota {
            max_concurrent_sandboxes: Some(1),
            ..Default::default()
        },
    };
    apply_checked(&mut state, &quota, 21);
    let other = submit("r2", cpu_only(), None);
    assert!(
        matches!(
            apply_checked(&mut state, &other, 22)[..],
            [ItemOutcome::Created { .. }]
        ),
        "a paused sandbox does not count as active"
    );
    let resume = Command::ResumeSandboxes { items: vec![id] };
    assert!(matches!(
        apply_checked(&mut state, &resume, 23)[..],
        [ItemOutcome::Rejected(Rejection::ConcurrencyQuota {
            max: 1,
            ..
        })]
    ));
    assert_eq!(state.sandbox(id).expect("kept").state, SandboxState::Paused);
}

#[test]
fn an_agent_that_returns_without_a_snapshot_loses_the_sandbox() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(1), 20);
    let kept = Command::RegisterAgent {
        spec: gpu_node("n1", GpuModel::H100, 4),
        has: [(id, paused_report(1))].into(),
    };
    apply_checked(&mut state, &kept, 30);
    assert_eq!(state.sandbox(id).expect("kept").state, SandboxState::Paused);

    let wiped = Command::RegisterAgent {
        spec: gpu_node("n1", GpuModel::H100, 4),
        has: Default::default(),
    };
    apply_checked(&mut state, &wiped, 40);
    assert!(matches!(
        &state.sandbox(id).expect("kept").state,
        SandboxState::Lost { reason } if reason.contains("without its snapshot")
    ));
    assert!(state.node("n1").expect("node").snapshots.is_empty());
}

#[test]
fn a_checkpoint_finished_while_the_agent_was_away_is_recorded_at_registration() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    let back = Command::RegisterAgent {
        spec: gpu_node("n1", GpuModel::H100, 4),
        has: [(id, paused_report(7))].into(),
    };
    apply_checked(&mut state, &back, 30);
    let sandbox = state.sandbox(id).expect("kept");
    assert_eq!(sandbox.state, SandboxState::Paused);
    assert_eq!(sandbox.snapshot.as_ref().map(|s| s.bytes), Some(7));
    assert_eq!(state.node("n1").expect("node").cpu_milli_allocated, 0);
}

#[test]
fn removing_the_node_that_holds_a_snapshot_loses_the_sandbox() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(1), 20);
    let remove = Command::RemoveNode { node: "n1".into() };
    assert_eq!(
        apply_checked(&mut state, &remove, 30),
        vec![ItemOutcome::Applied]
    );
    assert!(matches!(
        &state.sandbox(id).expect("kept").state,
        SandboxState::Lost { reason } if reason.contains("held its snapshot")
    ));
}

/// A paused sandbox resumed: Pending with its snapshot on n1, where n2 (another node with
/// room) also is.
fn resumed_with_a_second_node() -> (State, SandboxId) {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(4096), 20);
    let other: NodeSpec = gpu_node("n2", GpuModel::H100, 4);
    apply_checked(&mut state, &Command::RegisterNode { spec: other }, 21);
    let resume = Command::ResumeSandboxes { items: vec![id] };
    apply_checked(&mut state, &resume, 30);
    (state, id)
}

fn bind_to(state: &mut State, id: SandboxId, node: &str) {
    let epoch = state.node(node).expect("node").epoch;
    let bind = Command::BindSandboxes {
        items: vec![(id, placement(node, epoch, &[], 0))],
    };
    assert_eq!(apply_checked(state, &bind, 31), vec![ItemOutcome::Applied]);
}

#[test]
fn a_resume_bind_says_whether_snapshot_affinity_was_hit_and_why_not() {
    let (mut state, id) = resumed_with_a_second_node();
    bind_to(&mut state, id, "n1");
    assert_eq!(
        state.sandbox(id).expect("kept").placement_note.as_deref(),
        Some("snapshot affinity hit: restored on n1, the node holding its snapshot")
    );

    let (mut state, id) = resumed_with_a_second_node();
    let cordon = Command::SetNodeStatus {
        node: "n1".into(),
        status: NodeStatus::Cordoned,
        reason: "test".into(),
    };
    apply_checked(&mut state, &cordon, 30);
    bind_to(&mut state, id, "n2");
    assert_eq!(
        state.sandbox(id).expect("kept").placement_note.as_deref(),
        Some(
            "snapshot affinity missed: its snapshot is on n1, and that node is cordoned; n2 \
             fetches it"
        )
    );
    // It runs on n2: n1 lets its copy go.
    let items = vec![StatusUpdate {
        sandbox: id,
        node: "n2".into(),
        change: StatusChange::Running,
    }];
    apply_checked(&mut state, &Command::UpdateSandboxes { items }, 40);
    assert!(state.node("n1").expect("n1").snapshots.is_empty());
    assert!(state.sandbox(id).expect("kept").snapshot.is_none());
}

#[test]
fn a_failed_pause_puts_the_sandbox_back_to_running_and_a_plain_report_does_not() {
    let (mut state, id) = running(cpu_only(), &[]);
    pause(&mut state, id, false);
    // An agent re-sending where things stand (after a reconnect) leaves the pause asked.
    report(&mut state, id, StatusChange::Running, 11);
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Pausing
    );
    let failed = StatusChange::PauseFailed {
        reason: "runsc checkpoint failed".into(),
    };
    assert_eq!(
        report(&mut state, id, failed, 12),
        vec![ItemOutcome::Applied]
    );
    assert_eq!(
        state.sandbox(id).expect("kept").state,
        SandboxState::Running
    );
    assert_eq!(state.node("n1").expect("n1").cpu_milli_allocated, 1000);
}

#[test]
fn a_sandbox_on_a_process_runtime_node_cannot_pause() {
    let mut node: NodeSpec = gpu_node("n1", GpuModel::H100, 4);
    node.runtime = "process".into();
    let (mut state, id) = running_on(node, cpu_only(), &[]);
    assert_eq!(
        pause(&mut state, id, false),
        vec![ItemOutcome::Rejected(Rejection::NoCheckpoint(
            id,
            "n1".into()
        ))]
    );
}

#[test]
fn the_snapshot_records_the_runtime_that_took_it() {
    let mut node: NodeSpec = gpu_node("n1", GpuModel::H100, 4);
    node.runtime = "gvisor/0.0~20221219.0/ptrace".into();
    let (mut state, id) = running_on(node, cpu_only(), &[]);
    pause(&mut state, id, false);
    report(&mut state, id, paused_report(1), 20);
    let snap = state
        .sandbox(id)
        .expect("kept")
        .snapshot
        .clone()
        .expect("snapshot");
    assert_eq!(snap.runtime, "gvisor/0.0~20221219.0/ptrace");
}

#[test]
fn a_pause_past_the_nodes_snapshot_budget_is_refused_until_room_is_made() {
    let mut node = NodeSpec::simple("n1", 8000, 16384, vec![]);
    // Room for one 1 GiB sandbox's checkpoint and a little more.
    node.snapshot_budget_bytes = (1 << 30) + (256 << 20);
    let (mut state, first) = running_on(node, cpu_only(), &[]);
    let epoch = state.node("n1").expect("n1").epoch;
    let out = apply_checked(
        &mut state,
        &submit("r2", cpu_only(), Some(placement("n1", epoch, &[], 0))),
        3,
    );
    let [ItemOutcome::Created { id: second, .. }] = out[..] else {
        panic!("{out:?}");
    };
    report(&mut state, second, StatusChange::Running, 4);
    // The first pause is under way and promised its memory: no room for the second.
    assert_eq!(pause(&mut state, first, false), vec![ItemOutcome::Applied]);
    let out = pause(&mut state, second, false);
    let [ItemOutcome::Rejected(r @ Rejection::SnapshotBudget { used, need, .. })] = &out[..] else {
        panic!("{out:?}");
    };
    assert_eq!((*used, *need), (1 << 30, 1 << 30));
    assert!(r.to_string().contains("snapshot_disk_budget_bytes"), "{r}");
    assert_eq!(
        state.sandbox(second).expect("kept").state,
        SandboxState::Running,
        "a refused pause changes nothing"
    );
    // Taken, the first snapshot is its real size (small): now there is room.
    report(&mut state, first, paused_report(64 << 20), 5);
    assert_eq!(pause(&mut state, second, false), vec![ItemOutcome::Applied]);
}
