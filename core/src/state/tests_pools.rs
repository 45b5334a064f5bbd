//! Warm pools in the state machine: a refill makes members from the template (never past
//! the pool's size), a member reported running goes on standby at once, a matching create
//! claims a ready member exactly once (thawed, with the create's request id, env and
//! labels), a create that does not match, or finds no ready member, is made as usual, and
//! shrinking or deleting a pool deletes its unclaimed members. Each apply is
//! invariant-checked.

use super::pools::WarmPool;
use super::tests_pause::{cpu_only, report};
use super::*;
use crate::model::{NodeSpec, SandboxSpec, SandboxState};
use crate::testing::{apply_checked, placement, submit};

fn template() -> SandboxSpec {
    let mut spec = cpu_only();
    spec.keep_alive = true;
    spec.command.clear();
    spec.image = "registry.example/busybox:1".into();
    spec
}

/// Node n1 (4 cores, 16 GiB) and pool `p` of `size` members of 1 core and 1 GiB.
fn with_pool(size: u32) -> State {
    let mut state = State::new();
    apply_checked(
        &mut state,
        &Command::RegisterNode {
            spec: NodeSpec::simple("n1", 4000, 16384, vec![]),
        },
        0,
    );
    let pool = WarmPool {
        template: template(),
        size,
    };
    let out = apply_checked(
        &mut state,
        &Command::SetWarmPool {
            name: "p".into(),
            pool,
        },
        1,
    );
    assert_eq!(out, vec![ItemOutcome::Applied]);
    state
}

fn refill(state: &mut State, count: u32, now_ms: u64) {
    let items = vec![("p".to_string(), count)];
    apply_checked(state, &Command::RefillWarmPools { items }, now_ms);
}

/// Binds every pending member on n1 and reports it running: it goes on standby.
fn warm_up(state: &mut State, now_ms: u64) {
    let members: Vec<SandboxId> = state.pools()["p"].members.iter().copied().collect();
    for id in members {
        if state.sandbox(id).expect("member").state != SandboxState::Pending {
            continue;
        }
        let epoch = state.node("n1").expect("n1").epoch;
        let bind = Command::BindSandboxes {
            items: vec![(id, placement("n1", epoch, &[], 0))],
        };
        assert_eq!(
            apply_checked(state, &bind, now_ms),
            vec![ItemOutcome::Applied]
        );
        report(state, id, StatusChange::Running, now_ms + 1);
    }
}

fn create(state: &mut State, request_id: &str, spec: SandboxSpec, now_ms: u64) -> ItemOutcome {
    let out = apply_checked(state, &submit(request_id, spec, None), now_ms);
    out.into_iter().next().expect("one outcome")
}

#[test]
fn refills_stop_at_the_size_and_members_go_on_standby_holding_no_cpu() {
    let mut state = with_pool(3);
    refill(&mut state, 5, 2);
    assert_eq!(state.pools()["p"].members.len(), 3, "never past the size");
    assert_eq!(state.pools_short(), vec![]);
    warm_up(&mut state, 3);
    for id in &state.pools()["p"].members {
        let s = state.sandbox(*id).expect("member");
        assert!(
            matches!(s.state, SandboxState::Standby { .. }),
            "{:?}",
            s.state
        );
        assert_eq!(s.pool.as_deref(), Some("p"));
        assert!(s.request_id.starts_with("warm-pool/p/"));
    }
    let node = state.node("n1").expect("n1");
    assert_eq!(
        (node.cpu_milli_allocated, node.memory_mib_allocated),
        (0, 3072)
    );
    assert_eq!(state.pool_counts(&state.pools()["p"]), (3, 0));
    // The leader never pauses a pool's standby members to disk.
    assert!(state.standby_over(1_000_000, 15_000, 10).is_empty());
    // Members count against the tenant's quota.
    assert_eq!(state.tenants()[&template().tenant].active_sandboxes, 3);
}

