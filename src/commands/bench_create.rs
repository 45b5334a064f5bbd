//! `berth bench create`: create throughput and latency through a Raft cluster.
//!
//! Without `--target`, starts a local cluster of real `berth scheduler` processes (fsync on,
//! each with its own data directory) and registers a synthetic multi-cloud pool through
//! `NodeService`, as agents would. Then `--concurrency` workers create sandboxes through
//! the gRPC API for `--duration`; each worker deletes its oldest sandboxes to keep the live
//! count steady. With `--rate`, creates are sent open-loop at that total rate and latency is
//! measured from each create's scheduled send time. With `--batch N` each call is a
//! `CreateSandboxes` of N items and the deletes go in `DeleteSandboxes` calls of up to N
//! (`bench_create_batch`). With `--compare-etcd`, `etcdctl check perf --load=l` against a
//! 3-member etcd on loopback runs after it (`bench_etcd`) and the ratio is printed.

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
    /// Concurrent client workers, each with one call in flight [default: 1024; with
    /// --batch, 64 (4,096 items in flight at 64 a call)].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    concurrency: Option<u64>,
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
    /// Send creates as `CreateSandboxes` calls of this many items, and deletes as
    /// `DeleteSandboxes` calls of up to as many; latency is then per call (each item of a
    /// call is answered with it). Unset: one `CreateSandbox` and `DeleteSandbox` per item.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=berth_proto::pb::MAX_BATCH_ITEMS as u64))]
    batch: Option<u64>,
    /// Afterwards, run `etcdctl check perf --load=l` against a 3-member etcd on loopback
    /// (as `berth bench etcd-perf`) and print berth's rate over etcd's.
    #[arg(long, conflicts_with = "compare_tls")]
    compare_etcd: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

impl CreateArgs {
    /// Workers: as given, else 1,024 single calls in flight, or 64 batch calls. With
    /// --batch the throughput keeps rising past 64 calls (about 35,000 creates/s at 128 on
    /// this 2-core machine) but the p99 grows with the queue; 64 keeps it near 130 ms.
    fn concurrency(&self) -> u64 {
        self.concurrency
            .unwrap_or(if self.batch.is_some() { 64 } else { 1_024 })
    }
}

#[derive(Debug, Serialize)]
pub(super) struct CreateReport {
    replicas: u64,
    /// Items per `CreateSandboxes` call; `None`: one `CreateSandbox` per create.
    batch: Option<u64>,
    pub(super) creates_per_s: f64,
    deletes_per_s: f64,
    /// Per call: with `batch`, every item of a call has its call's latency.
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    creates: u64,
    deletes: u64,
    /// Create calls sent (equal to `creates` plus failed ones without `batch`).
    create_calls: u64,
    duration_s: f64,
    concurrency: u64,
    rate: Option<u64>,
    /// Leader-side create latency (arrival → answer), upper bucket bounds of its histogram.
    leader_p50_ms: Option<f64>,
    leader_p99_ms: Option<f64>,
    error_samples: Vec<String>,
}

/// What workers counted: per create call, its latency; per item, its outcome.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) latencies_us: Vec<u64>,
    pub(super) creates: u64,
    pub(super) create_calls: u64,
    pub(super) deletes: u64,
    pub(super) errors: u64,
    error_samples: Vec<String>,
}

impl Tally {
    /// Counts a failed item, keeping the first few errors to show.
    pub(super) fn error(&mut self, what: &str, e: &tonic::Status) {
        self.errors += 1;
        if self.error_samples.len() < 3 {
            self.error_samples
                .push(format!("{what}{:?}: {}", e.code(), e.message()));
        }
    }

    fn absorb(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        self.creates += other.creates;
        self.create_calls += other.create_calls;
        self.deletes += other.deletes;
        self.errors += other.errors;
        for e in other.error_samples {
            if self.error_samples.len() < 5 {
                self.error_samples.push(e);
            }
        }
    }
}

/// One worker's share of the load: its index, the window, and its pace under `--rate`.
pub(super) struct Worker {
    pub(super) index: u64,
    pub(super) end: Instant,
    /// Between two of this worker's calls under `--rate`; `None`: closed loop.
    interval: Option<Duration>,
    /// Sandboxes the worker keeps alive; older ones are deleted.
    pub(super) keep: usize,
    /// The first send (workers are spread over one interval under `--rate`).
    next: Instant,
}

impl Worker {
    /// When the next call counts as sent: under `--rate`, once its scheduled time comes
    /// (latency runs from then, so a late send counts against the cluster); else now.
    pub(super) async fn pace(&mut self) -> Instant {
        match self.interval {
            Some(i) => {
                tokio::time::sleep_until(self.next.into()).await;
                let sent = self.next;
                self.next += i;
                sent
            }
            None => Instant::now(),
        }
    }

