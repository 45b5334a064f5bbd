//! Sandboxes on `berth dev` through the CLI: create, wait for a state, exec; and the busybox
//! test image pushed to a test registry.

use std::time::{Duration, Instant};

use berth_node_agent::image::ImageProcess;
use berth_node_agent::image::testing::{self, TestRegistry};

use super::{Dev, text};

/// `berth dev` on gVisor without the autoscaler, pulling from `registry`, with `extra`.
pub(crate) fn gvisor_dev(dir: &std::path::Path, registry: &TestRegistry, extra: &[&str]) -> Dev {
    let mut args = vec![
        "--runtime",
        "gvisor",
        "--no-autoscaler",
        "--insecure-registry",
        registry.address.as_str(),
    ];
    args.extend_from_slice(extra);
    Dev::start(dir, &args)
}

/// Pushes a busybox image (`sh` as its cmd) as `<registry>/busybox:1`; returns the reference.
pub(crate) fn push_busybox(registry: &TestRegistry, layer_name: &str) -> String {
    let reference = format!("{}/busybox:1", registry.address);
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(testing::push(
        &reference,
        vec![testing::busybox_layer(layer_name).expect("layer")],
        &ImageProcess {
            cmd: vec!["sh".into()],
            env: vec!["PATH=/bin".into()],
            ..ImageProcess::default()
        },
    ))
    .expect("push");
    reference
}

/// The sandbox's state and reason, from `sandbox get -o json`.
pub(crate) fn state_of(dev: &Dev, id: &str) -> (String, String) {
    let out = dev.berth(&["sandbox", "get", id, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        v["status"]["state"].as_str().unwrap_or_default().to_owned(),
        v["status"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

pub(crate) fn wait_for_state(
    dev: &Dev,
    id: &str,
    want: &str,
    within: Duration,
) -> (String, String) {
    let deadline = Instant::now() + within;
    loop {
        let (state, reason) = state_of(dev, id);
        if state == want || Instant::now() > deadline {
            return (state, reason);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates a detached sandbox and returns its id, retrying while dev registers its nodes.
pub(crate) fn create(dev: &Dev, args: &[&str]) -> String {
    let mut all = vec!["sandbox", "create", "--detach"];
    all.extend_from_slice(args);
    for _ in 0..60 {
        let out = dev.berth(&all);
        if out.status.success() {
            return text(&out.stdout).trim().to_owned();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let out = dev.berth(&all);
    panic!("create: {}\n{}", text(&out.stderr), dev.log_tail());
}

pub(crate) fn exec(dev: &Dev, id: &str, command: &[&str]) -> std::process::Output {
    let mut all = vec!["sandbox", "exec", id, "--"];
    all.extend_from_slice(command);
    dev.berth(&all)
}
