//! The autoscaler end to end: `berth dev` with no static nodes and one local node group
//! that starts at zero. Pending GPU sandboxes make the autoscaler start real `berth agent`
//! processes through the local provider; once the sandboxes finish and the cooldown
//! passes, it removes the nodes again. Sandboxes run as plain processes here (the gVisor
//! path is covered by tests/dev.rs), so twenty of them fit on two cores.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;

mod common;
use common::{Dev, text};

const SANDBOXES: usize = 20;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("autoscaler.toml");
    let body = format!(
        r#"
[autoscaler]
interval_ms = 500
scale_down_cooldown_s = 3

[autoscaler.providers.local]
kind = "local"
work_dir = "{}"
runtime = "process"

[[autoscaler.node_groups]]
name = "h100"
provider = "local"
region = "local-1"
instance_type = "local.8xh100"
gpu_model = "H100"
gpu_count = 8
cpu_milli = 64000
memory_mib = 262144
price_per_hour_usd = 98.32
min_nodes = 0
max_nodes = 4
"#,
        dir.join("local-provider").display()
    );
    std::fs::write(&path, body).expect("write the config");
    path
}

fn group_nodes(nodes: &[pb::Node]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| n.inventory.as_ref())
        .filter(|i| i.labels.get("berth.dev/node-group").map(String::as_str) == Some("h100"))
        .map(|i| i.node_id.clone())
        .collect()
}

#[test]
fn pending_gpu_sandboxes_scale_a_group_up_from_zero_and_idle_nodes_go_back_to_zero() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = config(dir.path());
    let cfg = cfg.display().to_string();
    let mut dev = Dev::start(
        dir.path(),
        &[
            "--runtime",
            "process",
            "--no-static-nodes",
            "--autoscaler-config",
            &cfg,
        ],
    );
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let mut client = dev.client();
    let started = Instant::now();
    while runtime.block_on(client.status()).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "berth dev did not come up; log:\n{}",
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let nodes = runtime
        .block_on(client.list_nodes(pb::ListNodesRequest::default()))
        .expect("list nodes")
        .nodes;
    assert!(nodes.is_empty(), "no node before demand: {nodes:?}");

    // Twenty one-GPU sandboxes, with nothing to run on.
    let mut ids = Vec::new();
    for i in 0..SANDBOXES {
        let out = dev.berth(&[
            "sandbox",
            "create",
            "--gpu",
            "H100:1",
            "--detach",
            "--",
            "sh",
            "-c",
            &format!("sleep 3; echo done {i}"),
        ]);
        assert!(out.status.success(), "create: {}", text(&out.stderr));
        ids.push(text(&out.stdout).trim().to_owned());
    }

    // The group grows from zero and every sandbox runs to completion.
    let mut most_nodes = 0;
    let mut seen_nodes = std::collections::BTreeSet::new();
    let started = Instant::now();
    let finished: BTreeMap<String, pb::SandboxStatus> = loop {
        let nodes = runtime
            .block_on(client.list_nodes(pb::ListNodesRequest::default()))
            .map(|r| r.nodes)
            .unwrap_or_default();
        let ours = group_nodes(&nodes);
        most_nodes = most_nodes.max(ours.len());
        seen_nodes.extend(ours);
        let sandboxes = runtime
            .block_on(client.list_sandboxes(pb::ListSandboxesRequest {
                page_size: 1000,
                ..Default::default()
            }))
            .map(|r| r.sandboxes)
            .unwrap_or_default();
        let done: BTreeMap<String, pb::SandboxStatus> = sandboxes
            .iter()
            .filter_map(|s| Some((s.id.clone(), s.status.clone()?)))
            // Terminal states only (UNKNOWN, numbered after them, is not an end).
            .filter(|(_, st)| {
                [
                    pb::SandboxState::Exited,
                    pb::SandboxState::Failed,
                    pb::SandboxState::Lost,
                ]
                .contains(&pb::SandboxState::try_from(st.state).unwrap_or_default())
            })
            .collect();
        if done.len() == SANDBOXES {
            break done;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} of {SANDBOXES} sandboxes finished after 120 s; nodes {seen_nodes:?}; log:\n{}",
            done.len(),
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    for id in &ids {
        let status = finished
            .get(id)
            .unwrap_or_else(|| panic!("{id} is not listed"));
        assert_eq!(
            status.state,
            pb::SandboxState::Exited as i32,
            "{id}: {status:?}"
        );
        assert_eq!(status.exit_code, 0, "{id}: {status:?}");
        assert!(status.started_unix_ms > 0, "{id} never ran: {status:?}");
        assert_eq!(status.gpu_model, "H100");
        assert!(
            status.node_id.starts_with("h100-"),
            "{id} ran on {}",
            status.node_id
        );
    }
    assert_eq!(
        most_nodes, 3,
        "20 one-GPU sandboxes pack onto three 8-GPU nodes (seen {seen_nodes:?})"
    );

    let metrics = dev.metrics(3);
    for line in [
        "berth_autoscaler_lease_held 1",
        "berth_autoscaler_decisions_total{kind=\"scale_up\",reason=\"pending\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }

    // Idle past the 3 s cooldown, the group goes back to zero.
    let started = Instant::now();
    loop {
        let nodes = runtime
            .block_on(client.list_nodes(pb::ListNodesRequest::default()))
            .map(|r| r.nodes)
            .unwrap_or_default();
        if group_nodes(&nodes).is_empty() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group still has {:?} 60 s after its sandboxes finished; log:\n{}",
            group_nodes(&nodes),
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let idle_for = started.elapsed();
    println!(
        "group back to 0 nodes {} ms after the last sandbox finished",
        idle_for.as_millis()
    );

    let metrics = dev.metrics(3);
    let removed = "berth_autoscaler_decisions_total{kind=\"scale_down\",reason=\"idle\"} 3";
    assert!(
        metrics.contains(removed),
        "{removed} missing from:\n{metrics}"
    );

    // The decisions are in the replicated record, with their reasons.
    let out = dev.berth(&["cluster", "status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    assert!(status.contains("autoscaler: lease held by"), "{status}");
    let bought: u32 = status
        .lines()
        .filter_map(|l| l.split("scale-up h100 +").nth(1))
        .filter_map(|rest| rest.split(':').next()?.parse::<u32>().ok())
        .sum();
    assert_eq!(bought, 3, "three nodes bought in all: {status}");
    assert!(
        status.contains("pending H100"),
        "the reason names the demand: {status}"
    );
    assert_eq!(
        status.matches("scale-down h100 -h100-").count(),
        3,
        "{status}"
    );

    let exit = dev.interrupt(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| s.success()),
        "berth dev did not stop cleanly ({exit:?}); log:\n{}",
        dev.log_tail()
    );
}
