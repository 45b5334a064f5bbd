//! Image affinity through the public API: a node holding the sandbox's image wins among
//! equals, never past a hard filter, and under the default rule never over a better-packed
//! node nor by opening an empty one; a sandbox without an image is placed exactly as with
//! affinity off.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_core::model::{NodeSpec, NodeStatus, SandboxSpec, Taint};
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::image::ImageRule;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Decision, Placer, PlacerConfig, PolicyName};
use berth_core::state::{Command, State};
use berth_core::testing::{apply_checked, gpu_node, placement, spec};
use berth_proto::GpuModel;
use berth_proto::node::TaintEffect;

const IMAGE: &str = "registry.test/agent:1";

fn placer(rule: ImageRule, typical: TypicalWorkload) -> Placer {
    Placer::new(
        PlacerConfig {
            policy: PolicyName::Berth,
            allow_gpu_upgrade: false,
            candidate_limit: Some(64),
            image_rule: rule,
        },
        typical,
    )
}

fn cluster(nodes: Vec<NodeSpec>) -> State {
    let mut state = State::new();
    for node in nodes {
        apply_checked(&mut state, &Command::RegisterNode { spec: node }, 0);
    }
    state
}

fn with_image(gpu: &[&str]) -> SandboxSpec {
    let mut s = spec(gpu);
    s.image = IMAGE.into();
    s
}

fn decide(view: &ClusterView, placer: &Placer, spec: &SandboxSpec) -> Decision {
    placer.place(view, spec, &mut ChaCha8Rng::seed_from_u64(1))
}

fn node_of(d: &Decision) -> Option<&str> {
    d.placement.as_ref().map(|p| p.node.as_str())
}

/// Two identical H100 nodes, each running one small CPU-only sandbox (so both are in use);
/// the image is cached on the one the seeded rank puts last, so without affinity the other
/// one wins. Returns the view and (first-ranked, image holder).
fn twins(extra: impl Fn(&mut NodeSpec)) -> (ClusterView, String, String) {
    let (mut view, first, holder) = empty_twins(extra);
    for node in [&first, &holder] {
        view.reserve(&spec(&[]), &placement(node, 1, &[], 0));
    }
    (view, first, holder)
}

/// As [`twins`], with nothing running on either node.
fn empty_twins(extra: impl Fn(&mut NodeSpec)) -> (ClusterView, String, String) {
    let mut nodes = vec![
        gpu_node("a", GpuModel::H100, 8),
        gpu_node("b", GpuModel::H100, 8),
    ];
    let view = ClusterView::from_state(&cluster(nodes.clone()), 3);
    let (first, last) = if view.node(0).rank < view.node(1).rank {
        (0, 1)
    } else {
        (1, 0)
    };
    nodes[last].cached_images = vec![IMAGE.into()];
    extra(&mut nodes[last]);
    let view = ClusterView::from_state(&cluster(nodes.clone()), 3);
    (view, nodes[first].id.clone(), nodes[last].id.clone())
}

#[test]
fn a_node_holding_the_image_wins_among_equals() {
    let (view, first, holder) = twins(|_| {});
    for gpu in [&["H100"][..], &["H100:500m"], &[]] {
        let sandbox = with_image(gpu);
        let off = decide(
            &view,
            &placer(ImageRule::Off, TypicalWorkload::default()),
            &sandbox,
        );
        assert_eq!(node_of(&off), Some(first.as_str()), "{gpu:?}: rank order");
        assert_eq!(off.explanation.image_cached, None);

        let on = decide(
            &view,
            &placer(ImageRule::TieBreak, TypicalWorkload::default()),
            &sandbox,
        );
        assert_eq!(node_of(&on), Some(holder.as_str()), "{gpu:?}");
        assert_eq!(on.explanation.image_cached, Some(true));
        assert!(on.explanation.summary().ends_with("image cached there"));
        // A bonus rule prefers it too.
        let bonus = decide(
            &view,
            &placer(ImageRule::Bonus(5), TypicalWorkload::default()),
            &sandbox,
        );
        assert_eq!(node_of(&bonus), Some(holder.as_str()), "{gpu:?}");
        // The explanation names the component, on every node it lists.
        let best = &on.explanation.top_scores[0];
        assert_eq!(best.node, holder);
        assert_eq!(
            best.components,
            [("fragmentation", best.total), ("image_cached", 1.0)]
        );
        let other = &on.explanation.top_scores[1];
        assert_eq!(other.components[1], ("image_cached", 0.0));
    }
}

