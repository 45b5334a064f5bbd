//! `berth bench etcd-perf`: etcd's own write benchmark, `etcdctl check perf`, against a
//! 3-member etcd cluster on loopback, so berth's create rate can be put beside etcd's
//! writes/s measured on the same machine in the same session (issue #18 asks for berth at
//! 6× etcd's `--load=l`).
//!
//! The members run from a temporary directory (data and logs) with fsync on (etcd's
//! default), on ports below the ephemeral range; they are killed and the directory removed
//! when the run ends, whatever its outcome. The binaries come from Debian's `etcd-server`
//! and `etcd-client` packages unless `--etcd` and `--etcdctl` say otherwise.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

/// Members of the etcd cluster: the same 3 as a berth cluster's replicas.
const MEMBERS: usize = 3;
/// How long the members get to elect a leader and answer `endpoint health`.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// `etcdctl check perf` loads (its `--load`): the rate it aims for and how many clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Load {
    /// 150 writes/s expected, 50 clients.
    S,
    /// 1,000 writes/s, 200 clients.
    M,
    /// 8,000 writes/s, 500 clients.
    L,
    /// 15,000 writes/s, 1,000 clients.
    Xl,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::S => "s",
            Load::M => "m",
            Load::L => "l",
            Load::Xl => "xl",
        }
    }
}

/// Arguments of `berth bench etcd-perf`.
#[derive(Debug, Clone, Args)]
pub(crate) struct EtcdPerfArgs {
    /// `etcdctl check perf --load`; the comparison uses `l`.
    #[arg(long, value_enum, default_value = "l")]
    load: Load,
    /// The etcd server binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// The etcdctl binary (v3 API).
    #[arg(long, default_value = "/usr/bin/etcdctl")]
    etcdctl: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl Default for EtcdPerfArgs {
    fn default() -> EtcdPerfArgs {
        EtcdPerfArgs {
            load: Load::L,
            etcd: "/usr/bin/etcd".into(),
            etcdctl: "/usr/bin/etcdctl".into(),
            json: false,
        }
    }
}

/// What `etcdctl check perf` reported.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EtcdReport {
    pub(crate) members: usize,
    pub(crate) load: Load,
    /// Its "Throughput is N writes/s".
    pub(crate) writes_per_s: f64,
    /// Its "Slowest request took N s", in ms.
    pub(crate) slowest_ms: Option<f64>,
    /// Whether etcdctl judged the cluster fit for the load (PASS).
    pub(crate) pass: bool,
    /// The version line of `etcd --version`.
    pub(crate) etcd_version: String,
}

pub(crate) fn run(args: &EtcdPerfArgs) -> ExitCode {
    match measure(args) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print_report(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth bench etcd-perf: {e}");
            ExitCode::from(crate::exit::EXIT_FAILURE)
        }
    }
}

pub(crate) fn print_report(report: &EtcdReport) {
    println!(
        "etcd ({}, {} members on loopback, fsync on): {:.0} writes/s, slowest request {} \
         (etcdctl check perf --load={}: {})",
        report.etcd_version,
        report.members,
        report.writes_per_s,
        report
            .slowest_ms
            .map_or("?".into(), |ms| format!("{ms:.1} ms")),
        report.load.name(),
        if report.pass { "PASS" } else { "FAIL" },
    );
}

/// The members, killed (and waited for) when dropped; their directory goes with it.
struct EtcdCluster {
    children: Vec<Child>,
    endpoints: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the cluster, runs `etcdctl check perf` and parses what it printed.
pub(crate) fn measure(args: &EtcdPerfArgs) -> Result<EtcdReport, String> {
    let etcd_version = version(&args.etcd)?;
    if !args.etcdctl.exists() {
        return Err(format!(
            "{} not found (Debian: apt-get install etcd-client, or --etcdctl PATH)",
            args.etcdctl.display()
        ));
    }
    let cluster = start(&args.etcd)?;
    wait_healthy(&cluster, &args.etcdctl)?;
    eprintln!(
        "running etcdctl check perf --load={} (it takes a minute)",
        args.load.name()
    );
    let output = etcdctl(&args.etcdctl, &cluster.endpoints)
        .args(["check", "perf", &format!("--load={}", args.load.name())])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", args.etcdctl.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let writes_per_s = parse_throughput(&text).ok_or_else(|| {
        format!(
            "etcdctl check perf printed no throughput ({}); member logs in {}:\n{}",
            output.status,
            cluster.dir.path().display(),
            tail(&text, 10)
        )
    })?;
    Ok(EtcdReport {
        members: MEMBERS,
        load: args.load,
        writes_per_s,
        slowest_ms: parse_slowest_s(&text).map(|s| s * 1_000.0),
        pass: text.lines().any(|l| l.trim() == "PASS"),
        etcd_version,
    })
}

