//! Transitions of the state machine, each followed by a full invariant check.

use berth_proto::GpuModel;

use super::*;
use crate::model::{NodeStatus, SandboxState, TenantQuota};
use crate::testing::{apply_checked, gpu_node, placement, spec, submit};

fn created(out: &[ItemOutcome]) -> (SandboxId, bool) {
    match out {
        [ItemOutcome::Created { id, bound, .. }] => (*id, *bound),
        other => panic!("expected one Created, got {other:?}"),
    }
}

fn with_node(model: GpuModel, count: u32) -> State {
    let mut state = State::new();
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", model, count),
        },
        0,
    );
    state
}

#[test]
fn a_plan_that_overcommits_a_gpu_is_rejected() {
    let mut state = with_node(GpuModel::H100, 1);
    let (a, bound) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["H100"]), Some(placement("n1", 1, &[0], 1000))),
        1,
    ));
    assert!(bound);
    // A second plan made against a stale view claims the same GPU.
    let out = apply_checked(
        &mut state,
        &submit("b", spec(&["H100"]), Some(placement("n1", 1, &[0], 1000))),
        2,
    );
    let ItemOutcome::Created {
        id: b,
        bound: false,
        bind_rejected: Some(why),
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(
        why.to_string(),
        "node n1 GPU 0: has 0 milli free; the sandbox needs 1000"
    );
    assert_eq!(
        state.sandbox(*b).map(|s| &s.state),
        Some(&SandboxState::Pending)
    );
    assert_eq!(
        state.node("n1").map(|n| n.gpu_milli_allocated.clone()),
        Some(vec![1000])
    );
    assert_eq!(
        state.sandbox(a).map(|s| &s.state),
        Some(&SandboxState::Scheduled)
    );

    // Shares stack up to 1000 milli and no further.
    let mut state = with_node(GpuModel::T4, 1);
    let share = || spec(&["T4:600m"]);
    assert!(
        created(&apply_checked(
            &mut state,
            &submit("x", share(), Some(placement("n1", 1, &[0], 600))),
            1
        ))
        .1
    );
    let out = apply_checked(
        &mut state,
        &submit("y", share(), Some(placement("n1", 1, &[0], 600))),
        2,
    );
    assert!(
        matches!(
            &out[0],
            ItemOutcome::Created {
                bound: false,
                bind_rejected: Some(Rejection::Gpu { .. }),
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn plans_that_do_not_match_the_request_are_rejected() {
    let mut state = with_node(GpuModel::H200, 2);
    let cases = [
        (
            spec(&["H100!"]),
            placement("n1", 1, &[0], 1000),
            "is a H200, which H100! does not accept",
        ),
        (
            spec(&["H100:2"]),
            placement("n1", 1, &[0], 1000),
            "1 GPUs given; H100:2 asks for 2",
        ),
        (
            spec(&["H200:2"]),
            placement("n1", 1, &[0, 0], 1000),
            "listed twice",
        ),
        (
            spec(&["H200"]),
            placement("n1", 1, &[5], 1000),
            "does not exist",
        ),
        (
            spec(&["H200"]),
            placement("n1", 1, &[0], 500),
            "500 milli per GPU given",
        ),
        (
            spec(&["H200"]),
            placement("n1", 7, &[0], 1000),
            "epoch 1; the placement was made for epoch 7",
        ),
        (
            spec(&[]),
            placement("n1", 1, &[0], 1000),
            "a CPU-only sandbox was given GPUs",
        ),
    ];
    for (i, (spec, plan, message)) in cases.into_iter().enumerate() {
        let out = apply_checked(&mut state, &submit(&format!("r{i}"), spec, Some(plan)), 1);
        let ItemOutcome::Created {
            bind_rejected: Some(why),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        assert!(
            why.to_string().contains(message),
            "{why} should contain {message:?}"
        );
    }
    // An upgrade without '!' is legal for the state machine (placement decides whether to).
    assert!(
        created(&apply_checked(
            &mut state,
            &submit("up", spec(&["H100"]), Some(placement("n1", 1, &[1], 1000))),
            1
        ))
        .1
    );
}

#[test]
fn request_ids_make_creates_idempotent() {
    let mut state = with_node(GpuModel::L4, 1);
    let (first, _) = created(&apply_checked(
        &mut state,
        &submit("same", spec(&["L4"]), None),
        1,
    ));
    let again = apply_checked(
        &mut state,
        &submit("same", spec(&["L4"]), Some(placement("n1", 1, &[0], 1000))),
        2,
    );
    assert_eq!(again, [ItemOutcome::Duplicate { id: first }]);
    assert_eq!(state.sandboxes().len(), 1);
    // Another tenant may use the same request id.
    let mut other = spec(&["L4"]);
    other.tenant = "u".into();
    assert!(matches!(
        apply_checked(&mut state, &submit("same", other, None), 3)[0],
        ItemOutcome::Created { .. }
    ));
}

#[test]
fn a_down_node_loses_its_sandboxes_and_must_reregister() {
    let mut state = with_node(GpuModel::A10, 2);
    let (id, _) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["A10"]), Some(placement("n1", 1, &[1], 1000))),
        1,
    ));
    let down = Command::SetNodeStatus {
        node: "n1".into(),
        status: NodeStatus::Down,
        reason: "heartbeat ttl".into(),
    };
    apply_checked(&mut state, &down, 5);
    let sandbox = state.sandbox(id).expect("kept");
    assert!(
        matches!(&sandbox.state, SandboxState::Lost { reason } if reason.contains("node n1 is down"))
    );
    assert_eq!(
        state.node("n1").map(|n| n.gpu_milli_allocated.clone()),
        Some(vec![0, 0])
    );
    // Not ready again without a new registration, and plans for the old epoch are stale.
    let ready = Command::SetNodeStatus {
        node: "n1".into(),
        status: NodeStatus::Ready,
        reason: String::new(),
    };
    assert_eq!(
        apply_checked(&mut state, &ready, 6),
        [ItemOutcome::Rejected(Rejection::MustReregister(
            "n1".into()
        ))]
    );
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", GpuModel::A10, 2),
        },
        7,
    );
    // The epoch is the revision of the registration (the 5th command).
    assert_eq!(
        state.node("n1").map(|n| (n.epoch, n.status)),
        Some((5, NodeStatus::Ready))
    );
    let out = apply_checked(
        &mut state,
        &submit("b", spec(&["A10"]), Some(placement("n1", 1, &[0], 1000))),
        8,
    );
    assert!(
        matches!(
            &out[0],
            ItemOutcome::Created {
                bind_rejected: Some(Rejection::StaleEpoch { .. }),
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn reregistering_keeps_what_still_fits() {
    let mut state = with_node(GpuModel::L4, 2);
    let (kept, _) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["L4"]), Some(placement("n1", 1, &[0], 1000))),
        1,
    ));
    let (lost, _) = created(&apply_checked(
        &mut state,
        &submit("b", spec(&["L4"]), Some(placement("n1", 1, &[1], 1000))),
        1,
    ));
    // The node comes back with one GPU fewer.
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", GpuModel::L4, 1),
        },
        2,
    );
    assert_eq!(
        state.sandbox(kept).map(|s| s.state.name()),
        Some("scheduled")
    );
    assert_eq!(state.sandbox(lost).map(|s| s.state.name()), Some("lost"));
}

