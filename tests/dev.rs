//! `berth dev` as a user runs it: one process with three scheduler replicas and seven
//! agents, driven through the `berth` CLI. Sandboxes run under gVisor (`runsc`, which
//! `scripts/test` installs); the test fails rather than silently falling back when runsc
//! is missing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// Six consecutive free ports (three gRPC, three metrics) outside the ranges the other
/// tests' clusters draw from.
fn free_ports() -> u16 {
    let start = 12_000 + (std::process::id() % 400) as u16 * 6;
    for offset in 0..400u16 {
        let base = 12_000 + (start - 12_000 + offset * 6) % 2_400;
        if (0..6).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports in 12000..14400");
}

struct Dev {
    child: Child,
    endpoint: String,
    log: std::path::PathBuf,
}

impl Dev {
    fn start(dir: &Path) -> Dev {
        let port = free_ports();
        let log = dir.join("dev.log");
        let child = Command::new(BERTH)
            .args(["dev", "--runtime", "gvisor", "--data-dir"])
            .arg(dir.join("state"))
            .args(["--port", &port.to_string()])
            .args(["--metrics-port", &(port + 3).to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("dev.out")).expect("out"))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn berth dev");
        Dev {
            child,
            endpoint: format!("127.0.0.1:{port}"),
            log,
        }
    }

    fn berth(&self, args: &[&str]) -> Output {
        // `berth <group> <verb> --endpoint E ...`: before any `--` command.
        Command::new(BERTH)
            .args(&args[..2])
            .args(["--endpoint", &self.endpoint])
            .args(&args[2..])
            .output()
            .expect("run berth")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn dev_runs_a_gpu_sandbox_under_gvisor_and_the_cli_exits_with_its_code() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut dev = Dev::start(dir.path());

    // Wait until all seven nodes are Ready.
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    let mut client = Client::new(vec![dev.endpoint.clone()]);
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
    let signalled = Command::new("kill")
        .args(["-INT", &dev.child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(signalled.success());
    let started = Instant::now();
    loop {
        if let Some(status) = dev.child.try_wait().expect("wait") {
            assert!(status.success(), "berth dev exited with {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "berth dev did not stop on SIGINT; log:\n{}",
            dev.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
