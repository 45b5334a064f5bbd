//! `berth bench fleet`: the control plane at fleet scale, on this machine.
//!
//! Starts a local cluster of real `berth scheduler` processes (fsync on) and one
//! `berth fleet-emulator` process holding `--nodes` real `NodeService.Connect` streams
//! (each its own connection and, with TLS, its own certificate). Then, in phases:
//! 1. **register**: every agent registers (time to all registered);
//! 2. **fill**: creates at `--rate` until `--sandboxes` are live, each assigned to and
//!    reported Running by its emulated agent (create → assignment at the agent, p50/p99);
//! 3. **churn**: `--churn` long, a delete for every create at the same rate;
//! 4. **hold**: RSS and CPU of each replica, heartbeats per second the leader handled,
//!    Raft log and snapshot bytes;
//! 5. **rejoin**: an empty replica joins as a learner; time until it has installed the
//!    leader's snapshot and applied up to the leader's commit index;
//! 6. **failover**: the leader is killed (SIGKILL); time until every agent is registered
//!    with the new leader, and nodes marked down and sandboxes Lost meanwhile (both must
//!    be 0).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

use super::fleet_probe::{Emulator, berth_binary, dir_bytes, sample, scrape};
use super::fleet_stats::Percentiles;

/// Arguments of `berth bench fleet`.
#[derive(Debug, Args)]
pub(crate) struct FleetArgs {
    /// Emulated node agents.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    nodes: u64,
    /// Live sandboxes to reach and hold.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    sandboxes: u64,
    /// Replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    replicas: u64,
    /// Creates per second while filling (and deletes + creates per second while churning).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long to churn (one delete per create) once full.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    churn: Duration,
    /// Run without TLS (by default every agent has its own certificate).
    #[arg(long)]
    insecure: bool,
    /// Skip the rejoin and failover phases.
    #[arg(long)]
    no_failover: bool,
    /// Keep configs, logs and data here instead of a temporary directory.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Replica {
    id: u64,
    role: &'static str,
    rss_mib: f64,
    cpu_pct: f64,
    /// The Raft log (raft-engine's files).
    log_mib: f64,
    /// The latest state snapshot.
    snapshot_mib: f64,
}

#[derive(Debug, Default, Serialize)]
struct FleetReport {
    nodes: u64,
    sandboxes: u64,
    replicas: u64,
    tls: bool,
    rate: u64,
    register_all_s: f64,
    fill_s: f64,
    /// Create → assignment received at the agent while filling.
    fill_latency: Percentiles,
    churn_latency: Percentiles,
    misdelivered: u64,
    heartbeats_per_s: f64,
    heartbeat_interval_s: f64,
    replicas_at_hold: Vec<Replica>,
    emulator_rss_mib: f64,
    rejoin_snapshot_s: Option<f64>,
    failover_reregister_s: Option<f64>,
    nodes_marked_down: f64,
    sandboxes_lost: f64,
}

pub(crate) fn run(args: &FleetArgs) -> ExitCode {
    match super::block_on("bench fleet", fleet(args)) {
        Ok(report) => {
            print(&report, args.json);
            let ok = report.misdelivered == 0
                && report.nodes_marked_down == 0.0
                && report.sandboxes_lost == 0.0;
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(code) => code,
    }
}

fn spec() -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "fleet".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "agent.py".into()],
        resources: Some(pb::Resources {
            cpu_milli: 100,
            memory_mib: 128,
            gpu: None,
        }),
        ..Default::default()
    }
}

