//! `berth sim run`'s engine on small versions of the shipped scenarios: every scenario file
//! parses and validates, the same seed gives a byte-identical summary.json, a stockout
//! moves demand to the other groups, and spot interruptions are counted.

use std::path::Path;

use berth_sim::engine;
use berth_sim::report;
use berth_sim::scenario::Scenario;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// A scaled-down copy: `hours` long at `concurrent` sandboxes.
fn small(name: &str, hours: f64, concurrent: u64) -> Scenario {
    let mut s = scenario(name);
    s.scenario.duration_h = hours;
    s.workload.peak_concurrent = concurrent;
    s
}

#[test]
fn every_shipped_scenario_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("scenarios/")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "burst-20k.toml",
            "diurnal-50k-multicloud.toml",
            "h100-stockout-failover.toml",
            "openb-replay.toml",
            "spot-interruptions.toml"
        ]
    );
    for n in names {
        let text = std::fs::read_to_string(dir.join(&n)).expect("read");
        assert!(text.starts_with("# "), "{n} starts with its comment block");
        assert!(
            text.contains("Question:"),
            "{n} says what question it answers"
        );
        scenario(n.trim_end_matches(".toml"));
    }
}

#[test]
fn the_same_seed_gives_an_identical_summary() {
    let s = small("diurnal-50k-multicloud", 3.0, 2_000);
    let run = |seed| {
        let r = engine::run(&s, seed, &mut |_| {}).expect("run");
        report::summary_json(&r).expect("json")
    };
    let first = run(1);
    assert_eq!(first, run(1), "byte-identical summary.json");
    assert_ne!(first, run(2), "another seed, another run");
    let r = engine::run(&s, 1, &mut |_| {}).expect("run");
    assert!(r.summary.peak_concurrent_sandboxes > 200, "{:?}", r.summary);
    assert!(r.summary.cost_lower_bound_usd > 0.0);
    assert!(
        r.summary.cost_usd >= r.summary.cost_lower_bound_usd,
        "{:?}",
        r.summary
    );

    // The report folder holds every file, and the plots have titles and axis labels.
    let dir = tempfile::tempdir().expect("tmp");
    report::write(&r, dir.path()).expect("write");
    for f in [
        "summary.json",
        "series.csv",
        "sandboxes.svg",
        "nodes.svg",
        "gpu_allocation.svg",
        "cost.svg",
        "report.html",
    ] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    let svg = std::fs::read_to_string(dir.path().join("nodes.svg")).expect("svg");
    assert!(svg.contains("Nodes per group") && svg.contains("simulated time (hours)"));
    let html = std::fs::read_to_string(dir.path().join("report.html")).expect("html");
    assert!(html.contains("<img src=\"cost.svg\"") && html.contains("peak_concurrent_sandboxes"));
}

#[test]
fn a_stockout_moves_demand_and_waits_stay_near_the_provisioning_delay() {
    let s = small("h100-stockout-failover", 8.0, 300);
    let r = engine::run(&s, 7, &mut |_| {}).expect("run");
    let sum = &r.summary;
    assert!(sum.stockouts > 0, "{sum:?}");
    let hours = |g: &str| sum.node_hours_by_group.get(g).copied().unwrap_or(0.0);
    assert!(
        hours("aws-usw2-h100") + hours("gcp-usc1-h100") > 0.0,
        "{sum:?}"
    );
    // Provisioning takes at most 240 s here.
    assert!(sum.wait_p99_s <= 250.0, "p99 wait {} s", sum.wait_p99_s);
    assert!(sum.cost_over_lower_bound > 0.0);
}

#[test]
fn spot_interruptions_are_counted() {
    let s = small("spot-interruptions", 8.0, 400);
    let r = engine::run(&s, 3, &mut |_| {}).expect("run");
    assert!(r.summary.spot_interruptions > 0, "{:?}", r.summary);
    assert!(
        r.summary
            .node_hours_by_group
            .get("gcp-l4-spot")
            .copied()
            .unwrap_or(0.0)
            > 0.0,
        "the batch tenant prefers spot: {:?}",
        r.summary
    );
}
