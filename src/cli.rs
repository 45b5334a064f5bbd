//! The `berth` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::commands::bench::BenchCommand;
use crate::commands::scheduler::SchedulerArgs;
use crate::commands::sim::SimCommand;
use crate::config_file::ConfigFile;
use crate::logging::LogFormat;

use crate::exit::EXIT_FAILURE;

/// berth: control plane for GPU sandbox platforms.
///
/// A Raft-replicated scheduler places sandboxes on a multi-cloud pool of GPU nodes; node
/// agents run them under gVisor; an autoscaler grows and shrinks the pool; a simulator
/// replays real traces for capacity planning.
#[derive(Debug, Parser)]
#[command(name = "berth", version, propagate_version = true)]
pub(crate) struct Cli {
    /// Log level (error, warn, info, debug, trace) or a filter such as
    /// "info,berth_scheduler=debug". RUST_LOG, when set, takes precedence.
    #[arg(long, global = true, default_value = "info", value_name = "FILTER")]
    pub(crate) log_level: String,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scheduler replica.
    Scheduler(SchedulerArgs),
    /// Run a node agent.
    Agent(crate::commands::agent::AgentArgs),
    /// Supervise one sandbox (started by the agent; not for direct use).
    #[command(hide = true)]
    AgentShim(crate::commands::agent::ShimArgs),
    /// Emulate many node agents in one process (for `bench fleet` and tests).
    #[command(hide = true)]
    FleetEmulator(crate::commands::fleet_emulator::EmulatorArgs),
    /// Run the autoscaler: hold the lease, buy and release nodes through the providers.
    Autoscaler(crate::commands::autoscaler::AutoscalerArgs),
    /// Run a whole development cluster on this machine (schedulers, agents, autoscaler).
    Dev(crate::commands::dev::DevArgs),
    /// Capacity-planning simulations (openb trace replay, scenarios).
    #[command(subcommand)]
    Sim(SimCommand),
    /// Create, list, inspect and delete sandboxes.
    Sandbox(Box<crate::commands::sandbox::SandboxArgs>),
    /// List, cordon and drain nodes.
    Node(crate::commands::node::NodeArgs),
    /// Cluster status and Raft membership.
    Cluster(crate::commands::cluster::ClusterArgs),
    /// Warm pools: sandboxes kept ready so a matching create is served at once.
    Pool(crate::commands::pool::PoolArgs),
    /// Create, list and revoke API tokens (tenant and admin).
    Token(crate::commands::token::TokenArgs),
    /// A certificate authority and certificates in files (operators without their own CA).
    #[command(subcommand)]
    Cert(crate::commands::cert::CertCommand),
    /// Benchmarks: placement latency, create throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Parse and validate config files; report every problem with its field path.
    Check {
        /// TOML files with [scheduler], [agent] and/or [autoscaler] sections.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

impl Cli {
    /// Runs the chosen subcommand.
    pub(crate) fn run(self) -> ExitCode {
        match self.command {
            Command::Config(ConfigCommand::Check { files }) => config_check(&files),
            Command::Scheduler(args) => crate::commands::scheduler::run(&args),
            Command::Agent(args) => crate::commands::agent::run(&args),
            Command::AgentShim(args) => crate::commands::agent::shim(&args),
            Command::FleetEmulator(args) => crate::commands::fleet_emulator::run(&args),
            Command::Autoscaler(args) => crate::commands::autoscaler::run(&args),
            Command::Dev(args) => crate::commands::dev::run(&args),
            Command::Sim(command) => command.run(),
            Command::Sandbox(args) => crate::commands::sandbox::run(&args),
            Command::Node(args) => crate::commands::node::run(&args),
            Command::Cluster(args) => crate::commands::cluster::run(&args),
            Command::Token(args) => crate::commands::token::run(&args),
            Command::Pool(args) => crate::commands::pool::run(&args),
            Command::Cert(command) => command.run(),
            Command::Bench(command) => command.run(),
        }
    }
}

fn config_check(files: &[PathBuf]) -> ExitCode {
    let mut failed = 0;
    for path in files {
        match ConfigFile::load(path) {
            Ok(file) => println!("{}: ok ({})", path.display(), file.sections().join(", ")),
            Err(e) => {
                failed += 1;
                eprintln!("{e}");
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} config files invalid", files.len());
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
