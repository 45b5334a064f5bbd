//! The image cache against a real registry (Debian's `docker-registry` on loopback), with
//! images built here from the host's static busybox. Blob fetches are counted in the
//! registry's own access log.

use std::sync::Arc;

use berth_node_agent::image::testing::{self, TestRegistry};
use berth_node_agent::image::{ImageProcess, ImageSettings, ImageStore, RegistryConfig};
use berth_node_agent::metrics::AgentMetrics;

fn store(dir: &std::path::Path, registry: &TestRegistry, max_bytes: u64) -> ImageStore {
    ImageStore::open(
        ImageSettings {
            dir: dir.to_path_buf(),
            max_bytes,
            max_concurrent_pulls: 4,
            registries: vec![RegistryConfig {
                host: registry.address.clone(),
                insecure: true,
                ..RegistryConfig::default()
            }],
        },
        Arc::new(AgentMetrics::new()),
    )
    .expect("store")
}

async fn push_busybox(registry: &TestRegistry, name: &str, extra: &[u8]) -> String {
    let reference = format!("{}/{name}", registry.address);
    let top = testing::layer(&[testing::LayerEntry::File("etc/extra", extra, 0o644)]).expect("top");
    let process = ImageProcess {
        cmd: vec!["sh".into(), "-c".into(), "env; pwd".into()],
        env: vec!["PATH=/bin".into(), "FROM_IMAGE=yes".into()],
        working_dir: "/tmp".into(),
        ..ImageProcess::default()
    };
    testing::push(
        &reference,
        vec![testing::busybox_layer(name).expect("busybox"), top],
        &process,
    )
    .await
    .expect("push");
    reference
}

#[tokio::test]
async fn concurrent_pulls_fetch_each_blob_once_and_a_second_sandbox_fetches_none() {
    let registry = TestRegistry::start().expect("registry");
    let reference = push_busybox(&registry, "busybox:1", b"one").await;
    let before = registry.blob_gets();
    let tmp = tempfile::tempdir().expect("tmp");
    let images = store(tmp.path(), &registry, 1 << 30);
    let pulls: Vec<_> = (0..6)
        .map(|i| {
            let images = images.clone();
            let reference = reference.clone();
            tokio::spawn(async move { images.ensure(&reference, &format!("sbx-{i}")).await })
        })
        .collect();
    let mut digests = Vec::new();
    for p in pulls {
        digests.push(p.await.expect("task").expect("pull").digest);
    }
    digests.dedup();
    assert_eq!(digests.len(), 1);
    let after = registry.blob_gets();
    let fetched: Vec<(&String, usize)> = after
        .iter()
        .map(|(d, n)| (d, n - before.get(d).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    // Two layers and the config, each fetched exactly once.
    assert_eq!(fetched.len(), 3, "{fetched:?}");
    assert!(fetched.iter().all(|(_, n)| *n == 1), "{fetched:?}");
    let image = images
        .ensure(&reference, "sbx-again")
        .await
        .expect("cached");
    assert_eq!(registry.blob_gets(), after, "a cached image fetched a blob");
    assert!(image.rootfs.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read(image.rootfs.join("etc/extra")).expect("extra"),
        b"one"
    );
    assert_eq!(image.process.working_dir, "/tmp");
    assert_eq!(images.references(10), std::slice::from_ref(&reference));
    // A new store on the same directory finds it without the registry.
    drop(registry);
    let reopened = ImageStore::open(
        ImageSettings {
            dir: tmp.path().to_path_buf(),
            max_bytes: 1 << 30,
            max_concurrent_pulls: 1,
            registries: vec![],
        },
        Arc::new(AgentMetrics::new()),
    )
    .expect("reopen");
    assert_eq!(
        reopened
            .ensure(&reference, "sbx-x")
            .await
            .expect("offline")
            .digest,
        image.digest
    );
}

#[tokio::test]
async fn failures_name_the_image_and_the_cause() {
    let registry = TestRegistry::start().expect("registry");
    let tmp = tempfile::tempdir().expect("tmp");
    let images = store(tmp.path(), &registry, 1 << 30);
    let err = images
        .ensure("Not A Reference!", "s1")
        .await
        .expect_err("bad ref");
    assert!(
        err.to_string().contains("not a valid image reference"),
        "{err}"
    );
    let missing = format!("{}/nope:1", registry.address);
    let err = images.ensure(&missing, "s2").await.expect_err("missing");
    let text = err.to_string();
    assert!(
        text.contains(&missing) && text.contains("manifest"),
        "{text}"
    );
    // A layer corrupted in the registry's storage fails verification, named by digest.
    let reference = push_busybox(&registry, "corrupt:1", b"x").await;
    let blobs: Vec<String> =
        std::fs::read_dir(registry.storage.join("docker/registry/v2/blobs/sha256"))
            .expect("blobs")
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).expect("dir").flatten())
            .map(|e| format!("sha256:{}", e.file_name().to_string_lossy()))
            .collect();
    // The biggest blob is the busybox layer.
    let layer = blobs
        .iter()
        .max_by_key(|d| {
            let hex = d.trim_start_matches("sha256:");
            std::fs::metadata(
                registry
                    .storage
                    .join("docker/registry/v2/blobs/sha256")
                    .join(&hex[..2])
                    .join(hex)
                    .join("data"),
            )
            .map(|m| m.len())
            .unwrap_or(0)
        })
        .expect("a blob")
        .clone();
    registry.corrupt_blob(&layer).expect("corrupt");
    let err = images.ensure(&reference, "s3").await.expect_err("corrupt");
    assert!(err.to_string().contains(&layer), "{err}");
    assert!(images.references(10).is_empty());
}

#[tokio::test]
async fn the_least_recently_used_unused_image_is_evicted_past_the_limit() {
    let registry = TestRegistry::start().expect("registry");
    let a = push_busybox(&registry, "a:1", b"a").await;
    let b = push_busybox(&registry, "b:1", b"b").await;
    let c = push_busybox(&registry, "c:1", b"c").await;
    let tmp = tempfile::tempdir().expect("tmp");
    // Measure one image, then allow a little over two.
    let probe_dir = tempfile::tempdir().expect("probe");
    let probe = store(probe_dir.path(), &registry, 1 << 30);
    probe.ensure(&a, "p").await.expect("probe");
    let one = probe.size_bytes();
    let images = store(tmp.path(), &registry, one * 2 + one / 2);
    images.ensure(&a, "sa").await.expect("a");
    images.ensure(&b, "sb").await.expect("b");
    images.unpin("sa");
    images.unpin("sb");
    // a is used again, so b is now the least recently used.
    images.ensure(&a, "sa2").await.expect("a again");
    images.unpin("sa2");
    images.ensure(&c, "sc").await.expect("c");
    let held = images.references(10);
    assert!(
        held.contains(&a) && held.contains(&c) && !held.contains(&b),
        "{held:?}"
    );
    assert!(images.size_bytes() <= one * 2 + one / 2);
    // A pinned image is never evicted: with c pinned and a unpinned, pulling b evicts a.
    images.ensure(&b, "sb2").await.expect("b again");
    let held = images.references(10);
    assert!(
        held.contains(&b) && held.contains(&c) && !held.contains(&a),
        "{held:?}"
    );
}
