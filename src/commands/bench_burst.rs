//! `berth bench burst`: a burst of small sandboxes onto `berth dev`'s layout (three
//! replicas and seven agents in one process, started here as a child `berth dev`), from
//! many plain gRPC clients at once. It checks what a burst must not do — lose a sandbox,
//! cost the leader its leadership, delay a heartbeat — and reports the wall time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use crate::exit::EXIT_FAILURE;

/// Arguments of `berth bench burst`.
#[derive(Debug, Args)]
pub(crate) struct BurstArgs {
    /// Sandboxes created (each runs `sh -c true`).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    sandboxes: u32,
    /// Concurrent gRPC clients.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_024))]
    clients: u32,
    /// Milli-CPU each sandbox asks for.
    #[arg(long, default_value_t = 100)]
    cpu_milli: u64,
    /// `berth dev --runtime` (auto: gvisor when runsc is installed).
    #[arg(long, default_value = "auto")]
    runtime: String,
    /// Run the burst onto only this one of dev's seven nodes (e.g. `gcp-euw4-g2-0`, 8 CPUs);
    /// repeatable. Default: all seven.
    #[arg(long = "only-node", value_name = "NODE_ID")]
    only_nodes: Vec<String>,
    /// Heartbeat TTL of the dev cluster, in ms.
    #[arg(long, default_value_t = 5_000)]
    node_ttl_ms: u64,
    /// First of the ports the dev cluster uses (gRPC +0..3, metrics +10..13, agents +20..27).
    #[arg(long, default_value_t = 17_070)]
    base_port: u16,
    /// Give up waiting for the sandboxes to end after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct BurstReport {
    sandboxes: u32,
    clients: u32,
    runtime: String,
    acknowledged: u32,
    create_errors: BTreeMap<String, u32>,
    states: BTreeMap<String, u32>,
    exited_zero: u32,
    leader_changes_during: u64,
    worst_heartbeat_gap_ms: u64,
    heartbeat_gap_budget_ms: u64,
    wall_s: f64,
    creates_s: f64,
}

/// A child `berth dev`, interrupted (then killed) when dropped.
pub(crate) struct Dev(Child);

/// Starts `berth dev` (this binary) with its state and log in `dir`: gRPC on `base_port`
/// +0..3, metrics +10..13, agents' metrics +20..27. Returns it and the replicas' endpoints.
pub(crate) fn spawn_dev(
    dir: &std::path::Path,
    base_port: u16,
    runtime: &str,
    node_ttl_ms: u64,
    only_nodes: &[String],
) -> Result<(Dev, Vec<String>), String> {
    let args: Vec<String> = only_nodes
        .iter()
        .map(|n| format!("--only-node={n}"))
        .collect();
    spawn_dev_with(dir, base_port, runtime, node_ttl_ms, &args)
}