    /// One `CreateSandbox` then `DeleteSandbox` per item, until the end of the window.
    async fn run_single(mut self, mut client: Client) -> Tally {
        let mut live: VecDeque<String> = VecDeque::new();
        let mut local = Tally::default();
        let mut n = 0u64;
        let w = self.index;
        while Instant::now() < self.end {
            let sent = self.pace().await;
            n += 1;
            local.create_calls += 1;
            match client
                .create(&format!("bench-{w}-{n}"), bench_spec(n))
                .await
            {
                Ok(r) => {
                    local.creates += 1;
                    local.latencies_us.push(sent.elapsed().as_micros() as u64);
                    if let Some(s) = r.sandbox {
                        live.push_back(s.id);
                    }
                }
                Err(e) => local.error("", &e),
            }
            while live.len() > self.keep {
                let Some(id) = live.pop_front() else { break };
                match client.delete(&id).await {
                    Ok(_) => local.deletes += 1,
                    Err(e) => local.error("delete ", &e),
                }
            }
        }
        local
    }
}

pub(crate) fn run(args: &CreateArgs) -> ExitCode {
    if args.compare_tls {
        return compare_tls(args);
    }
    if args.compare_etcd {
        return compare_etcd(args);
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

pub(super) fn print_report(label: &str, report: &CreateReport) {
    let per = match report.batch {
        Some(n) => format!(
            "CreateSandboxes of {n}, {} calls; latency per call = per item",
            report.create_calls
        ),
        None => "one CreateSandbox per create".into(),
    };
    println!(
        "{label}{} replicas: {:.0} creates/s committed, {:.0} deletes/s, p50 {:.2} ms, \
         p99 {:.2} ms, {} errors ({} creates, {} deletes in {:.1} s; {per})",
        report.replicas,
        report.creates_per_s,
        report.deletes_per_s,
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

/// berth's run, then etcd's (`etcdctl check perf --load=l`, 3 members on loopback) once
/// berth's cluster is gone, so neither competes with the other for the machine; then the
/// ratio of berth's committed creates/s to etcd's writes/s (each delete is a write too, so
/// the ratio of writes is about twice that with the steady-state deletes).
fn compare_etcd(args: &CreateArgs) -> ExitCode {
    let berth = match super::block_on("bench create", bench(args, args.insecure)) {
        Ok(report) => report,
        Err(code) => return code,
    };
    let etcd = match super::bench_etcd::measure(&super::bench_etcd::EtcdPerfArgs::default()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("berth bench create --compare-etcd: {e}");
            return ExitCode::from(crate::exit::EXIT_FAILURE);
        }
    };
    let ratio = if etcd.writes_per_s > 0.0 {
        berth.creates_per_s / etcd.writes_per_s
    } else {
        f64::NAN
    };
    if args.json {
        let value = serde_json::json!({
            "berth": berth,
            "etcd": etcd,
            "berth_creates_over_etcd_writes": ratio,
        });
        println!("{value}");
    } else {
        print_report("berth: ", &berth);
        super::bench_etcd::print_report(&etcd);
        println!("berth creates/s / etcd writes/s: x{ratio:.2}");
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
    let concurrency = args.concurrency();
    for w in 0..concurrency {
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
    // Under --rate, each worker sends one call per interval; a call carries `batch` items.
    let per_call = args.batch.unwrap_or(1);
    let interval = args
        .rate
        .map(|r| Duration::from_secs_f64((concurrency * per_call) as f64 / r.max(1) as f64));
    for (w, mut client) in clients.into_iter().enumerate() {
        let w = w as u64;
        client.deadline = Duration::from_secs(5);
        let tally = tally.clone();
        let worker = Worker {
            index: w,
            end,
            interval,
            keep: args.keep,
            next: started
                + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / concurrency as f64)),
        };
        let batch = args.batch;
        workers.push(tokio::spawn(async move {
            let local = match batch {
                Some(n) => super::bench_create_batch::run(worker, client, n as usize).await,
                None => worker.run_single(client).await,
            };
            tally.lock().await.absorb(local);
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
        batch: args.batch,
        creates_per_s: t.creates as f64 / elapsed,
        deletes_per_s: t.deletes as f64 / elapsed,
        create_calls: t.create_calls,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: t.errors,
        creates: t.creates,
        deletes: t.deletes,
        duration_s: elapsed,
        concurrency,
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
pub(super) fn bench_spec(n: u64) -> pb::SandboxSpec {
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

pub(super) async fn register_pool(cluster: &LocalCluster, nodes: usize) -> Result<(), String> {
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