fn version(etcd: &Path) -> Result<String, String> {
    let output = Command::new(etcd).arg("--version").output().map_err(|e| {
        format!(
            "{}: {e} (Debian: apt-get install etcd-server, or --etcd PATH)",
            etcd.display()
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .map_or_else(|| "etcd".into(), |v| format!("etcd {}", v.trim())))
}

fn etcdctl(binary: &Path, endpoints: &[String]) -> Command {
    let mut command = Command::new(binary);
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")));
    command
}

/// A port that can be bound now, below the ephemeral range (so an outgoing connection
/// cannot be holding it when etcd binds), from an offset of this process's own.
fn free_port(next: &mut u32) -> Result<u16, String> {
    let base = 12_000 + (std::process::id() % 300) * 20;
    for _ in 0..8_000 {
        let port = 12_000 + (base - 12_000 + *next) % 8_000;
        *next += 1;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Err("no free port in 12000..20000".into())
}

fn start(etcd: &Path) -> Result<EtcdCluster, String> {
    let dir = tempfile::Builder::new()
        .prefix("berth-etcd-perf-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let mut next = 0;
    let mut ports = Vec::new();
    for _ in 0..MEMBERS {
        ports.push((free_port(&mut next)?, free_port(&mut next)?));
    }
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut cluster = EtcdCluster {
        children: Vec::new(),
        endpoints: ports
            .iter()
            .map(|(client, _)| format!("127.0.0.1:{client}"))
            .collect(),
        dir,
    };
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(cluster.dir.path().join(format!("m{i}.log")))
            .map_err(|e| format!("member log: {e}"))?;
        let child = Command::new(etcd)
            .args([
                format!("--name=m{i}"),
                format!(
                    "--data-dir={}",
                    cluster.dir.path().join(format!("m{i}")).display()
                ),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-token=berth-bench".into(),
                "--initial-cluster-state=new".into(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", etcd.display()))?;
        cluster.children.push(child);
    }
    Ok(cluster)
}

fn wait_healthy(cluster: &EtcdCluster, etcdctl_binary: &Path) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let healthy = etcdctl(etcdctl_binary, &cluster.endpoints)
            .args(["endpoint", "health", "--command-timeout=2s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if healthy {
            return Ok(());
        }
        if started.elapsed() > HEALTHY_WITHIN {
            let log =
                std::fs::read_to_string(cluster.dir.path().join("m0.log")).unwrap_or_default();
            return Err(format!(
                "the etcd members were not healthy within {} s; m0's log ends:\n{}",
                HEALTHY_WITHIN.as_secs(),
                tail(&log, 10)
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The N of "Throughput is N writes/s" (PASS) or "Throughput too low: N writes/s" (FAIL).
fn parse_throughput(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let before = line
            .split(" writes/s")
            .next()
            .filter(|_| line.contains(" writes/s"))?;
        before.split_whitespace().last()?.parse().ok()
    })
}

/// The N of "Slowest request took N s" (PASS) or "Slowest request took too long: Ns"
/// (FAIL); etcdctl prints seconds with an `s`.
fn parse_slowest_s(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let after = line.split("Slowest request took ").nth(1)?;
        let after = after.strip_prefix("too long:").unwrap_or(after);
        after.trim().trim_end_matches('s').parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_slowest_s, parse_throughput};

    #[test]
    fn reads_what_etcdctl_check_perf_prints() {
        let pass = " 60 / 60 Boooooooom  !  100.00% 1m0s\nPASS: Throughput is 6284 writes/s\n\
                    PASS: Slowest request took 0.183548s\nPASS: Stddev is 0.017386s\nPASS\n";
        assert_eq!(parse_throughput(pass), Some(6284.0));
        assert_eq!(parse_slowest_s(pass), Some(0.183548));
        let fail = "FAIL: Throughput too low: 3120 writes/s\nSlowest request took too long: \
                    1.200000s\nStddev too high: 0.3s\nFAIL\n";
        assert_eq!(parse_throughput(fail), Some(3120.0));
        assert_eq!(parse_slowest_s(fail), Some(1.2));
        assert_eq!(parse_throughput("Error: context deadline exceeded"), None);
    }
}