/// As [`spawn_dev`], with `args` added to `berth dev`'s command line.
pub(crate) fn spawn_dev_with(
    dir: &std::path::Path,
    base_port: u16,
    runtime: &str,
    node_ttl_ms: u64,
    args: &[String],
) -> Result<(Dev, Vec<String>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let data: PathBuf = dir.join("dev");
    let log = std::fs::File::create(dir.join("dev.log")).map_err(|e| e.to_string())?;
    let child = Command::new(exe)
        .arg("dev")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--port={base_port}"))
        .arg(format!("--metrics-port={}", base_port + 10))
        .arg(format!("--agent-metrics-port={}", base_port + 20))
        .arg(format!("--runtime={runtime}"))
        .arg(format!("--node-ttl-ms={node_ttl_ms}"))
        .arg("--no-autoscaler")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting berth dev: {e}"))?;
    let endpoints = (0..3)
        .map(|i| format!("127.0.0.1:{}", base_port + i))
        .collect();
    Ok((Dev(child), endpoints))
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET /metrics` of one replica, as name → value (labels dropped, values summed).
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (series, v) in super::fleet_probe::scrape(&format!("127.0.0.1:{port}")) {
        let name = series.split('{').next().unwrap_or(&series).to_owned();
        *out.entry(name).or_insert(0.0) += v;
    }
    out
}

fn metric(ports: &[u16], name: &str) -> Vec<f64> {
    ports
        .iter()
        .map(|p| scrape(*p).get(name).copied().unwrap_or(0.0))
        .collect()
}

pub(crate) fn run(args: &BurstArgs) -> ExitCode {
    match super::block_on("bench burst", burst(args)) {
        Ok(report) => {
            print(&report, args.json);
            let ok = report.acknowledged == report.sandboxes
                && report.exited_zero == report.sandboxes
                && report.leader_changes_during == 0
                && report.worst_heartbeat_gap_ms < report.heartbeat_gap_budget_ms;
            if ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("berth bench burst: the burst did not hold (see above)");
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(code) => code,
    }
}

fn print(r: &BurstReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    println!(
        "burst: {} sandboxes from {} clients on berth dev ({} runtime)",
        r.sandboxes, r.clients, r.runtime
    );
    println!("  acknowledged:        {}/{}", r.acknowledged, r.sandboxes);
    if !r.create_errors.is_empty() {
        println!("  create errors:       {:?}", r.create_errors);
    }
    println!("  final states:        {:?}", r.states);
    println!("  exited 0:            {}/{}", r.exited_zero, r.sandboxes);
    println!("  leader changes:      {}", r.leader_changes_during);
    println!(
        "  worst heartbeat gap: {} ms (budget TTL/2 = {} ms)",
        r.worst_heartbeat_gap_ms, r.heartbeat_gap_budget_ms
    );
    println!(
        "  wall time:           {:.1} s (creates acknowledged in {:.1} s)",
        r.wall_s, r.creates_s
    );
}

async fn burst(args: &BurstArgs) -> Result<BurstReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (_dev, endpoints) = spawn_dev(
        dir.path(),
        args.base_port,
        &args.runtime,
        args.node_ttl_ms,
        &args.only_nodes,
    )?;
    let metrics_port = args.base_port + 10;
    let metrics_ports: Vec<u16> = (0..3).map(|i| metrics_port + i).collect();
    let nodes = if args.only_nodes.is_empty() {
        7
    } else {
        args.only_nodes.len()
    };
    wait_up(&endpoints, nodes, dir.path()).await?;
    let changes_before: f64 = metric(&metrics_ports, "berth_raft_leader_changes_total")
        .iter()
        .sum();
    // Loaded once, outside the timed window.
    let credentials = dev_credentials(dir.path()).await?;
    let started = Instant::now();
    let per_client = args.sandboxes.div_ceil(args.clients);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let endpoints = endpoints.clone();
        let cpu_milli = args.cpu_milli;
        let total = args.sandboxes;
        let credentials = credentials.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(endpoints).with_credentials(credentials)?;
            let mut ids = Vec::new();
            let mut errors: BTreeMap<String, u32> = BTreeMap::new();
            for i in 0..per_client {
                let n = c * per_client + i;
                if n >= total {
                    break;
                }
                let spec = pb::SandboxSpec {
                    tenant: "burst".into(),
                    command: vec!["sh".into(), "-c".into(), "true".into()],
                    resources: Some(pb::Resources {
                        cpu_milli,
                        memory_mib: 64,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                match client.create(&format!("burst-{n}"), spec).await {
                    Ok(r) => ids.push(r.sandbox.map(|s| s.id).unwrap_or_default()),
                    Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
                }
            }
            Ok::<_, String>((ids, errors))
        }));
    }
    let mut ids = Vec::new();
    let mut create_errors: BTreeMap<String, u32> = BTreeMap::new();
    for t in tasks {
        let (got, errors) = t.await.map_err(|e| e.to_string())??;
        ids.extend(got);
        for (k, v) in errors {
            *create_errors.entry(k).or_default() += v;
        }
    }
    let creates_s = started.elapsed().as_secs_f64();
    let mut client = Client::new(endpoints.clone()).with_credentials(credentials)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let states = loop {
        let mut states: BTreeMap<String, u32> = BTreeMap::new();
        let mut exited_zero = 0u32;
        let mut token = String::new();
        loop {
            let page = client
                .list_sandboxes(pb::ListSandboxesRequest {
                    tenant: "burst".into(),
                    page_size: 1_000,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|s| format!("listing: {s}"))?;
            for s in &page.sandboxes {
                let status = s.status.clone().unwrap_or_default();
                let state = pb::SandboxState::try_from(status.state)
                    .map(|st| {
                        st.as_str_name()
                            .trim_start_matches("SANDBOX_STATE_")
                            .to_lowercase()
                    })
                    .unwrap_or_else(|_| "unknown".into());
                *states.entry(state).or_default() += 1;
                if status.state == pb::SandboxState::Exited as i32 && status.exit_code == 0 {
                    exited_zero += 1;
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let live = ["pending", "scheduled", "running", "unknown"]
            .iter()
            .map(|s| states.get(*s).copied().unwrap_or(0))
            .sum::<u32>();
        if live == 0 || Instant::now() > deadline {
            break (states, exited_zero);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall_s = started.elapsed().as_secs_f64();
    let changes_after: f64 = metric(&metrics_ports, "berth_raft_leader_changes_total")
        .iter()
        .sum();
    let gap = metric(&metrics_ports, "berth_node_heartbeat_gap_max_ms")
        .into_iter()
        .fold(0.0, f64::max);
    Ok(BurstReport {
        sandboxes: args.sandboxes,
        clients: args.clients,
        runtime: args.runtime.clone(),
        acknowledged: ids.len() as u32,
        create_errors,
        states: states.0,
        exited_zero: states.1,
        leader_changes_during: (changes_after - changes_before).max(0.0) as u64,
        worst_heartbeat_gap_ms: gap as u64,
        heartbeat_gap_budget_ms: args.node_ttl_ms / 2,
        wall_s,
        creates_s,
    })
}

/// The admin credentials of a dev started by [`spawn_dev`] in `dir` (waits for dev to
/// write them).
pub(crate) async fn dev_credentials(
    dir: &std::path::Path,
) -> Result<berth_net::client::Credentials, String> {
    let path = dir.join("dev").join("credentials.toml");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.is_file() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::credentials::resolve(Some(&path), None, false)
}

/// A client of a dev started by [`spawn_dev`] in `dir`.
pub(crate) async fn dev_client(
    dir: &std::path::Path,
    endpoints: Vec<String>,
) -> Result<Client, String> {
    Client::new(endpoints).with_credentials(dev_credentials(dir).await?)
}

pub(crate) async fn wait_up(
    endpoints: &[String],
    nodes: usize,
    dir: &std::path::Path,
) -> Result<(), String> {
    let tls = dev_credentials(dir).await?.tls;
    super::dev::wait_for_nodes(endpoints, tls, nodes, Duration::from_secs(90))
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "berth dev did not come up: {e}; its log ends:\n{}",
                tail.join("\n")
            )
        })
}
