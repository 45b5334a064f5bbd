//! `berth dev` as a user runs it: one process with three scheduler replicas and seven
//! agents, driven through the `berth` CLI. Sandboxes run under gVisor (`runsc`, which
//! `scripts/test` installs); the test fails rather than silently falling back when runsc
//! is missing.

use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;

mod common;
use common::{Dev, text};

#[test]
fn dev_runs_a_gpu_sandbox_under_gvisor_and_the_cli_exits_with_its_code() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(dir.path(), &["--runtime", "gvisor"]);

    // Wait until all seven nodes are Ready.
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let mut client = dev.client();
    let started = Instant::now();
    let nodes: Vec<pb::Node> = loop {
        let nodes = runtime
            .block_on(client.list_nodes(pb::ListNodesRequest::default()))
            .map(|r| r.nodes)
            .unwrap_or_default();
        if nodes
            .iter()
            .filter(|n| n.status == pb::NodeStatus::Ready as i32)
            .count()
            == 7
        {
            break nodes;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "berth dev did not bring up 7 ready nodes; log:\n{}",
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let listed = dev.berth(&["node", "list"]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    assert_eq!(
        text(&listed.stdout).matches("ready").count(),
        7,
        "{}",
        text(&listed.stdout)
    );

    // Two H100s: the sandbox prints the two UUIDs it was given.
    let out = dev.berth(&[
        "sandbox",
        "create",
        "--gpu",
        "H100:2",
        "--",
        "sh",
        "-c",
        "echo $CUDA_VISIBLE_DEVICES",
    ]);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}\nlog:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        dev.log_tail()
    );
    let printed = text(&out.stdout);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "{printed:?}");
    let uuids: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(uuids.len(), 2, "{printed:?}");
    assert_ne!(uuids[0], uuids[1]);
    // Both belong to one H100 node's inventory.
    let owners: Vec<(String, String)> = nodes
        .iter()
        .filter_map(|n| n.inventory.as_ref())
        .flat_map(|inv| {
            inv.gpus
                .iter()
                .map(|g| (g.uuid.clone(), format!("{}/{}", inv.node_id, g.model)))
        })
        .collect();
    let owner = |uuid: &str| {
        owners
            .iter()
            .find(|(u, _)| u == uuid)
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("{uuid} is not in any node's inventory: {owners:?}"))
    };
    assert_eq!(owner(uuids[0]), owner(uuids[1]));
    assert!(owner(uuids[0]).ends_with("/H100"), "{}", owner(uuids[0]));

    // The CLI exits with the sandbox's exit code.
    let out = dev.berth(&["sandbox", "create", "--", "sh", "-c", "echo bye; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bye\n");

    // It ran under gVisor: the sandbox sees gVisor's kernel, not the host's.
    let out = dev.berth(&["sandbox", "create", "--", "uname", "-r"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let host = text(
        &Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname")
            .stdout,
    );
    assert_ne!(text(&out.stdout), host, "the sandbox saw the host kernel");

    // Operators cordon and drain nodes.
    let out = dev.berth(&[
        "node",
        "cordon",
        "aws-usw2-g4dn-0",
        "--reason",
        "maintenance",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("cordoned"),
        "{}",
        text(&out.stdout)
    );
    let out = dev.berth(&["node", "drain", "aws-usw2-g4dn-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("draining"),
        "{}",
        text(&out.stdout)
    );
    let out = dev.berth(&["node", "list"]);
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("aws-usw2-g4dn-0") && l.contains("cordoned")),
        "{table}"
    );

    // Ctrl-C stops it cleanly.
    let status = dev.interrupt(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "berth dev did not stop cleanly on SIGINT ({status:?}); log:\n{}",
        dev.log_tail()
    );
}
