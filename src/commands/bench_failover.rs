//! `berth bench failover`: kill -9 the leader of a local cluster again and again and time
//! the first acknowledged create after each kill.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_scheduler::service::local_cluster::{LocalCluster, LocalClusterConfig};

use super::bench_create::{bench_spec, register_pool};

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