async fn fleet(args: &FleetArgs) -> Result<FleetReport, String> {
    let binary = berth_binary()?;
    let tmp = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let _ = std::fs::create_dir_all(&dir);
    let mut cfg = LocalClusterConfig::new(binary.clone());
    cfg.replicas = args.replicas as usize;
    cfg.insecure = args.insecure;
    let mut cluster =
        LocalCluster::start(cfg, &dir).map_err(|e| format!("starting the cluster: {e}"))?;
    let Some(_) = cluster.wait_for_leader(Duration::from_secs(20)).await else {
        return Err(format!(
            "no leader within 20 s:\n{}",
            cluster.log_tail(0, 20)
        ));
    };
    let mut report = FleetReport {
        nodes: args.nodes,
        sandboxes: args.sandboxes,
        replicas: args.replicas,
        tls: !args.insecure,
        rate: args.rate,
        ..FleetReport::default()
    };
    let mut emulator_args = vec![
        "--scheduler".to_string(),
        cluster.endpoints().join(","),
        "--nodes".into(),
        args.nodes.to_string(),
        "--report-every".into(),
        "200ms".into(),
    ];
    if let Some(pki) = cluster.pki() {
        emulator_args.push("--pki".into());
        emulator_args.push(pki.dir.display().to_string());
    }
    eprintln!(
        "bench fleet: {} agents, {} sandboxes, {} replicas, {}",
        args.nodes,
        args.sandboxes,
        args.replicas,
        if args.insecure { "no TLS" } else { "mTLS" }
    );
    let mut emulator = Emulator::start(&binary, &emulator_args)?;
    let n = args.nodes;
    let (_, took) = emulator
        .wait(
            "registering",
            Duration::from_secs(600),
            |r| r.connected >= n,
            |r| format!("{}/{n} registered", r.connected),
        )
        .await?;
    report.register_all_s = took.as_secs_f64();
    eprintln!(
        "  all {n} agents registered in {:.1} s",
        report.register_all_s
    );

    let mut client = cluster.client();
    client.deadline = Duration::from_secs(30);
    let client = client.share_connections();
    let live = Live::default();
    let started = Instant::now();
    drive(&client, &live, args.rate, args.sandboxes, 0, &mut emulator).await?;
    let (filled, _) = emulator
        .wait(
            "assigning",
            Duration::from_secs(120),
            |r| r.assignments >= args.sandboxes,
            |r| format!("{}/{} assigned", r.assignments, args.sandboxes),
        )
        .await?;
    report.fill_s = started.elapsed().as_secs_f64();
    report.fill_latency = filled.latency;
    eprintln!(
        "  {} sandboxes live in {:.1} s; create → assignment p50 {} ms, p99 {} ms",
        args.sandboxes, report.fill_s, filled.latency.p50_ms, filled.latency.p99_ms
    );

    let churn = (args.rate as f64 * args.churn.as_secs_f64()) as u64;
    let _ = emulator.take_span();
    drive(&client, &live, args.rate, churn, churn, &mut emulator).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.churn_latency = emulator.take_span();
    report.misdelivered = emulator.latest().misdelivered;

    hold(&mut cluster, &emulator, &mut report).await?;
    if !args.no_failover && args.replicas >= 3 {
        rejoin(&mut cluster, &mut report).await?;
        failover(&mut cluster, &mut emulator, &mut report).await?;
    }
    drop(emulator);
    Ok(report)
}

/// Sandbox ids created and not yet deleted, oldest first.
#[derive(Default, Clone)]
struct Live {
    ids: Arc<tokio::sync::Mutex<std::collections::VecDeque<String>>>,
    next: Arc<AtomicU64>,
}

