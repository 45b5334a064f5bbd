//! A gVisor sandbox on `berth dev` with a counter in its memory, for the pause and standby
//! tests: a shell loop keeping `i` in memory, and the checks that it is the same process
//! counting on after a resume.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::sandboxes::{create, exec, wait_for_state};
use super::{Dev, text};

/// The one node these tests run on (a small one: 8 CPUs, one L4).
pub(crate) const NODE: &str = "gcp-euw4-g2-0";

/// Starts a counter in the sandbox: a shell loop keeping `i` in its memory, writing it to
/// /tmp/count every 100 ms, its pid in /tmp/pid.
pub(crate) const COUNTER: &str = "echo kept > /tmp/file; \
    (i=0; echo $$ > /tmp/pid; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done) \
    </dev/null >/dev/null 2>&1 &";

/// Runs `berth ARGS` against `dev`, which must succeed; its stdout.
pub(crate) fn berth_ok(dev: &Dev, args: &[&str]) -> String {
    let out = dev.berth(args);
    assert!(
        out.status.success(),
        "berth {args:?}: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        dev.log_tail()
    );
    text(&out.stdout)
}

/// The node as `node list -o json` shows it.
pub(crate) fn node_json(dev: &Dev, node: &str) -> serde_json::Value {
    let out = dev.berth(&["node", "list", "-o", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.into_iter()
        .find(|n| n["node_id"] == node)
        .unwrap_or_default()
}

pub(crate) fn read(dev: &Dev, id: &str, path: &str) -> String {
    let out = exec(dev, id, &["cat", path]);
    assert!(
        out.status.success(),
        "cat {path}: {}\n{}",
        text(&out.stderr),
        dev.log_tail()
    );
    text(&out.stdout).trim().to_owned()
}

pub(crate) fn count(dev: &Dev, id: &str) -> u64 {
    read(dev, id, "/tmp/count").parse().unwrap_or(0)
}

/// Waits until the counter has counted past `n`.
pub(crate) fn counting_past(dev: &Dev, id: &str, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = count(dev, id);
        if c > n || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sandbox's directory under the dev agent of `node`.
/// After a resume: `/tmp/file` is there, the counter is the process `pid` that was paused,
/// and it counts past `before`; the count it reached.
pub(crate) fn same_process_counting_on(dev: &Dev, id: &str, pid: &str, before: u64) -> u64 {
    assert_eq!(read(dev, id, "/tmp/file"), "kept");
    assert_eq!(read(dev, id, "/tmp/pid"), pid, "the counter was restarted");
    counting_past(dev, id, before)
}

pub(crate) fn sandbox_dir(data: &Path, node: &str, id: &str) -> PathBuf {
    data.join("agents").join(node).join("sandboxes").join(id)
}

pub(crate) fn running_sandbox(dev: &Dev, reference: &str) -> String {
    let id = create(
        dev,
        &[
            "--image",
            reference,
            "--keep-alive",
            "--cpu",
            "2",
            "--memory",
            "256Mi",
        ],
    );
    let (state, reason) = wait_for_state(dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
    let out = exec(dev, &id, &["sh", "-c", COUNTER]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    id
}
