//! `berth sandbox …`: create a sandbox and follow it to its exit, list, inspect, read the
//! output of and delete sandboxes.
//!
//! `create` without `--detach` behaves like running the command locally: it prints nothing
//! but the sandbox's stdout and stderr and exits with the sandbox's exit code. It polls
//! `GetSandbox` while the sandbox waits for a node, streams `ReadLogs` while it runs, then
//! polls again for the final state (the agent's exit report can trail the end of output).
//!
//! `exec`, `shell` and `cp` work inside a running sandbox (a `--keep-alive` one stays
//! running until deleted or a limit ends it).
//!
//! - `create`: create and follow a sandbox to its exit.
//! - `exec`: `exec` and `shell`.
//! - `cp`: files in and out.
//! - `pause`: waiting out `pause` and `resume`.
//! - `snapshot`: the filesystem changes pushed as a new image.
//! - `show`: `list` and `get` output (tables, `key: value`, JSON).
//! - `parse`: the command line's value parsers.

mod cp;
mod create;
pub(crate) use create::shape_spec;
mod exec;
mod parse;
mod pause;
pub(crate) mod show;
mod snapshot;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::SandboxState;

use super::{CallTimeout, DEFAULT_CALL_TIMEOUT, Endpoint, Table, emit, enum_label, parse_duration};
use crate::exit::EXIT_USAGE;
use create::{copy_output, create, spec};
use parse::{parse_cpu_milli, parse_gpu_option, parse_key_value, parse_memory_mib, parse_state};
use show::{describe, list, now_unix_ms, sandbox_json};

/// Page size of `sandbox list` (the server's maximum).
const LIST_PAGE_SIZE: u32 = 1_000;