#[test]
fn an_empty_node_holding_the_image_is_not_opened_for_it() {
    let (view, first, holder) = empty_twins(|_| {});
    for gpu in [&["H100"][..], &["H100:500m"], &[]] {
        let sandbox = with_image(gpu);
        let d = decide(
            &view,
            &placer(ImageRule::TieBreak, TypicalWorkload::default()),
            &sandbox,
        );
        assert_eq!(node_of(&d), Some(first.as_str()), "{gpu:?}: rank order");
        assert_eq!(d.explanation.image_cached, Some(false));
        // The explanation still says which node holds the image.
        let listed = d.explanation.top_scores.iter().find(|s| s.node == holder);
        assert_eq!(
            listed.map(|s| s.components[1]),
            Some(("image_cached", 1.0)),
            "{gpu:?}"
        );
        // A bonus is the operator saying the image is worth a node.
        let d = decide(
            &view,
            &placer(ImageRule::Bonus(1), TypicalWorkload::default()),
            &sandbox,
        );
        assert_eq!(node_of(&d), Some(holder.as_str()), "{gpu:?}: bonus");
    }
}

/// A change to the image holder that makes a hard filter reject it.
type NodeChange = dyn Fn(&mut NodeSpec);

#[test]
fn the_image_never_overrides_a_hard_filter() {
    let taint = |n: &mut NodeSpec| {
        n.taints.push(Taint {
            key: "dedicated".into(),
            value: String::new(),
            effect: TaintEffect::NoSchedule,
        });
    };
    let filters: [(&str, &NodeChange); 5] = [
        ("taint", &taint),
        ("region", &|n| n.region = "elsewhere".into()),
        ("memory", &|n| n.memory_mib = 512),
        ("cpu", &|n| n.cpu_milli = 500),
        ("gpu model", &|n| {
            n.gpus = gpu_node(&n.id, GpuModel::A100_80GB, 8).gpus;
        }),
    ];
    let mut h100 = with_image(&["H100:8"]);
    // Only the node that lost its region misses this; the others are unaffected.
    h100.constraints.regions = vec![gpu_node("x", GpuModel::H100, 1).region];
    for rule in [ImageRule::TieBreak, ImageRule::Bonus(1000)] {
        for (what, change) in &filters {
            let (view, first, _) = twins(change);
            let d = decide(&view, &placer(rule, TypicalWorkload::default()), &h100);
            assert_eq!(node_of(&d), Some(first.as_str()), "{rule:?}, {what}");
            assert_eq!(d.explanation.image_cached, Some(false), "{rule:?}, {what}");
        }
        // Busy: the holder's GPUs are taken.
        let (mut view, first, holder) = twins(|_| {});
        view.reserve(
            &h100,
            &placement(&holder, 1, &[0, 1, 2, 3, 4, 5, 6, 7], 1000),
        );
        let d = decide(&view, &placer(rule, TypicalWorkload::default()), &h100);
        assert_eq!(node_of(&d), Some(first.as_str()), "{rule:?}, busy");
        // Cordoned: the only node holding the image takes nothing.
        let mut only = gpu_node("only", GpuModel::H100, 8);
        only.cached_images = vec![IMAGE.into()];
        let mut state = cluster(vec![only]);
        apply_checked(
            &mut state,
            &Command::SetNodeStatus {
                node: "only".into(),
                status: NodeStatus::Cordoned,
                reason: String::new(),
            },
            0,
        );
        let view = ClusterView::from_state(&state, 1);
        let d = decide(&view, &placer(rule, TypicalWorkload::default()), &h100);
        assert_eq!(d.placement, None, "{rule:?}: cordoned");
    }
}

