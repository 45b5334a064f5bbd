//! The openb experiment against the FGD paper's published numbers, on the traces in
//! `../shared/data/openb` (or `$BERTH_OPENB_DIR`).

use std::path::PathBuf;

use berth_core::placement::PolicyName;
use berth_sim::openb::{OpenbRun, published, trace};

fn data_dir() -> PathBuf {
    let dir = std::env::var_os("BERTH_OPENB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/openb")
        });
    assert!(
        dir.join("openb_node_list_gpu_node.csv").is_file(),
        "openb traces not found in {}: set BERTH_OPENB_DIR",
        dir.display()
    );
    dir
}

fn run(trace: &str, policy: PolicyName, seeds: &[u64]) -> berth_sim::openb::Report {
    let mut run = OpenbRun::new(
        &data_dir().join(format!("openb_pod_list_{trace}.csv")),
        policy,
    );
    run.seeds = seeds.to_vec();
    run.check_invariants = true;
    run.run()
        .unwrap_or_else(|e| panic!("{trace} {policy:?}: {e}"))
}

#[test]
fn baselines_land_near_the_published_numbers() {
    for (policy, name) in [
        (PolicyName::Fgd, "fgd"),
        (PolicyName::Bestfit, "bestfit"),
        (PolicyName::Random, "random"),
    ] {
        let report = run("default", policy, &[42, 43]);
        let paper = published("default", name).expect("published");
        let ours = report.mean_unallocated_pct_at_100;
        assert!(
            (ours - paper).abs() <= 1.0,
            "{name}: {ours:.2} vs published {paper:.2}"
        );
    }
}

#[test]
fn berth_beats_fgd_on_the_same_seeds() {
    for trace in ["default", "multigpu20"] {
        let fgd = run(trace, PolicyName::Fgd, &[42, 43]).mean_unallocated_pct_at_100;
        let berth = run(trace, PolicyName::Berth, &[42, 43]).mean_unallocated_pct_at_100;
        assert!(berth < fgd, "{trace}: berth {berth:.2} vs fgd {fgd:.2}");
    }
}

#[test]
fn model_constrained_pods_only_land_on_their_models() {
    // check_invariants is on: every binding's GPU model is re-checked against the request.
    let report = run("gpuspec10", PolicyName::Berth, &[44]);
    assert!(report.seeds[0].unallocated_pct_at_100 < 10.0);
    assert_eq!(report.curve.first().map(|p| p.arrived_pct), Some(0));
}

#[test]
fn a_seed_reproduces_exactly() {
    let a = run("gpushare40", PolicyName::Berth, &[7]);
    let b = run("gpushare40", PolicyName::Berth, &[7]);
    assert_eq!(a.to_json(), b.to_json());
    let c = run("gpushare40", PolicyName::Berth, &[8]);
    assert_ne!(a.to_json(), c.to_json(), "different seeds should differ");
}

#[test]
fn json_has_the_documented_keys() {
    let report = run("multigpu20", PolicyName::Bestfit, &[42]);
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("json");
    for key in [
        "trace",
        "policy",
        "seeds",
        "mean_unallocated_pct_at_100",
        "mean_unallocated_pct_at_end",
        "curve",
    ] {
        assert!(json.get(key).is_some(), "{key} missing");
    }
    for key in [
        "seed",
        "unallocated_pct_at_100",
        "unallocated_pct_at_end",
        "frag_pct_at_100",
        "pods_failed",
    ] {
        assert!(json["seeds"][0].get(key).is_some(), "seeds[].{key} missing");
    }
    assert!(
        json["curve"][100].get("arrived_pct").is_some()
            && json["curve"][100].get("alloc_pct").is_some()
    );
    assert_eq!(json["trace"], "multigpu20");
}

#[test]
fn bad_trace_rows_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pods = dir.path().join("pods.csv");
    std::fs::write(
        &pods,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,1024,1,500\np1,1000,1024,2,500\n",
    )
    .expect("write");
    let err = trace::load_pods(&pods)
        .expect_err("two shared GPUs")
        .to_string();
    assert!(
        err.ends_with("row 2: num_gpu 2 with gpu_milli 500: only one GPU can be shared"),
        "{err}"
    );
    std::fs::write(
        &pods,
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,lots,1024,1,500\n",
    )
    .expect("write");
    assert!(
        trace::load_pods(&pods)
            .expect_err("not a number")
            .to_string()
            .contains("row 1")
    );
    let nodes = dir.path().join("nodes.csv");
    std::fs::write(
        &nodes,
        "sn,cpu_milli,memory_mib,gpu,model\nn0,1000,1024,2,\n",
    )
    .expect("write");
    assert!(
        trace::load_nodes(&nodes)
            .expect_err("no model")
            .to_string()
            .contains("row 1: GPUs without a model")
    );
}

/// The whole reproduction: five traces, three baselines and berth, ten seeds each (about
/// five minutes on two cores in a release build).
#[test]
#[ignore = "takes minutes; run with `cargo test --release -p berth-sim -- --ignored`"]
fn full_reproduction_on_all_five_traces() {
    let seeds: Vec<u64> = (42..=51).collect();
    for trace in ["default", "cpu050", "gpushare40", "gpuspec10", "multigpu20"] {
        for (policy, name) in [
            (PolicyName::Fgd, "fgd"),
            (PolicyName::Bestfit, "bestfit"),
            (PolicyName::Random, "random"),
        ] {
            let ours = run(trace, policy, &seeds).mean_unallocated_pct_at_100;
            let paper = published(trace, name).expect("published");
            assert!(
                (ours - paper).abs() <= 1.0,
                "{trace} {name}: {ours:.2} vs {paper:.2}"
            );
        }
        let berth = run(trace, PolicyName::Berth, &seeds).mean_unallocated_pct_at_100;
        let fgd = published(trace, "fgd").expect("published");
        assert!(
            berth < fgd,
            "{trace}: berth {berth:.2} vs FGD published {fgd:.2}"
        );
    }
}
