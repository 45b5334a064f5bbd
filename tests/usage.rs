//! Sandbox usage on `berth dev` (gVisor): one sandbox holds 64 MiB in memory and spins a
//! core; its node's cgroup readings reach `berth sandbox get` through the leader, and the
//! node totals reach the agent's `/metrics`.

use std::time::{Duration, Instant};

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::sandboxes::{create, gvisor_dev, wait_for_state};
use common::text;

#[test]
fn a_busy_sandbox_reports_its_memory_and_a_core() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = common::sandboxes::push_busybox(&registry, "berth-usage-busybox");
    // Agent i of dev's seven serves /metrics on metrics + i; the sandbox may land on any.
    let metrics = (0..200u16)
        .map(|i| 15_000 + ((std::process::id() as u16 % 200 + i) % 200) * 8)
        .find(|p| (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
        .expect("free metrics ports");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--agent-metrics-port", &metrics.to_string()],
    );
    // 64 MiB in gVisor's memory-backed /dev/shm, then a busy loop with no system calls.
    let id = create(
        &dev,
        &[
            "--image",
            &reference,
            "--cpu",
            "2",
            "--memory",
            "512Mi",
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/dev/shm/hold bs=1M count=64 2>/dev/null; while :; do :; done",
        ],
    );
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());

    // Two samples (5 s apart by default) give a CPU rate.
    let deadline = Instant::now() + Duration::from_secs(40);
    let (cpu, memory) = loop {
        let out = dev.berth(&["sandbox", "get", &id, "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let usage = &v["status"]["usage"];
        let cpu = usage["cpu_milli"].as_u64().unwrap_or(0);
        let memory = usage["memory_bytes"].as_u64().unwrap_or(0);
        if (cpu >= 700 && memory >= 64 << 20) || Instant::now() > deadline {
            break (cpu, memory);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(memory >= 64 << 20, "memory {memory} bytes, below 64 MiB");
    assert!(
        (700..=1_300).contains(&cpu),
        "cpu {cpu} milli-cores, not near one core"
    );
    // The node totals on the agents' /metrics.
    let total: f64 = (0..7)
        .map(|i| scrape(metrics + i, "berth_agent_sandbox_memory_bytes"))
        .sum();
    assert!(
        total >= f64::from(64u32 << 20),
        "agents' memory total {total}"
    );
    eprintln!("usage: cpu {cpu} milli-cores, memory {memory} bytes; agents' total {total}");
    let shown = dev.berth(&["sandbox", "get", &id]);
    eprintln!("{}", text(&shown.stdout));
    assert!(
        text(&shown.stdout).contains(" cpu, "),
        "{}",
        text(&shown.stdout)
    );
    dev.berth(&["sandbox", "delete", &id]);
}

/// A metric's value on `127.0.0.1:port/metrics` (0 when absent).
fn scrape(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}
