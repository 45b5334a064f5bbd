//! Property tests of the state machine and the placement engine.

use proptest::prelude::*;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_core::invariants;
use berth_core::model::{NodeStatus, Placement, SandboxId, SandboxSpec, TenantQuota};
use berth_core::placement::PolicyName;
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Placer, PlacerConfig};
use berth_core::state::{Command, State, StatusChange, StatusUpdate, Submission};
use berth_core::testing::{gpu_node, spec};
use berth_proto::GpuModel;

const MODELS: [GpuModel; 3] = [GpuModel::T4, GpuModel::L4, GpuModel::H100];
const SPECS: [&[&str]; 7] = [
    &[],
    &["T4:300m"],
    &["any:700m"],
    &["L4"],
    &["H100:2", "L4:2"],
    &["H100!:4"],
    &["any:8"],
];

#[derive(Debug, Clone)]
enum Op {
    /// Submit a spec; place it with the engine, with a random (likely bad) plan, or not at all.
    Submit {
        spec: usize,
        cpu: u64,
        plan: u8,
        node: usize,
        gpu: u32,
        milli: u32,
    },
    /// Bind a pending sandbox with the engine's plan.
    BindPending,
    Update {
        sandbox: usize,
        change: u8,
    },
    Delete {
        sandbox: usize,
    },
    NodeStatus {
        node: usize,
        status: u8,
    },
    Reregister {
        node: usize,
        gpus: u32,
    },
    /// An agent re-registers having kept every `keep`-th of the node's sandboxes, each
    /// reported as `report` says (running, exited, failed).
    AgentReregister {
        node: usize,
        gpus: u32,
        keep: usize,
        report: u8,
    },
    /// The liveness checker finds a node silent: Down, its sandboxes Unknown for `grace`.
    Disconnect {
        node: usize,
        grace: u64,
    },
    /// The leader expires every Unknown sandbox it believes past its grace at `skew` ms
    /// from now (the state machine re-checks against the entry's own time).
    ExpireDisconnected {
        skew: u64,
    },
    Quota {
        max: u32,
        gpu_milli: u64,
    },
    Expire {
        before: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..SPECS.len(), 1u64..40_000, 0u8..3, 0usize..4, 0u32..9, 1u32..1001)
            .prop_map(|(spec, cpu, plan, node, gpu, milli)| Op::Submit { spec, cpu, plan, node, gpu, milli }),
        2 => Just(Op::BindPending),
        3 => (0usize..64, 0u8..4).prop_map(|(sandbox, change)| Op::Update { sandbox, change }),
        1 => (0usize..64).prop_map(|sandbox| Op::Delete { sandbox }),
        1 => (0usize..4, 0u8..4).prop_map(|(node, status)| Op::NodeStatus { node, status }),
        1 => (0usize..4, 0u32..9).prop_map(|(node, gpus)| Op::Reregister { node, gpus }),
        1 => (0usize..4, 0u32..9, 1usize..4, 0u8..3)
            .prop_map(|(node, gpus, keep, report)| Op::AgentReregister { node, gpus, keep, report }),
        1 => (0usize..4, 0u64..20).prop_map(|(node, grace)| Op::Disconnect { node, grace }),
        1 => (0u64..20).prop_map(|skew| Op::ExpireDisconnected { skew }),
        1 => (1u32..20, 0u64..8000).prop_map(|(max, gpu_milli)| Op::Quota { max, gpu_milli }),
        1 => (0u64..200).prop_map(|before| Op::Expire { before }),
    ]
}

fn node_id(i: usize) -> String {
    format!("n{i}")
}

fn engine() -> Placer {
    Placer::new(
        PlacerConfig {
            policy: PolicyName::Berth,
            allow_gpu_upgrade: true,
            candidate_limit: Some(8),
            ..PlacerConfig::default()
        },
        TypicalWorkload::default(),
    )
}

