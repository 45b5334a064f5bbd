//! `berth`: one binary for every role of the berth control plane.
//!
//! # Layout
//! - `cli`: the command line (clap), one subcommand per role or tool.
//! - `commands`: the subcommands with more than a few lines (`scheduler`, `agent`, `dev`,
//!   `sandbox`, `node`, `cluster`, `pool`, `token`, `cert`, `sim`, `bench`), and what the cluster
//!   commands share (endpoint flags, the client runner, tables).
//! - `credentials`: where the cluster commands find their CA, certificate and token.
//! - `config_file`: reading and validating berth TOML config files.
//! - `logging`: tracing setup for `--log-level` and `--log-format`.

mod cli;
mod commands;
mod config_file;
mod credentials;
mod exit;
mod logging;

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if let Err(e) = logging::init(&cli.log_level, cli.log_format) {
        eprintln!("berth: {e:#}");
        return ExitCode::from(exit::EXIT_USAGE);
    }
    cli.run()
}