/// Sandbox commands.
#[derive(Debug, Args)]
pub(crate) struct SandboxArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(subcommand)]
    command: SandboxCommand,
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Create a sandbox, print its output as it runs and exit with its exit code.
    Create(CreateArgs),
    /// List sandboxes.
    List {
        /// Only this tenant's sandboxes.
        #[arg(long)]
        tenant: Option<String>,
        /// Only sandboxes in these states (pending, scheduled, running, pausing, paused,
        /// unknown, exited, failed, lost; comma-separated or repeated).
        #[arg(long = "state", value_name = "STATE", value_delimiter = ',', value_parser = parse_state)]
        states: Vec<SandboxState>,
        /// Only sandboxes on this node.
        #[arg(long)]
        node: Option<String>,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Print a sandbox's captured stdout and stderr.
    Logs {
        /// Sandbox id.
        id: String,
        /// Keep printing new output until the sandbox exits.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Run a command in a running sandbox, like `docker exec`; exits with its exit code.
    Exec {
        /// Sandbox id.
        id: String,
        /// Send stdin even when it is a terminal (it is always sent when it is not).
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (use with -i for a shell).
        #[arg(short, long)]
        tty: bool,
        /// Environment variable (repeatable).
        #[arg(short, long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        env: Vec<(String, String)>,
        /// Working directory in the sandbox (absolute).
        #[arg(short, long)]
        workdir: Option<String>,
        /// Kill the command after this long, e.g. 30s (default: no limit of its own).
        #[arg(long, value_parser = parse_duration)]
        exec_timeout: Option<Duration>,
        /// The command and its arguments, after `--`.
        #[arg(
            value_name = "CMD",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<String>,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// An interactive shell in a running sandbox (`exec -it ID -- sh`).
    Shell {
        /// Sandbox id.
        id: String,
        /// The shell.
        #[arg(long, default_value = "sh")]
        shell: String,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Copy a file into or out of a running sandbox: `cp LOCAL ID:PATH` or `cp ID:PATH
    /// LOCAL` (`-` for stdin or stdout). At most 1 GiB.
    Cp {
        /// Source.
        src: String,
        /// Destination; a trailing `/` keeps the source's file name.
        dst: String,
        /// Create missing parent directories in the sandbox.
        #[arg(short, long)]
        parents: bool,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Pause a running sandbox to its node's disk, memory and files, releasing what it
    /// holds there; waits until the snapshot is taken (like `docker pause`, but to disk).
    Pause {
        /// Sandbox id.
        id: String,
        /// Freeze it in place instead (standby): it keeps its memory on its node and gives
        /// back its CPU, and a resume thaws it there in milliseconds. After the scheduler's
        /// standby_pause_after_ms it is paused to disk.
        #[arg(long)]
        standby: bool,
        /// Return once the pause is recorded, without waiting for the snapshot.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Resume a paused sandbox where it was (its files, processes and memory); waits until
    /// it runs again.
    Resume {
        /// Sandbox id.
        id: String,
        /// Return once the resume is recorded, without waiting for it to run.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Push a running, standby or paused sandbox's filesystem changes as a new image (its
    /// image plus one layer) to its node's snapshot repository; prints the reference, which
    /// `sandbox create --image` takes. Files in /tmp (sandbox memory) are not included.
    Snapshot {
        /// Sandbox id.
        id: String,
        /// Push to this `REPOSITORY:TAG`, under `<snapshot repository>/<tenant>/` (default:
        /// `<snapshot repository>/<tenant>/<id>:<unix ms>`).
        #[arg(long)]
        reference: Option<String>,
        /// Print the whole result as JSON (as `-o json`).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        call: CallTimeout,
    },
    /// Stop a sandbox (if running) and remove it.
    Delete {
        /// Sandbox id.
        id: String,
        /// Time between SIGTERM and SIGKILL, e.g. 30s (default: the agent's, 10 s).
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
        #[command(flatten)]
        call: CallTimeout,
    },
}

/// `sandbox create --network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum NetworkMode {
    None,
    EgressAll,
}

/// `--allow CIDR[:PORT,PORT...]`, checked as the scheduler will check it.
fn parse_egress_rule(s: &str) -> Result<pb::EgressRule, String> {
    let (cidr, ports) = match s.split_once(':') {
        Some((c, p)) => (c, Some(p)),
        None => (s, None),
    };
    cidr.parse::<berth_proto::network::Cidr>()?;
    let ports = match ports {
        None => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|p| match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(u32::from(n)),
                _ => Err(format!("{p:?} is not a port (1..=65535)")),
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(pb::EgressRule {
        cidr: cidr.into(),
        ports,
    })
}

/// What a sandbox is made of: resources, where it may run, its image, limits and
/// network. Shared by `sandbox create` and `pool set` (a pool's template).
#[derive(Debug, Args)]
pub(crate) struct ShapeArgs {
    /// GPU request, MODEL[!][:COUNT] or MODEL:MILLIm, e.g. H100:2, A100-80GB, any:500m;
    /// several (comma-separated or repeated) are fallbacks in preference order.
    #[arg(long, value_name = "SPEC", value_delimiter = ',', value_parser = parse_gpu_option)]
    gpu: Vec<String>,
    /// CPU cores; fractions allowed (0.5 = 500 milli-cores).
    #[arg(long, value_name = "CORES", default_value = "1", value_parser = parse_cpu_milli)]
    cpu: u64,
    /// Memory: 512Mi, 2Gi, 1.5GiB; a plain number is MiB.
    #[arg(long, value_name = "SIZE", default_value = "1Gi", value_parser = parse_memory_mib)]
    memory: u64,
    /// Allowed regions (comma-separated or repeated); default any.
    #[arg(long = "region", value_name = "REGION", value_delimiter = ',')]
    regions: Vec<String>,
    /// Allowed providers (comma-separated or repeated); default any.
    #[arg(long = "provider", value_name = "PROVIDER", value_delimiter = ',')]
    providers: Vec<String>,
    /// Tenant that owns the sandbox.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// OCI image to run the command in (default: the agent's).
    #[arg(long)]
    image: Option<String>,
    /// Session limit once running, e.g. 90s or 10m (default: the tenant's, 45 min unless
    /// the scheduler says otherwise).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// End the sandbox after this long without an exec or file call, e.g. 10m (default:
    /// the tenant's).
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Network: `none` (loopback only, the default) or `egress-all` (anywhere but the
    /// node, other sandboxes and the node's blocked ranges). Inbound is always denied.
    #[arg(long, value_enum, value_name = "MODE", conflicts_with = "allow")]
    network: Option<NetworkMode>,
    /// Let the sandbox reach only these destinations (repeatable): an IPv4 network or
    /// address, with optional TCP/UDP ports, e.g. `10.0.0.0/8` or `1.2.3.4:80,443`.
    #[arg(long, value_name = "CIDR[:PORTS]", value_parser = parse_egress_rule)]
    allow: Vec<pb::EgressRule>,
}

/// `sandbox create` flags.
#[derive(Debug, Args)]
struct CreateArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// Environment variable (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Keep the sandbox running after its command ends, or with no command at all (not
    /// even the image's), until deleted or a limit ends it: for `exec`, `cp` and `shell`.
    /// A keep-alive create with no command that matches a warm pool is served by one of
    /// its sandboxes at once.
    #[arg(long)]
    keep_alive: bool,
    /// Pause the sandbox to disk (memory and files) after this long without an exec or
    /// file call, e.g. 30s; `sandbox resume` brings it back. Needs --keep-alive.
    #[arg(long, value_parser = parse_duration, requires = "keep_alive")]
    auto_pause: Option<Duration>,
    /// An exec or file call while the sandbox is paused or on standby resumes it first
    /// (and waits for it, up to 60 s) instead of being refused. Needs --keep-alive.
    #[arg(long, requires = "keep_alive")]
    auto_resume: bool,
    /// Label for listing (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    labels: Vec<(String, String)>,
    /// Print the sandbox's id (or, with -o json, the sandbox) and return at once.
    #[arg(long)]
    detach: bool,
    /// The command and its arguments, after `--`; optional with `--image`, whose cmd runs
    /// when there is none (a command replaces the image's cmd, as `docker run` does).
    #[arg(
        value_name = "CMD",
        required_unless_present_any = ["image", "keep_alive"],
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

pub(crate) fn run(args: &SandboxArgs) -> ExitCode {
    let json = args.endpoint.json();
    let timeout = match &args.command {
        SandboxCommand::Create(_) => DEFAULT_CALL_TIMEOUT,
        SandboxCommand::List { call, .. }
        | SandboxCommand::Get { call, .. }
        | SandboxCommand::Logs { call, .. }
        | SandboxCommand::Exec { call, .. }
        | SandboxCommand::Shell { call, .. }
        | SandboxCommand::Cp { call, .. }
        | SandboxCommand::Pause { call, .. }
        | SandboxCommand::Resume { call, .. }
        | SandboxCommand::Snapshot { call, .. }
        | SandboxCommand::Delete { call, .. } => call.timeout,
    };
    let spec = match &args.command {
        SandboxCommand::Create(create) => match spec(create) {
            Ok(spec) => Some(spec),
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => None,
    };
    super::with_client("sandbox", &args.endpoint, timeout, async |client| {
        match &args.command {
            SandboxCommand::Create(create) => {
                let spec = spec.unwrap_or_default();
                return self::create(client, spec, create.detach, json).await;
            }
            SandboxCommand::List {
                tenant,
                states,
                node,
                ..
            } => {
                let request = pb::ListSandboxesRequest {
                    tenant: tenant.clone().unwrap_or_default(),
                    states: states.iter().map(|s| *s as i32).collect(),
                    node_id: node.clone().unwrap_or_default(),
                    page_size: LIST_PAGE_SIZE,
                    ..Default::default()
                };
                list(client, request, json).await?;
            }
            SandboxCommand::Get { id, .. } => {
                let sandbox = client.get(id).await?;
                if json {
                    emit(&format!("{}\n", sandbox_json(&sandbox)));
                } else {
                    emit(&describe(&sandbox, now_unix_ms()));
                }
            }
            SandboxCommand::Logs { id, follow, .. } => {
                let stream = client.read_logs(id, *follow).await?;
                copy_output(stream).await?;
            }
            SandboxCommand::Exec {
                id,
                interactive,
                tty,
                env,
                workdir,
                exec_timeout,
                command,
                ..
            } => {
                let call = exec::ExecCall {
                    id: id.clone(),
                    command: command.clone(),
                    env: env.clone(),
                    workdir: workdir.clone(),
                    interactive: *interactive,
                    tty: *tty,
                    timeout_ms: exec_timeout
                        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                };
                return exec::exec(client, call).await;
            }
            SandboxCommand::Shell { id, shell, .. } => {
                let call = exec::ExecCall {
                    id: id.clone(),
                    command: vec![shell.clone()],
                    env: Vec::new(),
                    workdir: None,
                    interactive: true,
                    tty: std::io::IsTerminal::is_terminal(&std::io::stdin()),
                    timeout_ms: 0,
                };
                return exec::exec(client, call).await;
            }
            SandboxCommand::Cp {
                src, dst, parents, ..
            } => {
                return cp::cp(client, cp::parse_place(src), cp::parse_place(dst), *parents).await;
            }
            SandboxCommand::Pause {
                id,
                standby,
                no_wait,
                ..
            } => {
                let sandbox = client.pause(id, *standby).await?;
                let goal = if *standby {
                    pause::Goal::Standby
                } else {
                    pause::Goal::Paused
                };
                return pause::settle(client, sandbox, goal, *no_wait, json).await;
            }
            SandboxCommand::Resume { id, no_wait, .. } => {
                let sandbox = client.resume(id).await?;
                return pause::settle(client, sandbox, pause::Goal::Running, *no_wait, json).await;
            }
            SandboxCommand::Snapshot {
                id,
                reference,
                json: as_json,
                ..
            } => {
                let reference = reference.as_deref().unwrap_or_default();
                return snapshot::snapshot(client, id, reference, json || *as_json).await;
            }
            SandboxCommand::Delete { id, grace, .. } => {
                let grace_ms = grace.map_or(0, |g| u64::try_from(g.as_millis()).unwrap_or(0));
                let existed = client.delete_with_grace(id, grace_ms).await?;
                if json {
                    emit(&format!(
                        "{}\n",
                        serde_json::json!({ "id": id, "existed": existed })
                    ));
                } else if existed {
                    emit(&format!("deleted {id}\n"));
                } else {
                    emit(&format!("{id} did not exist\n"));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// A sandbox in `state` with an exit code and reason, for the tests of `create` and `show`.
#[cfg(test)]
fn test_sandbox(state: SandboxState, exit_code: i32, reason: &str) -> pb::Sandbox {
    pb::Sandbox {
        id: "42".into(),
        status: Some(pb::SandboxStatus {
            state: state as i32,
            exit_code,
            reason: reason.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
