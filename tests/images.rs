//! Sandboxes from OCI images on `berth dev`, as a user runs them: a real registry (Debian's
//! `docker-registry`) on loopback holding a busybox image built by the test, dev's agents
//! told it is plain HTTP, and the `berth` CLI. Blob fetches are counted in the registry's
//! own access log.

use std::time::Duration;

use berth_node_agent::image::ImageProcess;
use berth_node_agent::image::testing::{self, TestRegistry};

mod common;
use common::{Dev, text};

fn agent_metrics_base() -> u16 {
    let base = 14_500 + (std::process::id() % 100) as u16 * 8;
    assert!(
        (0..7).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()),
        "agent metrics ports {base}.. are taken"
    );
    base
}

fn get(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The sum over dev's seven agents of the sample whose line starts with `series`.
fn agents_sum(metrics_base: u16, series: &str) -> f64 {
    (0..7)
        .map(|i| get(metrics_base + i))
        .flat_map(|m| {
            m.lines()
                .filter(|l| l.starts_with(series))
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .collect::<Vec<_>>()
        })
        .sum()
}

#[test]
fn dev_runs_an_image_pulls_it_once_and_names_bad_images() {
    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = format!("{}/busybox:1", registry.address);
    let runtime = tokio::runtime::Runtime::new().expect("tokio");
    runtime
        .block_on(testing::push(
            &reference,
            vec![testing::busybox_layer("berth-dev-busybox").expect("layer")],
            &ImageProcess {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo cwd=$(pwd) FROM_IMAGE=$FROM_IMAGE".into(),
                ],
                env: vec!["PATH=/bin".into(), "FROM_IMAGE=yes".into()],
                working_dir: "/home/sandbox".into(),
                ..ImageProcess::default()
            },
        ))
        .expect("push");
    let dir = tempfile::tempdir().expect("tmp");
    let metrics_base = agent_metrics_base();
    let base = metrics_base.to_string();
    let dev = Dev::start(
        dir.path(),
        &[
            "--runtime",
            "gvisor",
            "--no-autoscaler",
            "--insecure-registry",
            &registry.address,
            "--agent-metrics-port",
            &base,
        ],
    );
    let create = |args: &[&str]| {
        let mut all = vec!["sandbox", "create", "--image"];
        all.extend_from_slice(args);
        // Dev may still be registering its nodes: retry while nothing is placeable yet.
        for _ in 0..60 {
            let out = dev.berth(&all);
            if !text(&out.stderr).contains("no node") && !text(&out.stderr).contains("connect") {
                return out;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        dev.berth(&all)
    };
    let out = create(&[
        &reference,
        "--",
        "sh",
        "-c",
        "cat /etc/os-release; uname -r",
    ]);
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}\nlog:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        dev.log_tail()
    );
    let printed = text(&out.stdout);
    assert!(printed.contains("NAME=\"berth-dev-busybox\""), "{printed}");
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        !printed.contains(host.trim()),
        "the host's kernel: {printed}"
    );
    let fetched = registry.blob_gets();
    assert!(!fetched.is_empty());

    // The image's cmd, env and working directory when the spec has no command. It may land
    // on another node (which pulls it once); run it until a node that has it runs it again.
    let out = create(&[&reference]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "cwd=/home/sandbox FROM_IMAGE=yes\n");

    // Blob fetches: never more than once per node that ran the image.
    let pulls = agents_sum(
        metrics_base,
        "berth_agent_image_pulls_total{result=\"ok\"} ",
    );
    let hits = agents_sum(metrics_base, "berth_agent_image_cache_hits_total ");
    assert!((1.0..=2.0).contains(&pulls), "pulls {pulls}");
    let per_blob_max = registry.blob_gets().values().copied().max().unwrap_or(0);
    assert!(
        per_blob_max as f64 <= pulls,
        "{:?} for {pulls} pulls",
        registry.blob_gets()
    );
    assert_eq!(pulls + hits, 2.0, "pulls {pulls} hits {hits}");

    // A reference that is not one is refused at the door.
    let out = dev.berth(&[
        "sandbox",
        "create",
        "--image",
        "Not A Reference!",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("spec.image"), "{err}");
    // An image that does not exist fails the sandbox, naming it.
    let missing = format!("{}/nope:1", registry.address);
    let out = create(&[&missing, "--", "true"]);
    assert!(!out.status.success());
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains(&missing), "{all}");
}
