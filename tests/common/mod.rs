//! Test harnesses over the real binary: `berth dev` on free loopback ports driven through
//! the `berth` CLI, a one-replica scheduler, and node agents against a cluster (`agents`).

#![allow(dead_code)] // each test binary uses part of it

pub(crate) mod agents;
pub(crate) mod counter;
pub(crate) mod sandboxes;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

pub(crate) const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// Seven consecutive free ports (three gRPC, four metrics) outside the ranges the other
/// tests' clusters draw from.
fn free_ports() -> u16 {
    let start = 12_000 + (std::process::id() % 300) as u16 * 8;
    for offset in 0..300u16 {
        let base = 12_000 + (start - 12_000 + offset * 8) % 2_400;
        if (0..7).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports in 12000..14400");
}

/// Agents' metrics on free ports unless the test chose them.
fn agent_metrics(extra: &[&str]) -> Vec<&'static str> {
    if extra.contains(&"--agent-metrics-port") {
        vec![]
    } else {
        vec!["--agent-metrics-port", "0"]
    }
}

pub(crate) struct Dev {
    child: Child,
    pub(crate) endpoint: String,
    /// dev's admin credentials file (written once dev is up).
    pub(crate) credentials: PathBuf,
    /// First of dev's metrics ports (replicas), the autoscaler's is the fourth.
    pub(crate) metrics_port: u16,
    log: PathBuf,
}

impl Dev {
    /// Starts `berth dev` with state under `dir` and `extra` arguments.
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Dev {
        let port = free_ports();
        let log = dir.join("dev.log");
        let child = Command::new(BERTH)
            .arg("dev")
            .args(extra)
            .arg("--data-dir")
            .arg(dir.join("state"))
            .args(["--port", &port.to_string()])
            .args(["--metrics-port", &(port + 3).to_string()])
            .args(agent_metrics(extra))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("dev.out")).expect("out"))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn berth dev");
        Dev {
            child,
            endpoint: format!("127.0.0.1:{port}"),
            credentials: dir.join("state").join("credentials.toml"),
            metrics_port: port + 3,
            log,
        }
    }

    /// `berth <group> <verb> --endpoint E --credentials C ...`: the endpoint goes before
    /// any `--` command. Waits for dev to have written its credentials.
    pub(crate) fn berth(&self, args: &[&str]) -> Output {
        self.wait_for_credentials();
        Command::new(BERTH)
            .args(&args[..2])
            .args(["--endpoint", &self.endpoint])
            .arg("--credentials")
            .arg(&self.credentials)
            .args(&args[2..])
            .output()
            .expect("run berth")
    }

    fn wait_for_credentials(&self) {
        let started = std::time::Instant::now();
        while !self.credentials.is_file() && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// dev's admin certificate.
    pub(crate) fn admin_tls(&self) -> berth_net::Tls {
        self.wait_for_credentials();
        let text = std::fs::read_to_string(&self.credentials).expect("credentials");
        let value: toml::Table = toml::from_str(&text).expect("credentials toml");
        let field = |k: &str| value[k].as_str().expect(k).to_owned();
        berth_net::Tls::load(&berth_net::TlsSettings {
            ca: field("ca"),
            cert: field("cert"),
            key: field("key"),
            ..Default::default()
        })
        .expect("load dev's credentials")
        .expect("dev runs TLS")
    }

    /// A client of dev with its admin certificate.
    pub(crate) fn client(&self) -> berth_scheduler::service::client::Client {
        berth_scheduler::service::client::Client::new(vec![self.endpoint.clone()])
            .with_credentials(berth_net::client::Credentials {
                tls: Some(self.admin_tls()),
                token: None,
            })
            .expect("credentials")
    }

    /// The last 30 lines of dev's log.
    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The body of `GET /metrics` on dev's `n`th metrics port (3 = the autoscaler).
    pub(crate) fn metrics(&self, n: u16) -> String {
        metrics_at(&format!("127.0.0.1:{}", self.metrics_port + n))
    }

    /// SIGINT, and the exit status within `within`.
    pub(crate) fn interrupt(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Dev {
    /// SIGINT first: dev stops its sandboxes on the way out, so a test that fails midway
    /// leaves no sandbox (and no spinning process) behind for the tests after it.
    fn drop(&mut self) {
        if self.interrupt(Duration::from_secs(15)).is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A one-replica `berth scheduler` process with a leader.
/// The response to `GET /metrics` at `address` (empty when nothing answers).
pub(crate) fn metrics_at(address: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

pub(crate) async fn single_replica(dir: &std::path::Path) -> LocalCluster {
    single_replica_with(dir, LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth"))).await
}

/// One replica of `cfg` (its `replicas` set to 1), once it leads.
pub(crate) async fn single_replica_with(
    dir: &std::path::Path,
    mut cfg: LocalClusterConfig,
) -> LocalCluster {
    cfg.replicas = 1;
    let mut cluster = LocalCluster::start(cfg, dir).expect("start");
    assert!(
        cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .is_some(),
        "no leader: {}",
        cluster.log_tail(0, 20)
    );
    cluster
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
