//! Warm pools on `berth dev` (gVisor), through the CLI: a pool of 10 fills (its sandboxes
//! on standby, holding memory and no CPU, and not paused to disk however long they wait),
//! 10 matching creates are each served by a sandbox that existed before the create (with
//! the create's env in its execs), the pool refills to 10, a create that does not match is
//! made afresh, and deleting the pool deletes its unclaimed sandboxes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::counter::{NODE, berth_ok, node_json};
use common::sandboxes::{exec, gvisor_dev, push_busybox, wait_for_state};
use common::{Dev, text};

const SIZE: u64 = 10;

fn pool(dev: &Dev) -> serde_json::Value {
    let out = berth_ok(dev, &["pool", "list", "-o", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    all.into_iter()
        .find(|p| p["name"] == "warm")
        .unwrap_or_default()
}

/// Waits until the pool has `SIZE` ready sandboxes.
fn wait_full(dev: &Dev, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let p = pool(dev);
        if p["ready"] == SIZE || Instant::now() > deadline {
            return p;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn create_json(dev: &Dev, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["sandbox", "create", "--detach", "-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&berth_ok(dev, &all)).expect("json")
}

#[test]
fn a_warm_pool_serves_matching_creates_with_sandboxes_made_before_them_and_refills() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-pool-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    // Standby sandboxes are paused to disk after 1 s, except a pool's.
    let dev = gvisor_dev(
        dir.path(),
        &registry,
        &["--only-node", NODE, "--standby-pause-after", "1s"],
    );
    let shape = [
        "--tenant", "default", "--image", &reference, "--cpu", "0.25", "--memory", "64Mi",
    ];
    let mut set = vec!["pool", "set", "warm", "--size", "10"];
    set.extend_from_slice(&shape);
    // Retried while dev registers its node and elects its leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dev.berth(&set).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    let full = wait_full(&dev, Duration::from_secs(180));
    assert_eq!(full["ready"], SIZE, "{full}\n{}", dev.log_tail());
    // On standby, past the 1 s after which another sandbox would be paused to disk.
    std::thread::sleep(Duration::from_secs(3));
    let listed = berth_ok(
        &dev,
        &["sandbox", "list", "--state", "standby", "-o", "json"],
    );
    let standby: Vec<serde_json::Value> = serde_json::from_str(&listed).expect("json");
    let members: Vec<&serde_json::Value> = standby
        .iter()
        .filter(|s| s["status"]["pool"] == "warm")
        .collect();
    assert_eq!(members.len() as u64, SIZE, "{listed}");
    let node = node_json(&dev, NODE);
    assert_eq!(
        node["cpu_milli_allocated"], 0,
        "standby holds no CPU: {node}"
    );
    assert_eq!(node["memory_mib_allocated"], 640, "{node}");

    // Ten matching creates, each served at once by a sandbox made before it.
    let mut claimed = Vec::new();
    for i in 0..SIZE {
        let before = unix_ms();
        let env = format!("TASK=task-{i}");
        let mut args = vec!["--keep-alive", "--env", &env];
        args.extend_from_slice(&shape);
        let created = create_json(&dev, &args);
        assert_eq!(created["from_pool"], "warm", "{created}\n{}", pool(&dev));
        let made = created["status"]["created_unix_ms"]
            .as_u64()
            .unwrap_or(u64::MAX);
        assert!(made < before, "made at {made}, the create came at {before}");
        claimed.push(created["id"].as_str().expect("id").to_owned());
    }
    for (i, id) in claimed.iter().enumerate() {
        let (state, reason) = wait_for_state(&dev, id, "running", Duration::from_secs(30));
        assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
        let out = exec(&dev, id, &["sh", "-c", "echo $TASK"]);
        assert_eq!(
            text(&out.stdout).trim(),
            format!("task-{i}"),
            "{}",
            text(&out.stderr)
        );
        let got = berth_ok(&dev, &["sandbox", "get", id]);
        assert!(got.contains("claimed from warm pool warm"), "{got}");
    }
    let p = pool(&dev);
    assert_eq!(p["claimed"], SIZE, "{p}");

    // It refills to 10.
    let full = wait_full(&dev, Duration::from_secs(180));
    assert_eq!(full["ready"], SIZE, "{full}\n{}", dev.log_tail());
    assert_eq!(full["created"], 2 * SIZE, "{full}");

    // Another shape is made afresh.
    let other = create_json(
        &dev,
        &[
            "--keep-alive",
            "--image",
            &reference,
            "--cpu",
            "0.5",
            "--memory",
            "64Mi",
        ],
    );
    assert_eq!(other["from_pool"], "", "{other}");
    // Deleted now, not left starting when dev stops (its shim would outlive the test).
    berth_ok(
        &dev,
        &[
            "sandbox",
            "delete",
            other["id"].as_str().unwrap_or_default(),
        ],
    );

    // Deleting the pool deletes its unclaimed sandboxes; the claimed ones run on.
    berth_ok(&dev, &["pool", "delete", "warm"]);
    let listed = berth_ok(
        &dev,
        &["sandbox", "list", "--state", "standby", "-o", "json"],
    );
    let standby: Vec<serde_json::Value> = serde_json::from_str(&listed).expect("json");
    assert!(standby.is_empty(), "{listed}");
    let out = exec(&dev, &claimed[0], &["true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let gone = dev.berth(&["pool", "delete", "warm"]);
    assert!(!gone.status.success());
    assert!(
        text(&gone.stderr).contains("no warm pool"),
        "{}",
        text(&gone.stderr)
    );
}
