//! `berth bench pool`: create-to-running latency on `berth dev` (gVisor, one node) of a
//! create served by a warm pool beside a cold create of nearly the same shape, in one run.
//! A pool of `--size` busybox sandboxes fills; `--size` matching creates are each timed
//! from the create call until the sandbox is RUNNING; the pool refills; then as many cold
//! creates (one MiB more memory, so no pool serves them) are timed the same way. Cold
//! creates pull nothing: the image is on the node already, so the difference is the start
//! of a gVisor sandbox against the thaw of a frozen one.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use super::bench_dev::{BenchDev, until};
use super::bench_exec::{Latency, latency};

/// Arguments of `berth bench pool`.
#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    /// Sandboxes in the pool, and creates timed of each kind.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    size: u32,
    /// First of the ports the dev cluster uses (gRPC +0..3, metrics +10..13, agents +20).
    #[arg(long, default_value_t = 17_370)]
    base_port: u16,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PoolReport {
    size: u32,
    /// From the create call until RUNNING, served by the pool.
    from_pool: Latency,
    /// The same, made afresh.
    cold: Latency,
    /// How long the pool took to fill from empty.
    fill_ms: f64,
}

pub(crate) fn run(args: &PoolArgs) -> ExitCode {
    match super::block_on("bench pool", bench(args)) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!("create to RUNNING, busybox on gVisor (p50 / p99 / max, ms):");
                for (name, l) in [("from a warm pool", &r.from_pool), ("cold", &r.cold)] {
                    println!(
                        "  {name:<18} {:>8.1} {:>8.1} {:>8.1}   ({} creates)",
                        l.p50_ms, l.p99_ms, l.max_ms, l.calls
                    );
                }
                println!(
                    "cold / pool p50: {:.1}x; the pool of {} filled in {:.0} ms",
                    r.cold.p50_ms / r.from_pool.p50_ms.max(0.001),
                    r.size,
                    r.fill_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn spec(image: &str, memory_mib: u64) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "bench".into(),
        image: image.to_owned(),
        keep_alive: true,
        resources: Some(pb::Resources {
            cpu_milli: 250,
            memory_mib,
            gpu: None,
        }),
        ..Default::default()
    }
}

/// Polls until the pool has `size` ready sandboxes; how long it took.
async fn filled(client: &mut Client, size: u32) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let pools = client
            .list_warm_pools()
            .await
            .map_err(|s| s.message().to_owned())?;
        if pools.iter().any(|p| p.name == "bench" && p.ready >= size) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(300) {
            return Err(format!("the pool did not fill in 5 minutes: {pools:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates `count` sandboxes of `spec` one after another; each one's create-to-RUNNING,
/// and whether a pool served it.
async fn creates(
    client: &mut Client,
    spec: &pb::SandboxSpec,
    count: u32,
    tag: &str,
) -> Result<(Vec<Duration>, u32), String> {
    let (mut times, mut pooled) = (Vec::new(), 0);
    for i in 0..count {
        let t = Instant::now();
        let created = client
            .create(&format!("bench-pool-{tag}-{i}"), spec.clone())
            .await
            .map_err(|s| format!("create: {}", s.message()))?;
        pooled += u32::from(!created.from_pool.is_empty());
        let id = created.sandbox.map(|s| s.id).unwrap_or_default();
        times.push(until(client, &id, pb::SandboxState::Running, t).await?);
    }
    Ok((times, pooled))
}

async fn bench(args: &PoolArgs) -> Result<PoolReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bench = BenchDev::start(dir.path(), args.base_port, "berth-bench-pool", &[]).await?;
    let mut client = bench.client.clone();
    // One cold create first, so the image is on the node for both kinds.
    creates(&mut client, &spec(&bench.image, 63), 1, "warm-up").await?;
    let template = spec(&bench.image, 64);
    client
        .set_warm_pool(pb::SetWarmPoolRequest {
            name: "bench".into(),
            template: Some(template.clone()),
            size: args.size,
        })
        .await
        .map_err(|s| format!("pool set: {}", s.message()))?;
    let fill = filled(&mut client, args.size).await?;
    let (from_pool, pooled) = creates(&mut client, &template, args.size, "pool").await?;
    if pooled != args.size {
        return Err(format!(
            "only {pooled} of {} creates came from the pool",
            args.size
        ));
    }
    filled(&mut client, args.size).await?;
    let (cold, pooled) = creates(&mut client, &spec(&bench.image, 65), args.size, "cold").await?;
    if pooled != 0 {
        return Err(format!("{pooled} cold creates came from a pool"));
    }
    Ok(PoolReport {
        size: args.size,
        from_pool: latency(from_pool),
        cold: latency(cold),
        fill_ms: fill.as_secs_f64() * 1000.0,
    })
}
