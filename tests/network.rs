//! Sandbox network policies on `berth dev` (gVisor): a network namespace made here stands
//! for the outside world, with a web server on each of two addresses. An allow-list
//! reaches the allowed one only; `none` reaches neither; `egress_all` reaches both but
//! never berth's own ports or any other service on the host.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use berth_node_agent::image::testing::TestRegistry;

mod common;
use common::sandboxes::{create, exec, gvisor_dev, push_busybox, state_of, wait_for_state};
use common::{Dev, text};

/// The outside world: namespace `bt-ext-N` joined to the host by a veth pair, the host at
/// `10.77.N.1/24`, web servers at `.2` and `.3` (port 8080) answering with their address.
struct Outside {
    ns: String,
    prefix: String,
    servers: Vec<Child>,
    _www: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

impl Outside {
    fn start() -> Outside {
        let n = std::process::id() % 200 + 20;
        let ns = format!("bt-ext-{n}");
        let host_if = format!("btx{n}");
        let prefix = format!("10.77.{n}");
        let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{prefix}.2/24"), "dev", "eth0"],
            vec!["addr", "add", &format!("{prefix}.3/24"), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut all = vec!["-n", ns.as_str()];
            all.extend(cmd.iter().map(|s| &**s));
            ip(&all);
        }
        let www = tempfile::tempdir().expect("tmp");
        let mut servers = Vec::new();
        for last in [2, 3] {
            let root = www.path().join(last.to_string());
            std::fs::create_dir_all(&root).expect("www");
            std::fs::write(
                root.join("index.html"),
                format!("served-by-{prefix}.{last}\n"),
            )
            .expect("index");
            servers.push(
                Command::new("ip")
                    .args(["netns", "exec", &ns, "busybox", "httpd", "-f"])
                    .arg("-p")
                    .arg(format!("{prefix}.{last}:8080"))
                    .arg("-h")
                    .arg(&root)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("busybox httpd"),
            );
        }
        Outside {
            ns,
            prefix,
            servers,
            _www: www,
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .output();
    }
}

/// `reached` or `blocked`, then what came back: sends an HTTP request from the sandbox to
/// `host:port`. Every server probed answers something (a web page, a greeting, an HTTP/2
/// refusal of HTTP/1), so a connection that opens has output or a clean exit; one that
/// never opens has neither (gVisor's connect can outlast nc's `-w`, hence `timeout`).
fn probe(dev: &Dev, id: &str, host: &str, port: u16) -> String {
    let script = format!(
        "out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 3 nc -w 1 {host} {port} 2>&1); rc=$?; \
         case \"$rc:$out\" in 0:*) echo reached;; *\"can't connect\"* | *\"timed out\"*) echo blocked;; *:) echo blocked;; \
         *) echo reached;; esac; echo \"rc=$rc $out\""
    );
    let out = exec(dev, id, &["sh", "-c", &script]);
    assert!(out.status.success(), "exec: {}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn policies_decide_what_a_sandbox_reaches_and_berth_itself_is_never_reachable() {
    let outside = Outside::start();
    let p = outside.prefix.clone();
    // A service on every host address, as an operator's own daemons would be.
    let host_service = TcpListener::bind("0.0.0.0:0").expect("bind");
    let host_port = host_service.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut c in host_service.incoming().flatten() {
            let _ = c.write_all(b"host-service\n");
        }
    });

    let registry = TestRegistry::start().expect("docker-registry (scripts/test installs it)");
    let reference = push_busybox(&registry, "berth-network-busybox");
    let dir = tempfile::tempdir().expect("tmp");
    let dev = gvisor_dev(dir.path(), &registry, &[]);
    let start = |extra: &[&str]| {
        let mut args = vec!["--image", reference.as_str(), "--keep-alive"];
        args.extend_from_slice(extra);
        let id = create(&dev, &args);
        let (state, reason) = wait_for_state(&dev, &id, "running", Duration::from_secs(60));
        assert_eq!(state, "running", "{extra:?}: {reason}\n{}", dev.log_tail());
        id
    };
    let allowed = format!("{p}.2:8080");
    let only = start(&["--allow", &allowed]);
    let none = start(&[]);
    let all = start(&["--network", "egress-all"]);

    let two = format!("{p}.2");
    let three = format!("{p}.3");
    let got = probe(&dev, &only, &two, 8080);
    assert!(
        got.contains(&format!("served-by-{p}.2")),
        "allow-list, allowed: {got}"
    );
    for (id, to, what) in [
        (&only, &three, "allow-list, the other address"),
        (&none, &two, "none"),
        (&none, &three, "none"),
    ] {
        let got = probe(&dev, id, to, 8080);
        assert!(got.starts_with("blocked"), "{what} reached {to}: {got}");
    }
    let got = probe(&dev, &all, &three, 8080);
    assert!(
        got.contains(&format!("served-by-{p}.3")),
        "egress_all, .3: {got}"
    );

    // berth's own ports (the replicas' gRPC and metrics), the agent's metrics and the host
    // service: not on the sandbox's loopback, not through the host's addresses.
    let berth_port: u16 = dev
        .endpoint
        .rsplit(':')
        .next()
        .expect("test value")
        .parse()
        .expect("test value");
    let mut ports: Vec<u16> = (0..4).map(|i| berth_port + i).collect();
    ports.push(host_port);
    let host = format!("{p}.1");
    for port in ports {
        for target in ["127.0.0.1", host.as_str()] {
            let got = probe(&dev, &all, target, port);
            assert!(
                got.starts_with("blocked"),
                "egress_all reached {target}:{port}: {got}"
            );
        }
    }
    // The same host service is there for anyone else on the outside network.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &outside.ns,
            "busybox",
            "nc",
            "-w",
            "3",
            &host,
        ])
        .arg(host_port.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("nc");
    assert!(
        text(&out.stdout).contains("host-service"),
        "the host service is up"
    );

    // The policy is in the spec as the user gave it.
    let got = dev.berth(&["sandbox", "get", &only]);
    assert!(
        text(&got.stdout).contains(&format!("network: allow {p}.2/32:8080")),
        "{}",
        text(&got.stdout)
    );
    for id in [&only, &none, &all] {
        dev.berth(&["sandbox", "delete", id]);
    }
    // Each sandbox's namespace, rules and slot go with it (a deleted sandbox ends, or is
    // gone from the state: `get` finds nothing).
    for id in [&only, &none, &all] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !matches!(
            state_of(&dev, id).0.as_str(),
            "exited" | "failed" | "lost" | ""
        ) {
            assert!(std::time::Instant::now() < deadline, "{id} did not end");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let owner = dir.path().to_string_lossy().into_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held: Vec<String> = std::fs::read_dir("/run/berth/net/slots")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter(|t| t.contains(&owner))
                    .collect()
            })
            .unwrap_or_default();
        if held.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "network slots outlived their sandboxes: {held:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