#[test]
fn a_matching_create_claims_a_ready_member_exactly_once() {
    let mut state = with_pool(2);
    refill(&mut state, 2, 2);
    warm_up(&mut state, 3);
    let first = *state.pools()["p"].members.first().expect("member");
    let mut spec = template();
    spec.env.insert("TASK".into(), "42".into());
    spec.labels.insert("who".into(), "agent-7".into());
    spec.priority = 5;
    assert_eq!(state.pool_for(&spec), Some("p"));

    let outcome = create(&mut state, "mine", spec.clone(), 100);
    assert_eq!(
        outcome,
        ItemOutcome::Claimed {
            id: first,
            pool: "p".into()
        }
    );
    let s = state.sandbox(first).expect("claimed");
    assert_eq!(
        s.state,
        SandboxState::Scheduled,
        "thawed: its agent is told again"
    );
    assert_eq!(s.request_id, "mine");
    assert_eq!(s.spec.env["TASK"], "42");
    assert_eq!(s.spec.labels["who"], "agent-7");
    assert_eq!(s.spec.priority, 5);
    assert_eq!(s.pool, None);
    assert!(s.created_ms < 100, "it existed before the create");
    assert_eq!(state.node("n1").expect("n1").cpu_milli_allocated, 1000);
    assert_eq!(state.pools()["p"].claimed, 1);
    assert_eq!(state.pools_short(), vec![("p".to_string(), 1, 0)]);
    // A retry is the same sandbox, deduplicated; the next create takes the other member.
    assert_eq!(
        create(&mut state, "mine", spec.clone(), 101),
        ItemOutcome::Duplicate { id: first }
    );
    let ItemOutcome::Claimed { id: second, .. } = create(&mut state, "other", spec.clone(), 102)
    else {
        panic!("the second member serves the second create");
    };
    assert_ne!(second, first);
    // The pool is empty now: a third create is made as usual, Pending.
    let ItemOutcome::Created {
        id, bound: false, ..
    } = create(&mut state, "third", spec, 103)
    else {
        panic!("made afresh");
    };
    assert_eq!(
        state.sandbox(id).expect("made").state,
        SandboxState::Pending
    );
    // Claimed sandboxes run on as any other: running, then a user's standby is theirs.
    report(&mut state, first, StatusChange::Running, 110);
    assert_eq!(
        state.sandbox(first).expect("kept").state,
        SandboxState::Running
    );
}

#[test]
fn creates_that_differ_or_find_nothing_ready_are_made_as_usual() {
    let mut state = with_pool(1);
    refill(&mut state, 1, 2);
    // Still warming (Pending): nothing to claim.
    assert_eq!(state.pool_for(&template()), None);
    assert!(matches!(
        create(&mut state, "early", template(), 3),
        ItemOutcome::Created { .. }
    ));
    warm_up(&mut state, 4);
    let mut other = template();
    other.memory_mib = 2048;
    let mut with_command = template();
    with_command.command = vec!["true".into()];
    let mut other_tenant = template();
    other_tenant.tenant = "someone-else".into();
    for (name, spec) in [
        ("mem", other),
        ("cmd", with_command),
        ("tenant", other_tenant),
    ] {
        assert_eq!(state.pool_for(&spec), None, "{name}");
        assert!(
            matches!(
                create(&mut state, name, spec, 5),
                ItemOutcome::Created { .. }
            ),
            "{name}"
        );
    }
    assert_eq!(state.pools()["p"].claimed, 0);
}

#[test]
fn a_member_whose_node_has_no_cpu_to_thaw_is_passed_over() {
    let mut state = with_pool(1);
    refill(&mut state, 1, 2);
    warm_up(&mut state, 3);
    // Fill the node's CPU with another tenant's sandbox.
    let mut big = cpu_only();
    big.tenant = "big".into();
    big.cpu_milli = 4000;
    big.memory_mib = 1024;
    let epoch = state.node("n1").expect("n1").epoch;
    let out = apply_checked(
        &mut state,
        &submit("big", big, Some(placement("n1", epoch, &[], 0))),
        4,
    );
    assert!(matches!(
        out[..],
        [ItemOutcome::Created { bound: true, .. }]
    ));
    assert!(matches!(
        create(&mut state, "want", template(), 5),
        ItemOutcome::Created { bound: false, .. }
    ));
    assert_eq!(
        state.pools()["p"].members.len(),
        1,
        "the member stays in its pool"
    );
}

