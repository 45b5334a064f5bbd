//! `berth scheduler --config FILE`: one scheduler replica, until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config_file::ConfigFile;
use crate::exit::EXIT_FAILURE;

/// Arguments of `berth scheduler`.
#[derive(Debug, Args)]
pub(crate) struct SchedulerArgs {
    /// Config file with a [scheduler] section. Without one, a single replica runs on the
    /// embedded defaults: gRPC on 127.0.0.1:7070, metrics on 127.0.0.1:9090, state in
    /// ./berth-data/scheduler-1.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub(crate) fn run(args: &SchedulerArgs) -> ExitCode {
    let cfg = match &args.config {
        None => berth_scheduler::SchedulerConfig::default(),
        Some(path) => {
            let file = match ConfigFile::load(path) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            match file.scheduler {
                Some(cfg) => cfg,
                None => {
                    eprintln!("{}: no [scheduler] section", path.display());
                    return ExitCode::from(EXIT_FAILURE);
                }
            }
        }
    };
    super::run_service("scheduler", async move {
        let mut running = berth_scheduler::service::start(&cfg).await?;
        let outcome = tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                Ok(())
            }
            r = running.wait() => r,
        };
        running.shutdown().await;
        outcome
    })
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
