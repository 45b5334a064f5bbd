//! The placement engine's behaviour on small clusters, through the public API.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_core::model::{SandboxId, SandboxSpec, Taint, TenantQuota, Toleration};
use berth_core::placement::PolicyName;
use berth_core::placement::filters::Reason;
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Decision, Placer, PlacerConfig};
use berth_core::state::{Command, State};
use berth_core::testing::{apply_checked, gpu_node, spec};
use berth_proto::GpuModel;
use berth_proto::gpu::GpuRequest;
use berth_proto::node::TaintEffect;

fn cluster(nodes: Vec<berth_core::model::NodeSpec>) -> State {
    let mut state = State::new();
    for node in nodes {
        apply_checked(&mut state, &Command::RegisterNode { spec: node }, 0);
    }
    state
}

fn placer(policy: PolicyName, upgrade: bool) -> Placer {
    Placer::new(
        PlacerConfig {
            policy,
            allow_gpu_upgrade: upgrade,
            candidate_limit: Some(64),
            ..PlacerConfig::default()
        },
        TypicalWorkload::default(),
    )
}

fn decide(state: &State, placer: &Placer, spec: &SandboxSpec) -> Decision {
    let view = ClusterView::from_state(state, 7);
    placer.place(&view, spec, &mut ChaCha8Rng::seed_from_u64(1))
}

#[test]
fn fallback_options_are_used_in_order_only_when_earlier_ones_are_full() {
    let state = cluster(vec![
        gpu_node("h100", GpuModel::H100, 1),
        gpu_node("a100", GpuModel::A100_80GB, 2),
    ]);
    for policy in [
        PolicyName::Berth,
        PolicyName::Fgd,
        PolicyName::Bestfit,
        PolicyName::Random,
    ] {
        let p = placer(policy, false);
        let first = decide(&state, &p, &spec(&["H100", "A100-80GB:2"]));
        let placement = first.placement.expect("fits");
        assert_eq!(
            (placement.node.as_str(), placement.option),
            ("h100", 0),
            "{policy:?}"
        );
        // H100 full: option 1 on the A100 node, with both of its GPUs.
        let mut view = ClusterView::from_state(&state, 7);
        view.reserve(&spec(&["H100"]), &placement);
        let second = p.place(
            &view,
            &spec(&["H100", "A100-80GB:2"]),
            &mut ChaCha8Rng::seed_from_u64(1),
        );
        let placement = second.placement.expect("fallback fits");
        assert_eq!(
            (
                placement.node.as_str(),
                placement.option,
                placement.gpu_indices.clone()
            ),
            ("a100", 1, vec![0, 1])
        );
        assert_eq!(second.explanation.tier, Some((1, None)));
    }
}

#[test]
fn upgrades_need_the_operator_switch_and_no_bang() {
    let state = cluster(vec![gpu_node("h200", GpuModel::H200, 8)]);
    let strict = placer(PolicyName::Berth, false);
    let lenient = placer(PolicyName::Berth, true);
    let refused = decide(&state, &strict, &spec(&["H100"]));
    assert!(refused.placement.is_none());
    assert_eq!(
        refused.explanation.filtered.get(&Reason::GpuModelMismatch),
        Some(&1)
    );
    let upgraded = decide(&state, &lenient, &spec(&["H100"]));
    assert_eq!(upgraded.placement.map(|p| p.node), Some("h200".to_owned()));
    assert_eq!(
        upgraded.explanation.tier,
        Some((0, Some(GpuModel::H200.into())))
    );
    assert!(
        decide(&state, &lenient, &spec(&["H100!"]))
            .placement
            .is_none(),
        "'!' is never upgraded"
    );
    // Never a downgrade.
    assert!(
        decide(&state, &lenient, &spec(&["B200"]))
            .placement
            .is_none()
    );
}

