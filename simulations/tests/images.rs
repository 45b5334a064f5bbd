//! `berth sim images`' report: every rule of one run on the same arrivals, the default rule
//! raising the hit rate without costing packing, and a seed replaying exactly.

use berth_core::placement::PolicyName;
use berth_core::placement::image::ImageRule;
use berth_sim::images::{ImagesRun, Setup};

fn run(rules: Vec<ImageRule>, pulls: bool) -> berth_sim::images::Report {
    ImagesRun {
        setup: Setup {
            nodes: 300,
            images: 50,
            zipf_s: 1.0,
            cached_per_node: 4,
            cache_capacity: 8,
            pulls,
            policy: PolicyName::Berth,
            candidate_limit: Some(64),
        },
        seeds: vec![1, 2],
        rules,
        threads: 2,
    }
    .run()
    .expect("runs")
}

#[test]
fn the_report_compares_rules_on_the_same_arrivals() {
    let report = run(vec![ImageRule::Off, ImageRule::DEFAULT], true);
    assert_eq!(report.rules.len(), 2);
    assert_eq!(report.results.len(), 4, "2 seeds × 2 rules");
    let (off, on) = (&report.rules[0], &report.rules[1]);
    assert_eq!((off.rule.as_str(), on.rule.as_str()), ("off", "tie-break"));
    for pair in report.results.chunks(2) {
        assert_eq!(pair[0].seed, pair[1].seed);
        assert_eq!(pair[0].arrived, pair[1].arrived, "same arrivals");
        assert!(pair[0].placed > 500 && pair[0].hits <= pair[0].placed);
        assert_eq!(
            pair[0].pulls,
            pair[0].placed - pair[0].hits,
            "every miss pulls"
        );
    }
    assert!(
        on.hit_rate_pct > off.hit_rate_pct + 10.0,
        "on {:.1}% vs off {:.1}%",
        on.hit_rate_pct,
        off.hit_rate_pct
    );
    // The default rule only breaks ties among nodes in use: packing stays where it was.
    assert!(
        (on.unallocated_gpu_pct - off.unallocated_gpu_pct).abs() < 1.5,
        "{on:?} vs {off:?}"
    );
    assert!(
        on.nodes_used_at_50 <= off.nodes_used_at_50 * 1.05 + 2.0,
        "{on:?} vs {off:?}"
    );

    let text = report.to_text();
    assert!(
        text.contains("hit rate") && text.contains("unallocated GPU @100%"),
        "{text}"
    );
    assert!(
        text.contains("\noff ") && text.contains("\ntie-break "),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("json");
    assert_eq!(json["rules"][1]["rule"], "tie-break");
    assert!(json["rules"][0]["hit_rate_pct"].is_number());

    let again = run(vec![ImageRule::Off, ImageRule::DEFAULT], true);
    assert_eq!(again.results, report.results, "a seed replays exactly");
}

#[test]
fn without_pulls_caches_stay_as_they_start() {
    let report = run(vec![ImageRule::Off, ImageRule::Bonus(100)], false);
    assert!(report.results.iter().all(|r| r.pulls == 0));
    assert!(report.rules[1].hit_rate_pct > report.rules[0].hit_rate_pct);
}