/// A typical workload of two-GPU sandboxes: a node left with one free H100 has it
/// fragmented, so filling that GPU scores higher (73) than opening an empty node (50).
fn two_gpu_typical() -> TypicalWorkload {
    TypicalWorkload::from_specs(&[spec(&["H100:2"])])
}

#[test]
fn tie_break_does_not_pick_a_worse_packed_node() {
    let nodes = vec![gpu_node("almost-full", GpuModel::H100, 8), {
        let mut n = gpu_node("emptier-with-image", GpuModel::H100, 8);
        n.cached_images = vec![IMAGE.into()];
        n
    }];
    let mut view = ClusterView::from_state(&cluster(nodes), 3);
    view.reserve(
        &spec(&["H100:7"]),
        &placement("almost-full", 1, &[0, 1, 2, 3, 4, 5, 6], 1000),
    );
    // In use, so the default rule would count its image in a tie.
    view.reserve(&spec(&[]), &placement("emptier-with-image", 1, &[], 0));
    let sandbox = with_image(&["H100"]);
    let d = decide(
        &view,
        &placer(ImageRule::TieBreak, two_gpu_typical()),
        &sandbox,
    );
    assert_eq!(node_of(&d), Some("almost-full"));
    assert_eq!(d.explanation.image_cached, Some(false));
    assert_eq!(d.explanation.top_scores[0].total, 73.0);
    assert_eq!(d.explanation.top_scores[1].total, 50.0);
    // A bonus outweighs packing only when it covers the gap of 23 points.
    let d = decide(
        &view,
        &placer(ImageRule::Bonus(20), two_gpu_typical()),
        &sandbox,
    );
    assert_eq!(node_of(&d), Some("almost-full"));
    let d = decide(
        &view,
        &placer(ImageRule::Bonus(30), two_gpu_typical()),
        &sandbox,
    );
    assert_eq!(node_of(&d), Some("emptier-with-image"));
    assert_eq!(
        d.explanation.top_scores[0].components,
        [
            ("fragmentation", 50.0),
            ("image_cached", 1.0),
            ("image_bonus", 30.0)
        ]
    );
    assert_eq!(d.explanation.top_scores[0].total, 80.0);
}

#[test]
fn a_sandbox_without_an_image_is_placed_as_with_affinity_off() {
    // A pool where every node caches images: only the sandbox's own (empty) image matters.
    let mut nodes: Vec<NodeSpec> = (0..40)
        .map(|i| {
            let model = [GpuModel::H100, GpuModel::L4, GpuModel::A10][i % 3];
            let mut n = gpu_node(&format!("n{i}"), model, [1, 4, 8][i % 3]);
            n.cached_images = vec![IMAGE.into(), String::new()];
            n
        })
        .collect();
    nodes.push(NodeSpec::simple("cpu", 64_000, 256 * 1024, Vec::new()));
    let state = cluster(nodes);
    let mix: Vec<SandboxSpec> = (0..300)
        .map(|i| spec([&["H100"][..], &["L4:250m"], &[], &["A10:2"], &["any:500m"]][i % 5]))
        .collect();
    let typical = TypicalWorkload::from_specs(&mix);
    let run = |rule| {
        let p = placer(rule, typical.clone());
        let mut view = ClusterView::from_state(&state, 9);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        mix.iter()
            .map(|s| {
                let d = p.place(&view, s, &mut rng);
                if let Some(placement) = &d.placement {
                    view.reserve(s, placement);
                }
                assert_eq!(d.explanation.image_cached, None);
                d
            })
            .collect::<Vec<_>>()
    };
    let off = run(ImageRule::Off);
    assert!(off.iter().filter(|d| d.placement.is_some()).count() > 100);
    for rule in [ImageRule::TieBreak, ImageRule::Bonus(50)] {
        assert_eq!(run(rule), off, "{rule:?}");
    }
}