#[test]
fn minimum_gpu_memory_and_fractions() {
    let state = cluster(vec![
        gpu_node("t4", GpuModel::T4, 1),
        gpu_node("l40s", GpuModel::L40S, 1),
    ]);
    let p = placer(PolicyName::Berth, false);
    let mut big = spec(&["any"]);
    big.gpu = Some(GpuRequest::parse(&["any"], Some(40 * 1024)).expect("valid"));
    assert_eq!(
        decide(&state, &p, &big).placement.map(|p| p.node),
        Some("l40s".to_owned())
    );
    big.gpu = Some(GpuRequest::parse(&["T4"], Some(40 * 1024)).expect("valid"));
    let d = decide(&state, &p, &big);
    assert!(d.placement.is_none());
    assert_eq!(
        d.explanation.filtered.get(&Reason::GpuMemoryTooSmall),
        Some(&1)
    );
    // Two 600m shares cannot share a GPU; the second goes to the other node.
    let mut view = ClusterView::from_state(&state, 7);
    let batch = [
        (SandboxId(0), &spec(&["any:600m"])),
        (SandboxId(1), &spec(&["any:600m"])),
    ];
    let plan = p.place_batch(&mut view, &batch, 1);
    let nodes: Vec<String> = plan
        .iter()
        .filter_map(|(_, d)| d.placement.as_ref().map(|p| p.node.clone()))
        .collect();
    assert_eq!(nodes.len(), 2);
    assert_ne!(nodes[0], nodes[1]);
}

#[test]
fn constraints_filter_and_explain() {
    let mut aws = gpu_node("aws-1", GpuModel::L4, 1);
    aws.provider = "aws".into();
    aws.region = "us-east-1".into();
    let mut gcp = gpu_node("gcp-1", GpuModel::L4, 1);
    gcp.provider = "gcp".into();
    gcp.region = "us-central1".into();
    gcp.taints.push(Taint {
        key: "dedicated".into(),
        value: "ml".into(),
        effect: TaintEffect::NoSchedule,
    });
    gcp.labels.insert("pool".into(), "ml".into());
    let state = cluster(vec![aws, gcp]);
    let p = placer(PolicyName::Berth, false);

    let mut pinned = spec(&["L4"]);
    pinned.constraints.providers = vec!["gcp".into()];
    let d = decide(&state, &p, &pinned);
    assert!(d.placement.is_none(), "gcp node is tainted");
    assert_eq!(
        d.explanation.filtered.get(&Reason::ProviderNotAllowed),
        Some(&1)
    );
    assert_eq!(
        d.explanation.filtered.get(&Reason::TaintNotTolerated),
        Some(&1)
    );
    assert!(
        d.explanation.summary().contains("1 taint not tolerated"),
        "{}",
        d.explanation.summary()
    );

    pinned.constraints.tolerations.push(Toleration {
        key: "dedicated".into(),
        value: String::new(),
    });
    assert_eq!(
        decide(&state, &p, &pinned).placement.map(|p| p.node),
        Some("gcp-1".to_owned())
    );

    let mut labelled = spec(&["L4"]);
    labelled
        .constraints
        .node_labels
        .insert("pool".into(), "web".into());
    let d = decide(&state, &p, &labelled);
    // Neither node has pool=web (the gcp one has pool=ml).
    assert_eq!(d.explanation.filtered.get(&Reason::LabelMismatch), Some(&2));

    let mut region = spec(&[]);
    region.constraints.regions = vec!["us-east-1".into()];
    assert_eq!(
        decide(&state, &p, &region).placement.map(|p| p.node),
        Some("aws-1".to_owned())
    );
}

#[test]
fn higher_priority_goes_first_within_a_batch() {
    let state = cluster(vec![gpu_node("only", GpuModel::H100, 1)]);
    let p = placer(PolicyName::Berth, false);
    let low = spec(&["H100"]);
    let mut high = spec(&["H100"]);
    high.priority = 10;
    let mut view = ClusterView::from_state(&state, 7);
    let plan = p.place_batch(&mut view, &[(SandboxId(1), &low), (SandboxId(2), &high)], 1);
    let placed: Vec<SandboxId> = plan
        .iter()
        .filter(|(_, d)| d.placement.is_some())
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(placed, [SandboxId(2)]);
    let refused = plan
        .iter()
        .find(|(id, _)| *id == SandboxId(1))
        .map(|(_, d)| d.explanation.summary());
    assert_eq!(
        refused.as_deref(),
        Some("no node fits (0 evaluated): 1 not enough free GPUs")
    );
}

