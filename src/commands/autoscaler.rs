//! `berth autoscaler --config FILE`: the autoscaler as its own process. It waits for the
//! autoscaler lease in the scheduler's replicated state and, while it holds it, grows and
//! shrinks the node groups of the file's `[autoscaler]` section through their providers.
//! SIGINT or SIGTERM stops it (and the agents of a local provider).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::controller::{Controller, unix_ms};
use berth_autoscaler::metrics::Metrics;
use berth_autoscaler::provider::{self, Environment, sim::SimClock};

use crate::cli::EXIT_FAILURE;
use crate::config_file::ConfigFile;

/// Arguments of `berth autoscaler`.
#[derive(Debug, Args)]
pub(crate) struct AutoscalerArgs {
    /// Config file with an [autoscaler] section.
    #[arg(long)]
    config: PathBuf,
    /// Where to serve /metrics; empty for nowhere.
    #[arg(long, default_value = "127.0.0.1:9190")]
    metrics_address: String,
    /// This instance's name in the lease (default: hostname/pid/start time).
    #[arg(long)]
    holder: Option<String>,
}

pub(crate) fn run(args: &AutoscalerArgs) -> ExitCode {
    let file = match ConfigFile::load(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let Some(cfg) = file.autoscaler else {
        eprintln!("{}: no [autoscaler] section", args.config.display());
        return ExitCode::from(EXIT_FAILURE);
    };
    let holder = args.holder.clone().unwrap_or_else(default_holder);
    let metrics_address = args.metrics_address.clone();
    super::run_service("autoscaler", async move {
        let shutdown = super::scheduler::shutdown_signal();
        serve(cfg, holder, &metrics_address, shutdown).await
    })
}

/// This process's default lease name.
pub(crate) fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}/{}", std::process::id(), unix_ms())
}

/// Runs an autoscaler until `shutdown`, then stops the local provider's agents.
pub(crate) async fn serve(
    cfg: AutoscalerConfig,
    holder: String,
    metrics_address: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let env = Environment {
        berth_binary: std::env::current_exe()
            .map_err(|e| format!("cannot find the berth binary for local agents: {e}"))?,
        schedulers: cfg.schedulers.clone(),
        sim_clock: SimClock::new(),
        call_timeout: Duration::from_secs(30),
    };
    let built = provider::build(&cfg, &env).await?;
    // A sim provider outside the simulator runs in real time.
    let clock = env.sim_clock.clone();
    let ticker = tokio::spawn(async move {
        let start = unix_ms();
        loop {
            clock.set(unix_ms().saturating_sub(start));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let metrics = Metrics::new();
    let server = if metrics_address.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(metrics_address)
            .await
            .map_err(|e| format!("metrics address {metrics_address}: {e}"))?;
        tracing::info!(address = %metrics_address, "autoscaler metrics on /metrics");
        Some(tokio::spawn(metrics.clone().serve(listener)))
    };
    tracing::info!(%holder, groups = cfg.node_groups.len(), "autoscaler starting");
    Controller::new(cfg, built.providers, holder, metrics)
        .run(shutdown)
        .await;
    ticker.abort();
    if let Some(s) = server {
        s.abort();
    }
    for local in built.local {
        local.shutdown().await;
    }
    Ok(())
}