/// Creates `creates` sandboxes at `rate` per second (open loop, over 64 workers), deleting
/// the oldest live one for each of the first `deletes`.
async fn drive(
    client: &Client,
    live: &Live,
    rate: u64,
    creates: u64,
    deletes: u64,
    emulator: &mut Emulator,
) -> Result<(), String> {
    const WORKERS: u64 = 64;
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let mut client = client.clone();
        let live = live.clone();
        let (failures, done) = (failures.clone(), done.clone());
        let mine = creates / WORKERS + u64::from(w < creates % WORKERS);
        let my_deletes = deletes / WORKERS + u64::from(w < deletes % WORKERS);
        let every = Duration::from_secs_f64(WORKERS as f64 / rate.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for i in 0..mine {
                tick.tick().await;
                if i < my_deletes {
                    let oldest = live.ids.lock().await.pop_front();
                    if let Some(id) = oldest {
                        if client.delete(&id).await.is_err() {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                let n = live.next.fetch_add(1, Ordering::Relaxed);
                match client.create(&format!("fleet-{n}"), spec()).await {
                    Ok(r) => {
                        if let Some(s) = r.sandbox {
                            live.ids.lock().await.push_back(s.id);
                        }
                    }
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut shown = Instant::now();
    while tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if shown.elapsed() >= Duration::from_secs(5) {
            let r = emulator.latest();
            eprintln!(
                "  {}/{creates} creates sent, {} assigned, last second p99 {} ms",
                done.load(Ordering::Relaxed),
                r.assignments,
                r.window.p99_ms
            );
            shown = Instant::now();
        }
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} creates or deletes failed"));
    }
    Ok(())
}

/// Samples every replica over 10 s: RSS, CPU, data bytes, and the leader's heartbeat rate.
async fn hold(
    cluster: &mut LocalCluster,
    emulator: &Emulator,
    report: &mut FleetReport,
) -> Result<(), String> {
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .ok_or("no leader while holding")?;
    let window = Duration::from_secs(10);
    let pids: Vec<Option<u32>> = (0..cluster.members.len()).map(|i| cluster.pid(i)).collect();
    let first: Vec<_> = pids.iter().map(|p| p.map(sample)).collect();
    let beats = |c: &LocalCluster| {
        scrape(&c.members[leader].metrics_address)
            .get("berth_agent_heartbeats_total")
            .copied()
            .unwrap_or(0.0)
    };
    let hb0 = beats(cluster);
    tokio::time::sleep(window).await;
    let hb1 = beats(cluster);
    report.heartbeats_per_s = (hb1 - hb0) / window.as_secs_f64();
    report.heartbeat_interval_s = report.nodes as f64 / report.heartbeats_per_s.max(1e-9);
    for (i, pid) in pids.iter().enumerate() {
        let (Some(pid), Some(Some(a))) = (pid, first.get(i)) else {
            continue;
        };
        let b = sample(*pid);
        let data = cluster.data_dir(i);
        let all = dir_bytes(&data);
        let snapshot = std::fs::metadata(data.join("snapshot")).map_or(0, |m| m.len());
        report.replicas_at_hold.push(Replica {
            id: cluster.members[i].id,
            role: if i == leader { "leader" } else { "follower" },
            rss_mib: b.rss_bytes as f64 / 1_048_576.0,
            cpu_pct: 100.0 * (b.cpu_s - a.cpu_s) / window.as_secs_f64(),
            log_mib: (all - snapshot) as f64 / 1_048_576.0,
            snapshot_mib: snapshot as f64 / 1_048_576.0,
        });
    }
    report.emulator_rss_mib = sample(emulator.pid()).rss_bytes as f64 / 1_048_576.0;
    Ok(())
}

fn gauge(cluster: &LocalCluster, i: usize, name: &str) -> f64 {
    scrape(&cluster.members[i].metrics_address)
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

/// Starts an empty replica and adds it as a learner: time until it has installed the
/// leader's snapshot and applied up to the leader's commit index. Then it is removed, so
/// the failover runs on the original replicas.
async fn rejoin(cluster: &mut LocalCluster, report: &mut FleetReport) -> Result<(), String> {
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .ok_or("no leader before rejoin")?;
    let new = cluster
        .add_member()
        .map_err(|e| format!("starting an empty replica: {e}"))?;
    let (id, address) = (
        cluster.members[new].id,
        cluster.members[new].address.clone(),
    );
    let mut client = cluster.client();
    client.deadline = Duration::from_secs(30);
    let started = Instant::now();
    client
        .add_peer(id, &address, true)
        .await
        .map_err(|e| format!("adding replica {id}: {}", e.message()))?;
    let target = gauge(cluster, leader, "berth_raft_commit_index");
    while gauge(cluster, new, "berth_raft_applied_index") < target {
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "the new replica did not catch up in 120 s:\n{}",
                cluster.log_tail(new, 20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.rejoin_snapshot_s = Some(started.elapsed().as_secs_f64());
    eprintln!(
        "  an empty replica caught up (snapshot install) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    client
        .remove_peer(id)
        .await
        .map_err(|e| format!("removing replica {id}: {}", e.message()))?;
    cluster.kill(new);
    Ok(())
}

/// Kills the leader; time until every agent registered again with the new one.
async fn failover(
    cluster: &mut LocalCluster,
    emulator: &mut Emulator,
    report: &mut FleetReport,
) -> Result<(), String> {
    let leader = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .ok_or("no leader before failover")?;
    let n = report.nodes;
    let before = emulator.latest().registrations;
    cluster.kill(leader);
    let (_, took) = emulator
        .wait(
            "re-registering",
            Duration::from_secs(120),
            |r| r.registrations >= before + n && r.connected >= n,
            |r| {
                format!(
                    "{}/{n} re-registered",
                    r.registrations.saturating_sub(before)
                )
            },
        )
        .await?;
    report.failover_reregister_s = Some(took.as_secs_f64());
    eprintln!(
        "  all agents re-registered {:.1} s after the leader was killed",
        took.as_secs_f64()
    );
    // Stay past a heartbeat interval: nothing may be marked down afterwards either.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let new = cluster
        .wait_for_leader(Duration::from_secs(20))
        .await
        .ok_or("no leader after failover")?;
    report.nodes_marked_down = gauge(cluster, new, "berth_nodes_marked_down_total");
    report.sandboxes_lost = gauge(cluster, new, "berth_sandboxes{state=\"lost\"}");
    cluster
        .restart(leader)
        .map_err(|e| format!("restarting the old leader: {e}"))?;
    Ok(())
}

fn print(r: &FleetReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).unwrap_or_default());
        return;
    }
    println!(
        "fleet: {} agents ({}), {} live sandboxes, {} replicas",
        r.nodes,
        if r.tls {
            "mTLS, one certificate each"
        } else {
            "no TLS"
        },
        r.sandboxes,
        r.replicas
    );
    println!("  all agents registered in {:.1} s", r.register_all_s);
    println!(
        "  fill at {}/s: {:.1} s; create → assignment p50 {} ms, p99 {} ms, max {} ms",
        r.rate, r.fill_s, r.fill_latency.p50_ms, r.fill_latency.p99_ms, r.fill_latency.max_ms
    );
    println!(
        "  churn (a delete per create at {}/s): {} assigned, p50 {} ms, p99 {} ms; misdelivered {}",
        r.rate,
        r.churn_latency.count,
        r.churn_latency.p50_ms,
        r.churn_latency.p99_ms,
        r.misdelivered
    );
    println!(
        "  heartbeats handled by the leader: {:.0}/s (one per {:.1} s per node)",
        r.heartbeats_per_s, r.heartbeat_interval_s
    );
    for rep in &r.replicas_at_hold {
        println!(
            "  replica {} ({}): RSS {:.0} MiB, CPU {:.0} %, Raft log {:.0} MiB, snapshot {:.0} MiB",
            rep.id, rep.role, rep.rss_mib, rep.cpu_pct, rep.log_mib, rep.snapshot_mib
        );
    }
    println!("  emulator RSS {:.0} MiB", r.emulator_rss_mib);
    if let Some(s) = r.rejoin_snapshot_s {
        println!("  an empty replica joined and caught up by snapshot in {s:.2} s");
    }
    if let Some(s) = r.failover_reregister_s {
        println!(
            "  leader killed: all agents re-registered in {s:.1} s; nodes marked down {}, sandboxes lost {}",
            r.nodes_marked_down, r.sandboxes_lost
        );
    }
}