/// One node of `gpus` A10s; tenant "t" may hold one whole A10.
fn a10_cluster_with_one_gpu_quota(gpus: u32) -> State {
    let mut state = cluster(vec![gpu_node("n", GpuModel::A10, gpus)]);
    let quota = TenantQuota {
        max_concurrent_sandboxes: None,
        max_gpu_milli_per_model: [(GpuModel::A10.into(), 1000)].into(),
    };
    apply_checked(
        &mut state,
        &Command::SetTenantQuota {
            tenant: "t".into(),
            quota,
        },
        0,
    );
    state
}

#[test]
fn tenant_gpu_quota_is_a_filter() {
    let state = a10_cluster_with_one_gpu_quota(4);
    let p = placer(PolicyName::Berth, false);
    let mut view = ClusterView::from_state(&state, 7);
    let (a, b) = (spec(&["A10"]), spec(&["A10"]));
    let plan = p.place_batch(&mut view, &[(SandboxId(1), &a), (SandboxId(2), &b)], 1);
    assert!(plan[0].1.placement.is_some());
    assert!(plan[1].1.placement.is_none());
    assert_eq!(
        plan[1].1.explanation.filtered.get(&Reason::TenantGpuQuota),
        Some(&1)
    );
}

#[test]
fn unhealthy_gpus_and_cordoned_nodes_get_nothing() {
    let mut sick = gpu_node("sick", GpuModel::H100, 1);
    sick.gpus[0].healthy = false;
    let mut state = cluster(vec![sick, gpu_node("cordoned", GpuModel::H100, 1)]);
    apply_checked(
        &mut state,
        &Command::SetNodeStatus {
            node: "cordoned".into(),
            status: berth_core::model::NodeStatus::Cordoned,
            reason: "maintenance".into(),
        },
        1,
    );
    let d = decide(&state, &placer(PolicyName::Berth, false), &spec(&["H100"]));
    assert!(d.placement.is_none());
    assert_eq!(d.explanation.filtered.get(&Reason::NodeNotReady), Some(&1));
    assert_eq!(
        d.explanation.filtered.get(&Reason::InsufficientFreeGpus),
        Some(&1)
    );
}

#[test]
fn a_cpu_only_sandbox_that_fits_nowhere_says_why() {
    let state = cluster(vec![
        gpu_node("a", GpuModel::T4, 1),
        gpu_node("b", GpuModel::T4, 1),
    ]);
    let mut huge = spec(&[]);
    huge.cpu_milli = 100_000;
    let d = decide(&state, &placer(PolicyName::Berth, false), &huge);
    assert!(d.placement.is_none());
    assert_eq!(
        d.explanation.summary(),
        "no node fits (0 evaluated): 2 insufficient CPU"
    );
    let mut hungry = spec(&[]);
    hungry.memory_mib = 1024 * 1024;
    let d = decide(&state, &placer(PolicyName::Berth, false), &hungry);
    assert_eq!(
        d.explanation.filtered.get(&Reason::InsufficientMemory),
        Some(&2)
    );
}

#[test]
fn releasing_onto_an_unhealthy_gpu_does_not_make_it_free() {
    let mut node = gpu_node("n", GpuModel::H100, 2);
    node.gpus[1].healthy = false;
    let state = cluster(vec![node]);
    let mut view = ClusterView::from_state(&state, 1);
    let index = view.index_of("n").expect("node");
    assert_eq!(view.node(index).gpu_milli_free, vec![1000, 0]);
    let plan = berth_core::model::Placement {
        node: "n".into(),
        epoch: 1,
        option: 0,
        gpu_indices: vec![0, 1],
        gpu_milli_per_gpu: 1000,
    };
    view.reserve(&spec(&["H100:2"]), &plan);
    view.release(&spec(&["H100:2"]), &plan);
    assert_eq!(view.node(index).gpu_milli_free, vec![1000, 0]);
    assert!(
        decide(
            &state,
            &placer(PolicyName::Berth, false),
            &spec(&["H100:2"])
        )
        .placement
        .is_none()
    );
}