#[test]
fn an_agent_registering_without_a_running_sandbox_loses_it_and_keeps_the_rest() {
    let mut state = with_node(GpuModel::L4, 3);
    let mut make = |key: &str, gpu: u32| {
        created(&apply_checked(
            &mut state,
            &submit(key, spec(&["L4"]), Some(placement("n1", 1, &[gpu], 1000))),
            1,
        ))
        .0
    };
    let (gone, kept, queued) = (make("a", 0), make("b", 1), make("c", 2));
    let running = Command::UpdateSandboxes {
        items: [gone, kept]
            .into_iter()
            .map(|id| StatusUpdate {
                sandbox: id,
                node: "n1".into(),
                change: StatusChange::Running,
            })
            .collect(),
    };
    apply_checked(&mut state, &running, 2);
    // The agent restarted with only `kept`; `queued` was never started, so it is still
    // waiting to be assigned.
    apply_checked(
        &mut state,
        &Command::RegisterAgent {
            spec: gpu_node("n1", GpuModel::L4, 3),
            has: [(kept, StatusChange::Running)].into(),
        },
        3,
    );
    let state_of = |id| state.sandbox(id).map(|s| s.state.clone());
    assert_eq!(
        state_of(gone),
        Some(SandboxState::Lost {
            reason: "the agent on n1 restarted without it".into()
        })
    );
    assert_eq!(state_of(kept), Some(SandboxState::Running));
    assert_eq!(state_of(queued).map(|s| s.name()), Some("scheduled"));
    // The lost sandbox's GPU is free again; the others' are held.
    let node = state.node("n1").expect("node");
    assert_eq!(node.gpu_milli_allocated, [0, 1000, 1000]);
}