#[test]
fn members_are_not_paused_by_users_and_leave_when_they_end() {
    let mut state = with_pool(2);
    refill(&mut state, 2, 2);
    warm_up(&mut state, 3);
    let id = *state.pools()["p"].members.first().expect("member");
    for cmd in [
        Command::ResumeSandboxes { items: vec![id] },
        Command::PauseSandboxes {
            items: vec![id],
            gpu_filesystem_only: false,
        },
    ] {
        let out = apply_checked(&mut state, &cmd, 4);
        assert_eq!(
            out,
            vec![ItemOutcome::Rejected(Rejection::PoolMember(id, "p".into()))]
        );
    }
    report(
        &mut state,
        id,
        StatusChange::Failed {
            reason: "oom".into(),
        },
        5,
    );
    assert_eq!(state.pools()["p"].members.len(), 1);
    assert_eq!(state.pools_short(), vec![("p".to_string(), 1, 0)]);
}

#[test]
fn shrinking_replacing_and_deleting_a_pool_delete_its_unclaimed_members() {
    let mut state = with_pool(3);
    refill(&mut state, 3, 2);
    warm_up(&mut state, 3);
    let members: Vec<SandboxId> = state.pools()["p"].members.iter().copied().collect();
    let shrink = Command::SetWarmPool {
        name: "p".into(),
        pool: WarmPool {
            template: template(),
            size: 1,
        },
    };
    apply_checked(&mut state, &shrink, 10);
    assert_eq!(
        state.pools()["p"]
            .members
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        vec![members[0]],
        "the oldest member stays"
    );
    let mut bigger = template();
    bigger.memory_mib = 2048;
    let replace = Command::SetWarmPool {
        name: "p".into(),
        pool: WarmPool {
            template: bigger,
            size: 1,
        },
    };
    apply_checked(&mut state, &replace, 11);
    assert!(
        state.pools()["p"].members.is_empty(),
        "another template: all go"
    );
    refill(&mut state, 1, 12);
    let out = apply_checked(
        &mut state,
        &Command::DeleteWarmPool { name: "p".into() },
        13,
    );
    assert_eq!(out, vec![ItemOutcome::Applied]);
    assert!(state.pools().is_empty());
    assert_eq!(state.tenants()[&template().tenant].active_sandboxes, 0);
    let node = state.node("n1").expect("n1");
    assert_eq!(
        (node.cpu_milli_allocated, node.memory_mib_allocated),
        (0, 0)
    );
}

#[test]
fn bad_pools_are_refused_naming_the_field() {
    let mut state = State::new();
    let mut with_command = template();
    with_command.command = vec!["sleep".into()];
    let cases = [
        ("Bad Name", template(), 1, "name"),
        ("p", with_command, 1, "pool.template.command"),
        ("p", template(), 5_000, "pool.size"),
    ];
    for (name, template, size, field) in cases {
        let cmd = Command::SetWarmPool {
            name: name.into(),
            pool: WarmPool { template, size },
        };
        let out = apply_checked(&mut state, &cmd, 1);
        let [ItemOutcome::Rejected(Rejection::InvalidSpec(e))] = &out[..] else {
            panic!("{out:?}");
        };
        assert!(e.one_line().contains(field), "{field}: {}", e.one_line());
    }
    let out = apply_checked(
        &mut state,
        &Command::DeleteWarmPool {
            name: "nope".into(),
        },
        2,
    );
    assert!(matches!(out[..], [ItemOutcome::Rejected(_)]));
}

#[test]
fn pools_survive_a_snapshot() {
    let mut state = with_pool(2);
    refill(&mut state, 2, 2);
    warm_up(&mut state, 3);
    let restored = State::restore(&state.snapshot()).expect("restores");
    assert_eq!(restored, state);
}

#[test]
fn a_pool_set_again_under_the_same_name_skips_request_ids_its_ended_members_keep() {
    let mut state = with_pool(2);
    refill(&mut state, 2, 2);
    warm_up(&mut state, 3);
    let ended = *state.pools()["p"].members.first().expect("member");
    report(
        &mut state,
        ended,
        StatusChange::Failed {
            reason: "oom".into(),
        },
        4,
    );
    apply_checked(&mut state, &Command::DeleteWarmPool { name: "p".into() }, 5);
    let again = Command::SetWarmPool {
        name: "p".into(),
        pool: WarmPool {
            template: template(),
            size: 2,
        },
    };
    apply_checked(&mut state, &again, 6);
    // `warm-pool/p/0` still names the ended member: one refill makes both all the same.
    refill(&mut state, 2, 7);
    assert_eq!(state.pools()["p"].members.len(), 2);
    assert!(!state.pools()["p"].members.contains(&ended));
}