#[test]
fn listed_models_are_tried_before_upgrades_and_counts_are_per_node() {
    let state = cluster(vec![
        gpu_node("h200", GpuModel::H200, 1),
        gpu_node("b200", GpuModel::B200, 1),
        gpu_node("a100", GpuModel::A100_80GB, 1),
    ]);
    let lenient = placer(PolicyName::Berth, true);
    // H100 is nowhere; H200 is listed second, B200 would be an upgrade: H200 wins.
    let d = decide(&state, &lenient, &spec(&["H100", "H200"]));
    assert_eq!(
        d.placement.as_ref().map(|p| (p.node.as_str(), p.option)),
        Some(("h200", 1))
    );
    // The counts explain option 0 only: three nodes, three reasons, none twice.
    assert_eq!(d.explanation.filtered.values().sum::<u32>(), 3);
    assert_eq!(
        d.explanation.filtered.get(&Reason::GpuModelMismatch),
        Some(&3)
    );
}

#[test]
fn release_gives_back_tenant_gpu_usage() {
    let state = a10_cluster_with_one_gpu_quota(2);
    let p = placer(PolicyName::Berth, false);
    let mut view = ClusterView::from_state(&state, 1);
    let a10 = spec(&["A10"]);
    let first = p
        .place(&view, &a10, &mut ChaCha8Rng::seed_from_u64(1))
        .placement
        .expect("fits");
    view.reserve(&a10, &first);
    assert!(
        p.place(&view, &a10, &mut ChaCha8Rng::seed_from_u64(1))
            .placement
            .is_none(),
        "quota reached"
    );
    view.release(&a10, &first);
    assert!(
        p.place(&view, &a10, &mut ChaCha8Rng::seed_from_u64(1))
            .placement
            .is_some(),
        "quota freed"
    );
}

#[test]
fn a_resume_is_placed_on_the_snapshot_node_or_on_one_with_the_same_runtime() {
    let runtime = |id: &str, r: &str| {
        let mut n = gpu_node(id, GpuModel::H100, 1);
        n.runtime = r.into();
        n
    };
    let state = cluster(vec![
        runtime("holder", "gvisor/1/ptrace"),
        runtime("newer", "gvisor/2/ptrace"),
        runtime("same", "gvisor/1/ptrace"),
    ]);
    let placer = placer(PolicyName::Berth, false);
    let cpu = spec(&[]);
    let mut view = ClusterView::from_state(&state, 7);
    let on = placer
        .place_on(&mut view, &cpu, "holder", 1)
        .expect("fits the holder");
    assert_eq!(on.node, "holder");
    assert!(placer.place_on(&mut view, &cpu, "gone", 1).is_none());

    // With the holder unusable, only the node with the same runtime is a candidate.
    let mut view = ClusterView::from_state(&state, 7);
    let decision = placer.place_with_runtime(&mut view, &cpu, "gvisor/1/ptrace", 1);
    let node = decision.placement.expect("placed").node;
    assert!(node == "holder" || node == "same", "{node}");
    assert_eq!(
        decision
            .explanation
            .filtered
            .get(&Reason::SnapshotIncompatible),
        Some(&1),
        "{:?}",
        decision.explanation
    );
    let mut view = ClusterView::from_state(&state, 7);
    let none = placer.place_with_runtime(&mut view, &cpu, "gvisor/3/ptrace", 1);
    assert!(none.placement.is_none());
    assert!(
        none.explanation
            .summary()
            .contains("3 runtime differs from the snapshot's"),
        "{}",
        none.explanation.summary()
    );
}
