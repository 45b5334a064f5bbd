//! `berth bench create`: create throughput and latency through a Raft cluster.
//!
//! Without `--target`, starts a local cluster of real `berth scheduler` processes (fsync on,
//! each with its own data directory) and registers a synthetic multi-cloud pool through
//! `NodeService`, as agents would. Then `--concurrency` workers create sandboxes through
//! the gRPC API for `--duration`; each worker deletes its oldest sandboxes to keep the live
//! count steady. With `--rate`, creates are sent open-loop at that total rate and latency is
//! measured from each create's scheduled send time.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::Mutex;

use berth_proto::pb::v1 as pb;
use berth_scheduler::convert;
use berth_scheduler::service::client::Client;
use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};
use berth_sim::synthetic;

/// Arguments of `berth bench create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Replicas of the local cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    replicas: u64,
    /// How long to drive creates, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = super::parse_duration)]
    duration: Duration,
    /// Concurrent client workers.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: u64,
    /// Total creates per second, open-loop; unset = as fast as the cluster answers.
    #[arg(long)]
    rate: Option<u64>,
    /// Sandboxes each worker keeps alive (older ones are deleted).
    #[arg(long, default_value_t = 4)]
    keep: usize,
    /// Nodes in the synthetic pool registered on the local cluster.
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// An existing cluster (comma-separated host:port) instead of a local one; its pool is
    /// used as it is.
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// Keep the local cluster's configs, logs and data here instead of a temporary
    /// directory (to read the replicas' logs afterwards).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Client connections per replica, shared by the workers (HTTP/2 multiplexes them).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Run the local cluster without TLS (to measure what TLS costs; see also
    /// --compare-tls).
    #[arg(long, conflicts_with = "compare_tls")]
    insecure: bool,
    /// Run the benchmark twice on fresh local clusters, without TLS and then with it, and
    /// print both and their ratio (TLS / plaintext).
    #[arg(long, conflicts_with = "target")]
    compare_tls: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct CreateReport {
    replicas: u64,
    creates_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    creates: u64,
    deletes: u64,
    duration_s: f64,
    concurrency: u64,
    rate: Option<u64>,
    /// Leader-side create latency (arrival → answer), upper bucket bounds of its histogram.
    leader_p50_ms: Option<f64>,
    leader_p99_ms: Option<f64>,
    error_samples: Vec<String>,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    creates: u64,
    deletes: u64,
    errors: u64,
    error_samples: Vec<String>,
}

