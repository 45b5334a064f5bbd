//! Filesystem snapshots to images on `berth dev` (gVisor), through the CLI and a real
//! registry (Debian's `docker-registry`): a sandbox writes a file and deletes one of its
//! image's, `berth sandbox snapshot` pushes its changes as a new image, and a new sandbox
//! from the printed reference sees the written file and not the deleted one. Paused and
//! standby sandboxes snapshot too, and a reference outside the tenant's part of the
//! repository is refused, naming the field.

use std::time::Duration;

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::counter::{NODE, berth_ok};
use common::sandboxes::{create, exec, gvisor_dev, push_busybox, wait_for_state};
use common::text;

/// What a new sandbox from `reference` sees: the written files and whether the deleted
/// one is there.
const LOOK: &str = "cat /home/sandbox/made /home/sandbox/second 2>/dev/null; \
    test -e /etc/os-release && echo os-release-there || echo os-release-gone";

#[test]
fn a_snapshot_is_an_image_a_new_sandbox_runs_with_the_changes() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let base = push_busybox(&registry, "berth-snapshot-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(dir.path(), &registry, &["--only-node", NODE]);
    let id = create(&dev, &["--image", &base, "--keep-alive"]);
    let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
    assert_eq!(state, "running", "{reason}\n{}", dev.log_tail());
    let out = exec(
        &dev,
        &id,
        &[
            "sh",
            "-c",
            "echo from-first > /home/sandbox/made && rm /etc/os-release",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A Running sandbox: its caches flushed, its changes pushed; stdout is the reference.
    let reference = berth_ok(&dev, &["sandbox", "snapshot", &id]);
    let reference = reference.trim();
    let repository = format!("{}/berth-snapshots/", registry.address);
    assert!(
        reference.starts_with(&repository) && reference.contains(&format!("/{id}:")),
        "{reference}"
    );
    let out = berth_ok(
        &dev,
        &[
            "sandbox", "create", "--image", reference, "--", "sh", "-c", LOOK,
        ],
    );
    assert_eq!(out, "from-first\nos-release-gone\n");
    // The base layer was mounted from the base's repository, not uploaded again.
    let requests = registry.requests();
    let mounts = requests
        .iter()
        .filter(|r| r.starts_with("POST ") && r.contains("mount=sha256") && r.ends_with(" 201"))
        .count();
    let uploads = requests
        .iter()
        .filter(|r| r.starts_with("PATCH /v2/berth-snapshots/"))
        .count();
    assert_eq!(mounts, 1, "{requests:#?}");
    assert_eq!(
        uploads, 2,
        "only the new layer and the config are uploaded: {requests:#?}"
    );
    // The base image is untouched.
    let out = berth_ok(
        &dev,
        &[
            "sandbox", "create", "--image", &base, "--", "sh", "-c", LOOK,
        ],
    );
    assert_eq!(out, "os-release-there\n");

    // A Paused sandbox: the checkpoint wrote everything back; a chosen name in the tenant's
    // part of the repository.
    let out = exec(
        &dev,
        &id,
        &["sh", "-c", "echo second > /home/sandbox/second"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    berth_ok(&dev, &["sandbox", "pause", &id]);
    let tenant_prefix = reference
        .rsplit_once('/')
        .map(|(prefix, _)| prefix)
        .expect("a path");
    let chosen = format!("{tenant_prefix}/workspace:v2");
    let json = berth_ok(
        &dev,
        &["sandbox", "snapshot", &id, "--reference", &chosen, "--json"],
    );
    let result: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(result["reference"], chosen.as_str(), "{json}");
    assert!(
        result["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{json}"
    );
    assert!(result["layer_bytes"].as_u64().unwrap_or(0) > 0, "{json}");
    let by_digest = format!(
        "{}@{}",
        chosen.trim_end_matches(":v2"),
        result["digest"].as_str().unwrap_or_default()
    );
    let out = berth_ok(
        &dev,
        &[
            "sandbox", "create", "--image", &by_digest, "--", "sh", "-c", LOOK,
        ],
    );
    assert_eq!(out, "from-first\nsecond\nos-release-gone\n");

    // A Standby sandbox (frozen in place): read as it stands, and left frozen.
    berth_ok(&dev, &["sandbox", "resume", &id]);
    let out = exec(&dev, &id, &["sh", "-c", "rm /home/sandbox/second && sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    berth_ok(&dev, &["sandbox", "pause", "--standby", &id]);
    let frozen = berth_ok(&dev, &["sandbox", "snapshot", &id]);
    let (state, reason) = wait_for_state(&dev, &id, "standby", Duration::from_secs(5));
    assert_eq!(state, "standby", "{reason}");
    let out = berth_ok(
        &dev,
        &[
            "sandbox",
            "create",
            "--image",
            frozen.trim(),
            "--",
            "sh",
            "-c",
            LOOK,
        ],
    );
    assert_eq!(out, "from-first\nos-release-gone\n");

    // Refusals name what is wrong.
    let elsewhere = format!("{}/someone-else/x:1", registry.address);
    let out = dev.berth(&["sandbox", "snapshot", &id, "--reference", &elsewhere]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("reference:") && text(&out.stderr).contains("outside"),
        "{}",
        text(&out.stderr)
    );
    let out = dev.berth(&["sandbox", "snapshot", "sbx-9999999999"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
}