#[test]
fn status_updates_run_to_completion_and_release() {
    let mut state = with_node(GpuModel::T4, 1);
    let (id, _) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["T4:500m"]), Some(placement("n1", 1, &[0], 500))),
        1,
    ));
    let update = |change| Command::UpdateSandboxes {
        items: vec![StatusUpdate {
            sandbox: id,
            node: "n1".into(),
            change,
        }],
    };
    let wrong_node = Command::UpdateSandboxes {
        items: vec![StatusUpdate {
            sandbox: id,
            node: "n2".into(),
            change: StatusChange::Running,
        }],
    };
    assert!(matches!(
        apply_checked(&mut state, &wrong_node, 2)[0],
        ItemOutcome::Rejected(Rejection::NotBoundHere { .. })
    ));
    apply_checked(&mut state, &update(StatusChange::Running), 3);
    assert_eq!(state.sandbox(id).and_then(|s| s.started_ms), Some(3));
    apply_checked(&mut state, &update(StatusChange::Exited { code: 3 }), 9);
    assert_eq!(
        state.sandbox(id).map(|s| s.state.clone()),
        Some(SandboxState::Exited { code: 3 })
    );
    assert_eq!(
        state.node("n1").map(|n| n.gpu_milli_allocated.clone()),
        Some(vec![0])
    );
    assert!(matches!(
        apply_checked(&mut state, &update(StatusChange::Running), 10)[0],
        ItemOutcome::Rejected(Rejection::InvalidTransition { .. })
    ));
    // Expiry forgets it, and its request id.
    apply_checked(
        &mut state,
        &Command::ExpireTerminal {
            finished_before_ms: 10,
        },
        11,
    );
    assert!(state.sandbox(id).is_none());
    assert!(state.by_request_id("t", "a").is_none());
}

#[test]
fn quotas_are_enforced_at_submit_and_bind() {
    let mut state = with_node(GpuModel::H100, 8);
    let quota = TenantQuota {
        max_concurrent_sandboxes: Some(2),
        max_gpu_milli_per_model: [(GpuModel::H100.into(), 1000)].into(),
    };
    apply_checked(
        &mut state,
        &Command::SetTenantQuota {
            tenant: "t".into(),
            quota,
        },
        0,
    );
    assert!(
        created(&apply_checked(
            &mut state,
            &submit("a", spec(&["H100"]), Some(placement("n1", 1, &[0], 1000))),
            1
        ))
        .1
    );
    let out = apply_checked(
        &mut state,
        &submit("b", spec(&["H100"]), Some(placement("n1", 1, &[1], 1000))),
        2,
    );
    assert!(
        matches!(
            &out[0],
            ItemOutcome::Created {
                bound: false,
                bind_rejected: Some(Rejection::GpuQuota { .. }),
                ..
            }
        ),
        "{out:?}"
    );
    let out = apply_checked(&mut state, &submit("c", spec(&[]), None), 3);
    assert_eq!(
        out,
        [ItemOutcome::Rejected(Rejection::ConcurrencyQuota {
            tenant: "t".into(),
            max: 2
        })]
    );
}

#[test]
fn invalid_specs_name_the_field() {
    let mut state = State::new();
    let mut bad = spec(&[]);
    bad.cpu_milli = 0;
    bad.tenant = "Bad Tenant".into();
    let out = apply_checked(&mut state, &submit("a", bad, None), 1);
    let [ItemOutcome::Rejected(Rejection::InvalidSpec(errors))] = out.as_slice() else {
        panic!("{out:?}")
    };
    let message = errors.one_line();
    assert!(
        message.contains("spec.tenant:")
            && message.contains("spec.resources.cpu_milli: 0 is outside"),
        "{message}"
    );
    assert!(state.sandboxes().is_empty());
}

#[test]
fn deleting_releases_and_removing_needs_an_empty_node() {
    let mut state = with_node(GpuModel::L40S, 1);
    let (id, _) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["L40S"]), Some(placement("n1", 1, &[0], 1000))),
        1,
    ));
    let remove = Command::RemoveNode { node: "n1".into() };
    assert!(matches!(
        apply_checked(&mut state, &remove, 2)[0],
        ItemOutcome::Rejected(Rejection::NodeNotEmpty { count: 1, .. })
    ));
    apply_checked(&mut state, &Command::DeleteSandboxes { items: vec![id] }, 3);
    assert_eq!(
        apply_checked(&mut state, &remove, 4),
        [ItemOutcome::Applied]
    );
    assert!(state.nodes().is_empty());
}

#[test]
fn snapshots_round_trip_and_refuse_garbage() {
    let mut state = with_node(GpuModel::B200, 8);
    apply_checked(
        &mut state,
        &submit(
            "a",
            spec(&["B200:4"]),
            Some(placement("n1", 1, &[0, 1, 2, 3], 1000)),
        ),
        1,
    );
    apply_checked(&mut state, &submit("b", spec(&["B200"]), None), 2);
    let bytes = state.snapshot();
    assert_eq!(State::restore(&bytes).expect("restores"), state);
    assert!(matches!(
        State::restore(b"nope"),
        Err(snapshot::SnapshotError::BadMagic)
    ));
    let mut truncated = bytes.clone();
    truncated.truncate(bytes.len() / 2);
    assert!(State::restore(&truncated).is_err());
    let mut future = bytes;
    future[6] = 99;
    assert!(matches!(
        State::restore(&future),
        Err(snapshot::SnapshotError::UnsupportedVersion(99))
    ));
}