pub(crate) fn run(args: &CreateArgs) -> ExitCode {
    if args.compare_tls {
        return compare_tls(args);
    }
    match super::block_on("bench create", bench(args, args.insecure)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print_report("", &report);
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn print_report(label: &str, report: &CreateReport) {
    println!(
        "{label}{} replicas: {:.0} creates/s committed, p50 {:.2} ms, p99 {:.2} ms, {} errors \
         ({} creates, {} deletes in {:.1} s)",
        report.replicas,
        report.creates_per_s,
        report.p50_ms,
        report.p99_ms,
        report.errors,
        report.creates,
        report.deletes,
        report.duration_s
    );
    for e in &report.error_samples {
        println!("  error: {e}");
    }
}

/// Plaintext, then TLS, each on a fresh local cluster, in one process: the two figures
/// share the machine's state of the moment.
fn compare_tls(args: &CreateArgs) -> ExitCode {
    let both = super::block_on("bench create", async {
        let plain = bench(args, true).await?;
        let tls = bench(args, false).await?;
        Ok::<_, String>((plain, tls))
    });
    let (plain, tls) = match both {
        Ok(both) => both,
        Err(code) => return code,
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let throughput = ratio(tls.creates_per_s, plain.creates_per_s);
    let p99 = ratio(tls.p99_ms, plain.p99_ms);
    if args.json {
        let value = serde_json::json!({
            "plaintext": plain,
            "tls": tls,
            "tls_over_plaintext_creates_per_s": throughput,
            "tls_over_plaintext_p99": p99,
        });
        println!("{value}");
    } else {
        print_report("plaintext: ", &plain);
        print_report("mTLS:      ", &tls);
        println!("mTLS / plaintext: creates/s x{throughput:.3}, p99 x{p99:.3}");
    }
    ExitCode::SUCCESS
}

async fn bench(args: &CreateArgs, insecure: bool) -> Result<CreateReport, String> {
    let mut _cluster = None;
    let mut _dir = None;
    let mut credentials = berth_net::client::Credentials::default();
    let (endpoints, replicas) = if args.target.is_empty() {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let binary = std::env::current_exe().map_err(|e| format!("locating berth: {e}"))?;
        let mut cfg = LocalClusterConfig::new(binary);
        cfg.replicas = args.replicas as usize;
        cfg.insecure = insecure;
        let cluster_dir = args.dir.clone().unwrap_or_else(|| dir.path().to_path_buf());
        let _ = std::fs::create_dir_all(&cluster_dir);
        let mut cluster = LocalCluster::start(cfg, &cluster_dir)
            .map_err(|e| format!("starting the local cluster: {e}"))?;
        if cluster
            .wait_for_leader(Duration::from_secs(20))
            .await
            .is_none()
        {
            return Err(format!(
                "no leader within 20 s; last log lines:\n{}",
                cluster.log_tail(0, 20)
            ));
        }
        register_pool(&cluster, args.nodes).await?;
        let endpoints = cluster.endpoints();
        credentials.tls = cluster.admin_tls().cloned();
        _cluster = Some(cluster);
        _dir = Some(dir);
        (endpoints, args.replicas)
    } else {
        credentials = crate::credentials::resolve(None, None, insecure)?;
        let replicas = Client::new(args.target.clone())
            .with_credentials(credentials.clone())?
            .status()
            .await
            .map_err(|e| format!("{}: {}", args.target.join(","), e.message()))?
            .replicas
            .len() as u64;
        (args.target.clone(), replicas)
    };

    // Warm up: every worker connects and finds the leader with one untimed create, so the
    // figures measure the cluster, not connection set-up and the first redirect.
    let mut clients = Vec::new();
    let mut warmups = Vec::new();
    // Workers share connections (one HTTP/2 connection per replica, multiplexed), as an API
    // tier would; per-worker connections cost a syscall per tiny frame.
    let connections = args.connections.max(1);
    let pool: Vec<Client> = (0..connections)
        .map(|_| {
            Client::new(endpoints.clone())
                .with_credentials(credentials.clone())
                .map(Client::share_connections)
        })
        .collect::<Result<_, _>>()?;
    for w in 0..args.concurrency {
        let mut client = pool[(w % connections as u64) as usize].clone();
        client.deadline = Duration::from_secs(10);
        warmups.push(tokio::spawn(async move {
            let r = client.create(&format!("warmup-{w}"), bench_spec(4)).await;
            if let Ok(Some(s)) = r.map(|r| r.sandbox) {
                let _ = client.delete(&s.id).await;
            }
            client
        }));
    }
    for w in warmups {
        clients.push(w.await.map_err(|e| e.to_string())?);
    }
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let end = started + args.duration;
    let mut workers = Vec::new();
    for (w, mut client) in clients.into_iter().enumerate() {
        let w = w as u64;
        client.deadline = Duration::from_secs(5);
        let tally = tally.clone();
        let interval = args
            .rate
            .map(|r| Duration::from_secs_f64(args.concurrency as f64 / r.max(1) as f64));
        let keep = args.keep;
        let concurrency = args.concurrency;
        workers.push(tokio::spawn(async move {
            let mut live: VecDeque<String> = VecDeque::new();
            let mut local = Tally::default();
            let mut n = 0u64;
            // Spread open-loop workers over one interval.
            let mut next = started
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / concurrency as f64));
            while Instant::now() < end {
                if interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                let sent = if interval.is_some() {
                    next
                } else {
                    Instant::now()
                };
                if let Some(i) = interval {
                    next += i;
                }
                n += 1;
                let spec = bench_spec(n);
                match client.create(&format!("bench-{w}-{n}"), spec).await {
                    Ok(r) => {
                        local.creates += 1;
                        local.latencies_us.push(sent.elapsed().as_micros() as u64);
                        if let Some(s) = r.sandbox {
                            live.push_back(s.id);
                        }
                    }
                    Err(e) => {
                        local.errors += 1;
                        if local.error_samples.len() < 3 {
                            local
                                .error_samples
                                .push(format!("{:?}: {}", e.code(), e.message()));
                        }
                    }
                }
                while live.len() > keep {
                    let Some(id) = live.pop_front() else { break };
                    match client.delete(&id).await {
                        Ok(_) => local.deletes += 1,
                        Err(e) => {
                            local.errors += 1;
                            if local.error_samples.len() < 3 {
                                local.error_samples.push(format!(
                                    "delete {:?}: {}",
                                    e.code(),
                                    e.message()
                                ));
                            }
                        }
                    }
                }
            }
            let mut t = tally.lock().await;
            t.latencies_us.extend(local.latencies_us);
            t.creates += local.creates;
            t.deletes += local.deletes;
            t.errors += local.errors;
            for e in local.error_samples {
                if t.error_samples.len() < 5 {
                    t.error_samples.push(e);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (leader_p50_ms, leader_p99_ms) = match &_cluster {
        Some(cluster) => leader_latency(cluster).await,
        None => (None, None),
    };
    let mut t = std::mem::take(&mut *tally.lock().await);
    t.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if t.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((t.latencies_us.len() as f64 * p) as usize).min(t.latencies_us.len() - 1);
        t.latencies_us[i] as f64 / 1_000.0
    };
    Ok(CreateReport {
        replicas,
        creates_per_s: t.creates as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: t.errors,
        creates: t.creates,
        deletes: t.deletes,
        duration_s: elapsed,
        concurrency: args.concurrency,
        rate: args.rate,
        leader_p50_ms,
        leader_p99_ms,
        error_samples: t.error_samples,
    })
}

/// Percentiles of the leader's `berth_create_seconds` histogram (bucket upper bounds).
async fn leader_latency(cluster: &LocalCluster) -> (Option<f64>, Option<f64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for m in &cluster.members {
        let Ok(mut stream) = tokio::net::TcpStream::connect(&m.metrics_address).await else {
            continue;
        };
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            m.metrics_address
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut body = String::new();
        let _ = stream.read_to_string(&mut body).await;
        if !body.contains("berth_raft_is_leader 1") {
            continue;
        }
        let buckets: Vec<(f64, f64)> = body
            .lines()
            .filter_map(|l| l.strip_prefix("berth_create_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, n) = l.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, n.trim().parse().ok()?))
            })
            .collect();
        let total = buckets.last().map_or(0.0, |b| b.1);
        let at = |p: f64| {
            buckets
                .iter()
                .find(|(_, n)| *n >= total * p)
                .map(|(le, _)| le * 1_000.0)
        };
        if total > 0.0 {
            return (at(0.5), at(0.99));
        }
    }
    (None, None)
}

/// A small CPU sandbox or a fractional/whole GPU one, cycling deterministically.
fn bench_spec(n: u64) -> pb::SandboxSpec {
    let gpu = match n % 8 {
        0 => Some("H100"),
        1 => Some("A100-80GB|H100"),
        2 => Some("T4:500m"),
        3 => Some("L4"),
        _ => None,
    };
    pb::SandboxSpec {
        tenant: "bench".into(),
        image: "python:3.12".into(),
        command: vec!["python".into(), "agent.py".into()],
        resources: Some(pb::Resources {
            cpu_milli: 500,
            memory_mib: 1_024,
            gpu: gpu.map(|g| pb::GpuRequest {
                options: vec![g.into()],
                min_memory_mib: 0,
            }),
        }),
        ..Default::default()
    }
}

async fn register_pool(cluster: &LocalCluster, nodes: usize) -> Result<(), String> {
    let specs = synthetic::pool(nodes, 1);

    let chunks: Vec<Vec<pb::NodeInventory>> = specs
        .chunks(specs.len().div_ceil(32).max(1))
        .map(|c| c.iter().map(convert::node_inventory_to_pb).collect())
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let mut client = cluster.client();
        tasks.push(tokio::spawn(async move {
            for inventory in chunk {
                let id = inventory.node_id.clone();
                client
                    .register_node(inventory)
                    .await
                    .map_err(|e| format!("registering {id}: {}", e.message()))?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Arguments of `berth bench failover`.
#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    /// Times to kill the leader.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    runs: u64,
    /// Replicas of the local cluster.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    replicas: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct FailoverReport {
    replicas: u64,
    runs: usize,
    failover_ms: Vec<f64>,
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
}

/// Kills the leader of a local cluster (SIGKILL) `runs` times and measures the time from
/// the kill to the first create acknowledged afterwards; the killed replica is restarted
/// and caught up between runs.
pub(crate) fn failover(args: &FailoverArgs) -> ExitCode {
    match super::block_on("bench failover", failover_runs(args)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!(
                    "{} kills of the leader ({} replicas): median {:.0} ms, p90 {:.0} ms, max {:.0} ms \
                     from kill -9 to the first acknowledged create",
                    report.runs, report.replicas, report.median_ms, report.p90_ms, report.max_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn failover_runs(args: &FailoverArgs) -> Result<FailoverReport, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let binary = std::env::current_exe().map_err(|e| format!("locating berth: {e}"))?;
    let mut cfg = LocalClusterConfig::new(binary);
    cfg.replicas = args.replicas as usize;
    let mut cluster = LocalCluster::start(cfg, dir.path())
        .map_err(|e| format!("starting the local cluster: {e}"))?;
    register_pool(&cluster, 16).await?;
    let mut times = Vec::new();
    let mut n = 0u64;
    for run in 0..args.runs {
        let leader = cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .ok_or_else(|| format!("run {run}: no leader within 30 s"))?;
        // Warm the client on the current leader.
        let mut client = cluster.client();
        client.deadline = Duration::from_secs(30);
        n += 1;
        client
            .create(&format!("failover-warm-{n}"), bench_spec(n))
            .await
            .map_err(|e| format!("run {run}: {}", e.message()))?;
        let killed = Instant::now();
        cluster.kill(leader);
        n += 1;
        client
            .create(&format!("failover-{n}"), bench_spec(n))
            .await
            .map_err(|e| format!("run {run}: no create after the kill: {}", e.message()))?;
        times.push(killed.elapsed().as_secs_f64() * 1_000.0);
        // Bring the killed replica back and let it catch up before the next run.
        cluster
            .restart(leader)
            .map_err(|e| format!("restarting replica {}: {e}", leader + 1))?;
        let target = client.status().await.map_err(|e| e.message().to_owned())?;
        let started = Instant::now();
        loop {
            let caught_up = cluster
                .status(leader)
                .await
                .is_ok_and(|s| s.applied_index >= target.commit_index);
            if caught_up {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("replica {} did not catch up", leader + 1));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)];
    Ok(FailoverReport {
        replicas: args.replicas,
        runs: times.len(),
        median_ms: at(0.5),
        p90_ms: at(0.9),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        failover_ms: times,
    })
}
