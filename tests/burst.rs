//! A burst of sandboxes onto one small node of `berth dev` (`berth bench burst --only-node`,
//! smaller; the L4 node has 8 CPUs, so all 60 sandboxes of 100 milli-CPU land on it): every
//! create is acknowledged, every sandbox exits 0, none is Lost or Unknown, no leader changes,
//! and the node's heartbeat gap stays under half the TTL while its agent starts them under
//! gVisor.

use std::process::Command;

mod common;
use common::{BERTH, text};

#[test]
fn a_burst_loses_nothing_and_moves_no_leader() {
    // Ports apart from the other dev tests' ranges (12000..14400, 14500..15300).
    let base = 16_000 + (std::process::id() % 50) as u16 * 30;
    let out = Command::new(BERTH)
        .args([
            "bench",
            "burst",
            "--sandboxes",
            "60",
            "--clients",
            "8",
            "--runtime",
            "gvisor",
            "--only-node",
            "gcp-euw4-g2-0",
        ])
        .args(["--base-port", &base.to_string(), "--json"])
        .output()
        .expect("berth bench burst");
    let stdout = text(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", text(&out.stderr)));
    assert_eq!(report["acknowledged"], 60, "{report}");
    assert_eq!(report["exited_zero"], 60, "{report}");
    assert_eq!(report["states"]["exited"], 60, "{report}");
    assert_eq!(report["leader_changes_during"], 0, "{report}");
    let gap = report["worst_heartbeat_gap_ms"].as_u64().expect("gap");
    let budget = report["heartbeat_gap_budget_ms"].as_u64().expect("budget");
    assert!(gap > 0 && gap < budget, "{report}");
    assert!(out.status.success(), "{}", text(&out.stderr));
}
