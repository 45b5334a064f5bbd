//! `berth agent --config FILE`: a node agent, until SIGINT or SIGTERM; and the hidden
//! `berth agent-shim DIR` that supervises one sandbox (see `berth_node_agent::runtime`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use berth_node_agent::agent::{self, AgentOptions};

use crate::config_file::ConfigFile;
use crate::exit::EXIT_FAILURE;

/// Arguments of `berth agent`.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Config file with an [agent] section.
    #[arg(long)]
    config: PathBuf,
    /// Stop the node's sandboxes when the agent exits (the local autoscaler provider sets
    /// it: its nodes end with the agent). Without it a restarted agent re-adopts them.
    #[arg(long)]
    stop_sandboxes_on_exit: bool,
    /// Exit (as on SIGTERM) when the parent process goes away: the local autoscaler
    /// provider's agents end with the `berth dev` or `berth autoscaler` that started them,
    /// even when it is killed.
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

/// Arguments of `berth agent-shim`.
#[derive(Debug, Args)]
pub(crate) struct ShimArgs {
    /// The sandbox's directory (holding launch.json).
    dir: PathBuf,
}

/// The command line that runs the shim: this very binary.
pub(crate) fn shim_command() -> Result<Vec<OsString>, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the berth binary for the sandbox shim: {e}"))?;
    Ok(vec![exe.into_os_string(), "agent-shim".into()])
}

pub(crate) fn run(args: &AgentArgs) -> ExitCode {
    let file = match ConfigFile::load(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let Some(cfg) = file.agent else {
        eprintln!("{}: no [agent] section", args.config.display());
        return ExitCode::from(EXIT_FAILURE);
    };
    let shim = match shim_command() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth agent: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let opts = AgentOptions {
        config_dir: args.config.parent().unwrap_or(Path::new(".")).to_path_buf(),
        shim,
        stop_sandboxes_on_exit: args.stop_sandboxes_on_exit,
    };
    let exit_with_parent = args.exit_with_parent;
    let shutdown = async move {
        tokio::select! {
            () = super::scheduler::shutdown_signal() => {}
            () = parent_gone(), if exit_with_parent => {
                tracing::warn!("the parent process is gone; stopping");
            }
        }
    };
    super::run_service("agent", agent::run(cfg, opts, shutdown))
}

/// Completes when this process is re-parented (its parent exited).
async fn parent_gone() {
    let parent = nix::unistd::getppid();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if nix::unistd::getppid() != parent {
            return;
        }
    }
}

pub(crate) fn shim(args: &ShimArgs) -> ExitCode {
    match berth_node_agent::shim::run_shim(&args.dir) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_FAILURE),
    }
}