fn to_command(state: &State, op: &Op, placer: &Placer) -> Command {
    let sandbox_at = |i: usize| {
        state
            .sandboxes()
            .keys()
            .nth(i % state.sandboxes().len().max(1))
            .copied()
            .unwrap_or(SandboxId(0))
    };
    match op {
        Op::Submit {
            spec: s,
            cpu,
            plan,
            node,
            gpu,
            milli,
        } => {
            let mut spec: SandboxSpec = spec(SPECS[*s]);
            spec.cpu_milli = *cpu;
            let placement = match plan {
                0 => None,
                1 => {
                    placer
                        .place(
                            &ClusterView::from_state(state, 1),
                            &spec,
                            &mut ChaCha8Rng::seed_from_u64(1),
                        )
                        .placement
                }
                _ => Some(Placement {
                    node: node_id(*node),
                    epoch: state.node(&node_id(*node)).map_or(1, |n| n.epoch),
                    option: 0,
                    gpu_indices: (0..*gpu).collect(),
                    gpu_milli_per_gpu: *milli,
                }),
            };
            Command::SubmitSandboxes {
                items: vec![Submission {
                    request_id: format!("r{}", state.revision()),
                    spec,
                    placement,
                }],
            }
        }
        Op::BindPending => {
            let pending: Vec<(SandboxId, SandboxSpec)> = state
                .pending()
                .into_iter()
                .map(|s| (s.id, s.spec.clone()))
                .collect();
            let batch: Vec<(SandboxId, &SandboxSpec)> =
                pending.iter().map(|(id, s)| (*id, s)).collect();
            let mut view = ClusterView::from_state(state, 3);
            let plan = placer.place_batch(&mut view, &batch, 3);
            Command::BindSandboxes {
                items: plan
                    .into_iter()
                    .filter_map(|(id, d)| d.placement.map(|p| (id, p)))
                    .collect(),
            }
        }
        Op::Update { sandbox, change } => {
            let id = sandbox_at(*sandbox);
            let node = state
                .sandbox(id)
                .and_then(|s| s.binding.as_ref())
                .map_or("n0".to_owned(), |b| b.placement.node.clone());
            let change = match change {
                0 | 1 => StatusChange::Running,
                2 => StatusChange::Exited { code: 1 },
                _ => StatusChange::Failed {
                    reason: "oom".into(),
                },
            };
            Command::UpdateSandboxes {
                items: vec![StatusUpdate {
                    sandbox: id,
                    node,
                    change,
                }],
            }
        }
        Op::Delete { sandbox } => Command::DeleteSandboxes {
            items: vec![sandbox_at(*sandbox)],
        },
        Op::NodeStatus { node, status } => Command::SetNodeStatus {
            node: node_id(*node),
            status: [
                NodeStatus::Ready,
                NodeStatus::Cordoned,
                NodeStatus::Draining,
                NodeStatus::Down,
            ][*status as usize % 4],
            reason: "test".into(),
        },
        Op::Reregister { node, gpus } => Command::RegisterNode {
            spec: gpu_node(&node_id(*node), MODELS[*node % 3], *gpus),
        },
        Op::AgentReregister {
            node,
            gpus,
            keep,
            report,
        } => Command::RegisterAgent {
            spec: gpu_node(&node_id(*node), MODELS[*node % 3], *gpus),
            has: state
                .node(&node_id(*node))
                .map(|r| {
                    r.sandboxes
                        .iter()
                        .step_by(*keep)
                        .map(|id| {
                            let change = match report {
                                0 => StatusChange::Running,
                                1 => StatusChange::Exited { code: 0 },
                                _ => StatusChange::Failed {
                                    reason: "gone".into(),
                                },
                            };
                            (*id, change)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        },
        Op::Disconnect { node, grace } => Command::NodeDisconnected {
            node: node_id(*node),
            reason: "no heartbeat".into(),
            grace_ms: *grace,
        },
        Op::ExpireDisconnected { skew } => Command::ExpireDisconnected {
            items: state.disconnect_grace_over(state.revision() + skew, 64),
        },
        Op::Quota { max, gpu_milli } => Command::SetTenantQuota {
            tenant: "t".into(),
            quota: TenantQuota {
                max_concurrent_sandboxes: Some(*max),
                max_gpu_milli_per_model: [(GpuModel::H100.into(), *gpu_milli)].into(),
            },
        },
        Op::Expire { before } => Command::ExpireTerminal {
            finished_before_ms: *before,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever arrives, in whatever order, no invariant breaks and snapshots round-trip.
    #[test]
    fn random_command_sequences_never_break_an_invariant(ops in proptest::collection::vec(op(), 1..80)) {
        let mut state = State::new();
        for i in 0..4 {
            state.apply(&Command::RegisterNode { spec: gpu_node(&node_id(i), MODELS[i % 3], 2 + 2 * i as u32) }, 0);
        }
        let placer = engine();
        for (t, op) in ops.iter().enumerate() {
            let command = to_command(&state, op, &placer);
            state.apply(&command, t as u64);
            let violations = invariants::check(&state);
            prop_assert!(violations.is_empty(), "after {:?}: {:?}", command, violations);
            let restored = State::restore(&state.snapshot());
            prop_assert_eq!(restored.as_ref().ok(), Some(&state));
        }
    }

    /// The engine is a function of (state, batch, seed): planning twice gives the same plan,
    /// and every plan it makes is accepted by `apply`.
    #[test]
    fn placing_the_same_batch_twice_gives_the_same_plan(
        specs in proptest::collection::vec(0..SPECS.len(), 1..40),
        seed in any::<u64>(),
        policy in 0usize..4,
    ) {
        let mut state = State::new();
        for i in 0..4 {
            state.apply(&Command::RegisterNode { spec: gpu_node(&node_id(i), MODELS[i % 3], 4) }, 0);
        }
        let specs: Vec<SandboxSpec> = specs.iter().map(|s| spec(SPECS[*s])).collect();
        let policy = PolicyName::ALL[policy];
        let placer = Placer::new(PlacerConfig { policy, allow_gpu_upgrade: false, candidate_limit: None, ..PlacerConfig::default() }, TypicalWorkload::from_specs(&specs));
        let batch: Vec<(SandboxId, &SandboxSpec)> = specs.iter().enumerate().map(|(i, s)| (SandboxId(i as u64), s)).collect();
        let plan = |seed| placer.place_batch(&mut ClusterView::from_state(&state, seed), &batch, seed);
        let first = plan(seed);
        prop_assert_eq!(&first, &plan(seed));
        let items: Vec<Submission> = first
            .iter()
            .map(|(id, d)| Submission { request_id: format!("r{}", id.0), spec: specs[id.0 as usize].clone(), placement: d.placement.clone() })
            .collect();
        for outcome in state.apply(&Command::SubmitSandboxes { items }, 1) {
            let accepted = matches!(outcome, berth_core::state::ItemOutcome::Created { bind_rejected: None, .. });
            prop_assert!(accepted, "apply refused the engine's own plan: {:?}", outcome);
        }
        prop_assert!(invariants::check(&state).is_empty());
    }
}