#[test]
fn a_plan_from_before_a_remove_and_readd_is_stale() {
    let mut state = with_node(GpuModel::L4, 1);
    apply_checked(&mut state, &Command::RemoveNode { node: "n1".into() }, 1);
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: gpu_node("n1", GpuModel::L4, 1),
        },
        2,
    );
    let out = apply_checked(
        &mut state,
        &submit("a", spec(&["L4"]), Some(placement("n1", 1, &[0], 1000))),
        3,
    );
    assert!(
        matches!(
            &out[0],
            ItemOutcome::Created {
                bind_rejected: Some(Rejection::StaleEpoch {
                    planned: 1,
                    current: 3,
                    ..
                }),
                ..
            }
        ),
        "{out:?}"
    );
}

#[test]
fn log_entries_hold_only_what_the_parser_accepts() {
    use berth_proto::gpu::{GpuAmount, GpuModelSelector, GpuOption, GpuRequest};
    let mut state = with_node(GpuModel::L4, 1);
    let mut bad = spec(&[]);
    bad.gpu = Some(GpuRequest {
        options: vec![GpuOption {
            model: GpuModelSelector::AnyOf(vec![]),
            exact: false,
            amount: GpuAmount::Whole(1),
        }],
        min_memory_mib: None,
    });
    let out = apply_checked(&mut state, &submit("a", bad, None), 1);
    assert!(
        matches!(&out[0], ItemOutcome::Rejected(Rejection::InvalidSpec(m)) if m.one_line().contains("spec.resources.gpu")),
        "{out:?}"
    );
}

#[test]
fn a_long_down_reason_is_stored_truncated() {
    let mut state = with_node(GpuModel::L4, 1);
    let (id, _) = created(&apply_checked(
        &mut state,
        &submit("a", spec(&["L4"]), Some(placement("n1", 1, &[0], 1000))),
        1,
    ));
    let reason = "x".repeat(1 << 20);
    apply_checked(
        &mut state,
        &Command::SetNodeStatus {
            node: "n1".into(),
            status: NodeStatus::Down,
            reason,
        },
        2,
    );
    let SandboxState::Lost { reason } = &state.sandbox(id).expect("kept").state else {
        panic!("not lost")
    };
    assert!(reason.len() < 1200, "{} bytes", reason.len());
}

#[test]
fn a_snapshot_with_an_id_past_next_is_refused() {
    let mut state = with_node(GpuModel::L4, 1);
    apply_checked(&mut state, &submit("a", spec(&[]), None), 1);
    state.next_sandbox_id = 0;
    assert!(
        matches!(State::restore(&state.snapshot()), Err(snapshot::SnapshotError::Invalid(m)) if m.contains("SandboxIdsBelowNext"))
    );
}

#[test]
fn one_autoscaler_holds_the_lease_until_it_lapses_and_decisions_stay_bounded() {
    let mut state = State::new();
    let lease = |holder: &str, lines: usize| Command::AutoscalerLease {
        holder: holder.into(),
        ttl_ms: 1_000,
        decisions: (0..lines)
            .map(|i| format!("{holder} {i} {}", "x".repeat(600)))
            .collect(),
    };
    assert_eq!(state.apply(&lease("a", 1), 10_000), [ItemOutcome::Applied]);
    assert_eq!(
        state.apply(&lease("b", 1), 10_500),
        [ItemOutcome::Rejected(Rejection::LeaseHeld {
            holder: "a".into(),
            expires_ms: 11_000
        })],
        "b waits while a's lease runs"
    );
    assert_eq!(state.apply(&lease("a", 0), 10_900), [ItemOutcome::Applied]);
    assert_eq!(state.autoscaler().expires_ms, 11_900, "a renewed");
    assert_eq!(
        state.apply(&lease("b", 100), 11_900),
        [ItemOutcome::Applied]
    );
    let record = state.autoscaler();
    assert_eq!(record.holder, "b");
    assert_eq!(record.decisions.len(), MAX_AUTOSCALER_DECISIONS);
    assert!(
        record
            .decisions
            .back()
            .is_some_and(|l| l.starts_with("b 99 "))
    );
    assert!(record.decisions.iter().all(|l| l.len() <= MAX_DECISION_LEN));
    assert!(matches!(
        state.apply(&lease("", 0), 20_000)[..],
        [ItemOutcome::Rejected(Rejection::InvalidSpec(_))]
    ));
    let restored = State::restore(&state.snapshot()).expect("restore");
    assert_eq!(restored.autoscaler(), state.autoscaler());
}
