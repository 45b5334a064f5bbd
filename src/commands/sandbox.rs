//! `berth sandbox …`: create a sandbox and follow it to its exit, list, inspect, read the
//! output of and delete sandboxes.
//!
//! `create` without `--detach` behaves like running the command locally: it prints nothing
//! but the sandbox's stdout and stderr and exits with the sandbox's exit code. It polls
//! `GetSandbox` while the sandbox waits for a node, streams `ReadLogs` while it runs, then
//! polls again for the final state (the agent's exit report can trail the end of output).

use std::io::Write;
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use tokio::time::Instant;
use tonic::{Status, Streaming};

use berth_proto::gpu::GpuOption;
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::SandboxState;
use berth_scheduler::service::client::Client;

use super::{CallTimeout, DEFAULT_CALL_TIMEOUT, Endpoint, Table, emit, enum_label, parse_duration};
use crate::exit::{EXIT_FAILURE, EXIT_USAGE};

/// Most rows `sandbox list` prints; more would be a dump, not a listing.
const LIST_ROWS_MAX: usize = 10_000;
/// Page size of `sandbox list` (the server's maximum).
const LIST_PAGE_SIZE: u32 = 1_000;
/// First and longest pause between polls of a sandbox's state.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);
/// How long a sandbox may stay pending before `create` says what it is waiting for.
const PLACEMENT_QUIET: Duration = Duration::from_secs(2);
/// How long after its output ended a sandbox may take to be reported terminal.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(10);
/// Exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;

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
        /// Only sandboxes in these states (pending, scheduled, running, unknown, exited,
        /// failed, lost; comma-separated or repeated).
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

/// `sandbox create` flags.
#[derive(Debug, Args)]
struct CreateArgs {
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
    /// Wall-clock limit once running, e.g. 90s or 10m (default: the tenant's).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment variable (repeatable).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_key_value)]
    env: Vec<(String, String)>,
    /// Let the sandbox reach the network (off by default).
    #[arg(long)]
    network: bool,
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
        required_unless_present = "image",
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

/// The spec `create` asks for; an error names the flag at fault.
fn spec(args: &CreateArgs) -> Result<pb::SandboxSpec, String> {
    let gpu = if args.gpu.is_empty() {
        None
    } else {
        let request = berth_proto::GpuRequest::parse(&args.gpu, None).map_err(|e| {
            format!(
                "invalid value '{}' for '--gpu <SPEC>': {e}",
                args.gpu.join(",")
            )
        })?;
        Some(berth_proto::convert::gpu_request_to_pb(&request))
    };
    Ok(pb::SandboxSpec {
        tenant: args.tenant.clone(),
        image: args.image.clone().unwrap_or_default(),
        command: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        resources: Some(pb::Resources {
            cpu_milli: args.cpu,
            memory_mib: args.memory,
            gpu,
        }),
        constraints: Some(pb::PlacementConstraints {
            providers: args.providers.clone(),
            regions: args.regions.clone(),
            ..Default::default()
        }),
        priority: 0,
        timeout_ms: args
            .timeout
            .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        network: args.network,
        labels: args.labels.iter().cloned().collect(),
    })
}

/// A request id no other `berth sandbox create` is likely to use: the time in nanoseconds
/// and the process id.
fn request_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cli-{nanos:x}-{:x}", std::process::id())
}

async fn create(
    client: &mut Client,
    spec: pb::SandboxSpec,
    detach: bool,
    json: bool,
) -> Result<ExitCode, Status> {
    let response = client.create(&request_id(), spec).await?;
    let sandbox = response
        .sandbox
        .ok_or_else(|| Status::internal("the scheduler answered without the sandbox"))?;
    if detach {
        if json {
            emit(&format!("{}\n", sandbox_json(&sandbox)));
        } else {
            emit(&format!("{}\n", sandbox.id));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = sandbox.id.clone();
    // Ctrl-C is caught only from here on: before the create is acknowledged there is
    // nothing to detach from.
    tokio::select! {
        outcome = follow(client, sandbox) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => {
            eprintln!("detached; the sandbox keeps running: berth sandbox delete {id}");
            Ok(ExitCode::from(EXIT_INTERRUPTED))
        }
    }
}

/// Waits for a created sandbox to run, prints its output and ends with its exit code.
async fn follow(client: &mut Client, mut sandbox: pb::Sandbox) -> Result<ExitCode, Status> {
    let id = sandbox.id.clone();
    let waiting_since = Instant::now();
    let mut pause = Backoff::new();
    let mut said_waiting = false;
    // Unknown: its node went silent before it was known to run or end; wait for the node
    // to come back (Running, Exited, ...) or for the grace to end (Lost).
    while matches!(
        state(&sandbox),
        SandboxState::Pending | SandboxState::Scheduled | SandboxState::Unknown
    ) {
        if !said_waiting
            && state(&sandbox) == SandboxState::Pending
            && waiting_since.elapsed() > PLACEMENT_QUIET
        {
            eprintln!("waiting for placement: {}", status(&sandbox).reason);
            said_waiting = true;
        }
        pause.sleep().await;
        sandbox = client.get(&id).await?;
    }
    let finished = if state(&sandbox) == SandboxState::Running {
        let streamed = match client.read_logs(&id, true).await {
            Ok(stream) => copy_output(stream).await,
            Err(status) => Err(status),
        };
        match streamed {
            Ok(()) => poll_until_terminal(client, &id, Some(EXIT_REPORT_WAIT)).await?,
            Err(status) => {
                eprintln!(
                    "berth sandbox: cannot stream the output of {id}: {}; waiting for it to end",
                    status.message()
                );
                poll_until_terminal(client, &id, None).await?
            }
        }
    } else {
        // It ended before its output could be followed: print what was captured, if it
        // ever reached a node.
        if !status(&sandbox).node_id.is_empty() {
            let copied = match client.read_logs(&id, false).await {
                Ok(stream) => copy_output(stream).await,
                Err(status) => Err(status),
            };
            if let Err(status) = copied {
                eprintln!(
                    "berth sandbox: cannot read the output of {id}: {}",
                    status.message()
                );
            }
        }
        Some(sandbox)
    };
    let Some(sandbox) = finished else {
        eprintln!(
            "berth sandbox: {id} has not reported its end {} s after its output ended; \
             see berth sandbox get {id}",
            EXIT_REPORT_WAIT.as_secs()
        );
        return Ok(ExitCode::from(EXIT_FAILURE));
    };
    let (code, message) = exit_code(&sandbox).unwrap_or((EXIT_FAILURE, None));
    if let Some(message) = message {
        eprintln!("{message}");
    }
    Ok(ExitCode::from(code))
}

/// Polls until the sandbox is terminal; `None` when `limit` passes first.
async fn poll_until_terminal(
    client: &mut Client,
    id: &str,
    limit: Option<Duration>,
) -> Result<Option<pb::Sandbox>, Status> {
    let started = Instant::now();
    let mut pause = Backoff::new();
    loop {
        let sandbox = client.get(id).await?;
        if exit_code(&sandbox).is_some() {
            return Ok(Some(sandbox));
        }
        if limit.is_some_and(|limit| started.elapsed() >= limit) {
            return Ok(None);
        }
        pause.sleep().await;
    }
}

/// The exit code `create` ends with for a terminal sandbox, and what it prints on stderr:
/// an exited sandbox's own code taken modulo 256 as a shell does, 1 for failed and lost
/// ones. `None` while the sandbox is not terminal.
fn exit_code(sandbox: &pb::Sandbox) -> Option<(u8, Option<String>)> {
    let status = status(sandbox);
    let id = &sandbox.id;
    match state(sandbox) {
        SandboxState::Exited => Some(((status.exit_code & 0xff) as u8, None)),
        SandboxState::Failed => Some((
            EXIT_FAILURE,
            Some(format!("sandbox {id} failed: {}", status.reason)),
        )),
        SandboxState::Lost => Some((
            EXIT_FAILURE,
            Some(format!("sandbox {id} lost: {}", status.reason)),
        )),
        _ => None,
    }
}

/// Poll pauses doubling from [`POLL_FIRST`] to [`POLL_MAX`].
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: POLL_FIRST }
    }

    async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(POLL_MAX);
    }
}

/// Writes the chunks of an output stream to our stdout and stderr as they arrive.
async fn copy_output(mut stream: Streaming<pb::LogChunk>) -> Result<(), Status> {
    let mut said_truncated = false;
    while let Some(chunk) = stream.message().await? {
        // A closed stdout (`| head`) must not stop the wait for the exit code.
        if chunk.stream == pb::log_chunk::Stream::Stderr as i32 {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&chunk.data);
            let _ = err.flush();
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&chunk.data);
            let _ = out.flush();
        }
        if chunk.truncated && !said_truncated {
            eprintln!("berth sandbox: output truncated at the agent's limit; the rest was dropped");
            said_truncated = true;
        }
    }
    Ok(())
}

async fn list(
    client: &mut Client,
    mut request: pb::ListSandboxesRequest,
    json: bool,
) -> Result<(), Status> {
    let mut sandboxes: Vec<pb::Sandbox> = Vec::new();
    let mut capped = false;
    loop {
        let page = client.list_sandboxes(request.clone()).await?;
        sandboxes.extend(page.sandboxes);
        if sandboxes.len() >= LIST_ROWS_MAX {
            capped = sandboxes.len() > LIST_ROWS_MAX || !page.next_page_token.is_empty();
            sandboxes.truncate(LIST_ROWS_MAX);
            break;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    if json {
        let all: Vec<serde_json::Value> = sandboxes.iter().map(sandbox_json).collect();
        emit(&format!("{}\n", serde_json::Value::Array(all)));
    } else {
        let now = now_unix_ms();
        let mut table = Table::new(&["ID", "STATE", "NODE", "GPUS", "AGE/EXIT"]);
        for s in &sandboxes {
            let st = status(s);
            table.row(vec![
                s.id.clone(),
                state_label(st.state),
                dash(&st.node_id),
                gpus_summary(s),
                age_or_exit(s, now),
            ]);
        }
        emit(&table.to_string());
    }
    if capped {
        eprintln!(
            "berth sandbox: showing the first {LIST_ROWS_MAX} sandboxes; narrow the list with \
             --tenant, --state or --node"
        );
    }
    Ok(())
}

/// `get` as `key: value` lines.
fn describe(sandbox: &pb::Sandbox, now_ms: u64) -> String {
    let st = status(sandbox);
    let spec = sandbox.spec.clone().unwrap_or_default();
    let exited = state(sandbox) == SandboxState::Exited;
    let time = |ms: u64| {
        if ms == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} ({} ago)",
                format_unix_ms(ms),
                format_age(now_ms.saturating_sub(ms))
            )
        }
    };
    let lines = [
        ("id", sandbox.id.clone()),
        ("state", state_label(st.state)),
        ("tenant", dash(&spec.tenant)),
        ("node", dash(&st.node_id)),
        ("gpus", gpus_summary(sandbox)),
        ("gpu model", dash(&st.gpu_model)),
        ("gpu uuids", dash(&st.gpu_uuids.join(","))),
        (
            "exit code",
            if exited {
                st.exit_code.to_string()
            } else {
                "-".to_owned()
            },
        ),
        ("reason", dash(&st.reason)),
        ("created", time(st.created_unix_ms)),
        ("started", time(st.started_unix_ms)),
        ("finished", time(st.finished_unix_ms)),
        ("command", dash(&shell_words(&spec.command))),
    ];
    lines
        .iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect()
}

fn state(sandbox: &pb::Sandbox) -> SandboxState {
    SandboxState::try_from(status(sandbox).state).unwrap_or(SandboxState::Unspecified)
}

fn status(sandbox: &pb::Sandbox) -> &pb::SandboxStatus {
    static EMPTY: LazyLock<pb::SandboxStatus> = LazyLock::new(Default::default);
    sandbox.status.as_ref().unwrap_or(&EMPTY)
}

/// `running` for `SANDBOX_STATE_RUNNING`.
fn state_label(raw: i32) -> String {
    enum_label(raw, SandboxState::as_str_name, "SANDBOX_STATE_")
}

fn parse_state(text: &str) -> Result<SandboxState, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SANDBOX_STATE_") {
        upper
    } else {
        format!("SANDBOX_STATE_{upper}")
    };
    SandboxState::from_str_name(&name)
        .filter(|s| *s != SandboxState::Unspecified)
        .ok_or_else(|| {
            format!(
                "{text:?} is not a state: pending, scheduled, running, unknown, exited, failed \
                 or lost"
            )
        })
}

/// GPUs bound to a sandbox (`2×H100`, `500m×T4`), what it asks for while unbound
/// (`H100:2`), or `-`.
fn gpus_summary(sandbox: &pb::Sandbox) -> String {
    let st = status(sandbox);
    let count = st.gpu_indices.len().max(st.gpu_uuids.len());
    if count > 0 {
        let model = if st.gpu_model.is_empty() {
            "GPU"
        } else {
            &st.gpu_model
        };
        return match st.gpu_milli_per_gpu {
            1..=999 => format!("{}m×{model}", st.gpu_milli_per_gpu),
            _ => format!("{count}×{model}"),
        };
    }
    sandbox
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.gpu.as_ref())
        .filter(|g| !g.options.is_empty())
        .map_or_else(|| "-".to_owned(), |g| g.options.join(","))
}

/// The AGE/EXIT column: how long ago a live sandbox was created, an exited one's code, or
/// why it failed, was lost or is unknown.
fn age_or_exit(sandbox: &pb::Sandbox, now_ms: u64) -> String {
    let st = status(sandbox);
    match state(sandbox) {
        SandboxState::Exited => format!("exit {}", st.exit_code),
        SandboxState::Failed | SandboxState::Lost | SandboxState::Unknown => {
            let reason = dash(&st.reason);
            if reason.chars().count() > 60 {
                format!("{}…", reason.chars().take(59).collect::<String>())
            } else {
                reason
            }
        }
        _ => format_age(now_ms.saturating_sub(st.created_unix_ms)),
    }
}

fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// argv as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A span of milliseconds in its largest whole unit: `45s`, `12m`, `3h`, `2d`.
fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Unix milliseconds as RFC 3339 UTC, `2026-04-14T09:30:00.123Z`.
fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Days to a civil date (Howard Hinnant's algorithm), in unsigned arithmetic: times
    // here are never before 1970.
    let z = secs / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        ms % 1000
    )
}

// ---- flag parsers ----

fn parse_gpu_option(text: &str) -> Result<String, String> {
    GpuOption::parse(text)
        .map(|_| text.trim().to_owned())
        .map_err(|e| e.to_string())
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// CPU in cores (`0.5`, `2`) or milli-cores (`250m`) → milli-cores: the quantity grammar
/// of config files, and more than zero.
fn parse_cpu_milli(text: &str) -> Result<u64, String> {
    match berth_proto::resources::parse_cpu_milli(text) {
        Ok(0) => Err("the CPU amount must be more than 0".into()),
        other => other.map_err(|e| e.to_string()),
    }
}

/// Memory as `512Mi`, `2Gi`, `1.5GiB` or a plain number of MiB → MiB: the quantity grammar
/// of config files (decimal units such as `1G` are refused, not guessed), and more than zero.
fn parse_memory_mib(text: &str) -> Result<u64, String> {
    match berth_proto::resources::parse_memory_mib(text) {
        Ok(0) => Err("the memory size must be more than 0".into()),
        other => other.map_err(|e| e.to_string()),
    }
}

// ---- JSON ----

/// A sandbox as JSON, enum values as lowercase names.
fn sandbox_json(sandbox: &pb::Sandbox) -> serde_json::Value {
    serde_json::json!({
        "id": sandbox.id,
        "request_id": sandbox.request_id,
        "revision": sandbox.revision,
        "spec": sandbox.spec.as_ref().map(spec_json),
        "status": sandbox.status.as_ref().map(status_json),
    })
}

fn spec_json(spec: &pb::SandboxSpec) -> serde_json::Value {
    let resources = spec.resources.clone().unwrap_or_default();
    let constraints = spec.constraints.clone().unwrap_or_default();
    serde_json::json!({
        "tenant": spec.tenant,
        "image": spec.image,
        "command": spec.command,
        "env": spec.env,
        "resources": {
            "cpu_milli": resources.cpu_milli,
            "memory_mib": resources.memory_mib,
            "gpu": resources.gpu.map(|g| serde_json::json!({
                "options": g.options,
                "min_memory_mib": g.min_memory_mib,
            })),
        },
        "constraints": {
            "providers": constraints.providers,
            "regions": constraints.regions,
            "node_labels": constraints.node_labels,
            "tolerations": constraints.tolerations.iter().map(|t| serde_json::json!({
                "key": t.key, "value": t.value,
            })).collect::<Vec<_>>(),
            "capacity_type": enum_label(
                constraints.capacity_type,
                pb::CapacityType::as_str_name,
                "CAPACITY_TYPE_"
            ),
        },
        "priority": spec.priority,
        "timeout_ms": spec.timeout_ms,
        "network": spec.network,
        "labels": spec.labels,
    })
}

fn status_json(status: &pb::SandboxStatus) -> serde_json::Value {
    serde_json::json!({
        "state": state_label(status.state),
        "node_id": status.node_id,
        "gpu_indices": status.gpu_indices,
        "gpu_uuids": status.gpu_uuids,
        "gpu_milli_per_gpu": status.gpu_milli_per_gpu,
        "gpu_model": status.gpu_model,
        "exit_code": status.exit_code,
        "reason": status.reason,
        "created_unix_ms": status.created_unix_ms,
        "scheduled_unix_ms": status.scheduled_unix_ms,
        "started_unix_ms": status.started_unix_ms,
        "finished_unix_ms": status.finished_unix_ms,
        "explanation": status.explanation.as_ref().map(explanation_json),
    })
}

fn explanation_json(e: &pb::PlacementExplanation) -> serde_json::Value {
    serde_json::json!({
        "nodes_evaluated": e.nodes_evaluated,
        "filtered": e.filtered.iter().map(|f| serde_json::json!({
            "reason": f.reason, "nodes": f.nodes,
        })).collect::<Vec<_>>(),
        "top_scores": e.top_scores.iter().map(|s| serde_json::json!({
            "node_id": s.node_id, "components": s.components, "total": s.total,
        })).collect::<Vec<_>>(),
        "summary": e.summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(state: SandboxState, exit_code: i32, reason: &str) -> pb::Sandbox {
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

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512Mi"), Ok(512));
        assert_eq!(parse_memory_mib("2Gi"), Ok(2048));
        assert_eq!(parse_memory_mib("1.5Gi"), Ok(1536));
        assert_eq!(parse_memory_mib("300"), Ok(300));
        assert_eq!(parse_memory_mib("1Ti"), Ok(1 << 20));
        // Decimal units are refused, as in config files, rather than rounded.
        let err = parse_memory_mib("1G").expect_err("decimal unit");
        assert!(err.contains("use MiB, GiB or TiB"), "{err}");
        for bad in [
            "", "0", "0Gi", "Gi", "2g", "1.2.3Gi", "-1Gi", "12XB", "1e3", "1Ki",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_memory_mib("99999999999999999999999999Ti").is_err());
    }

    #[test]
    fn cpu_amounts() {
        assert_eq!(parse_cpu_milli("1"), Ok(1000));
        assert_eq!(parse_cpu_milli("0.5"), Ok(500));
        assert_eq!(parse_cpu_milli(".25"), Ok(250));
        assert_eq!(parse_cpu_milli("2.125"), Ok(2125));
        assert_eq!(parse_cpu_milli("250m"), Ok(250));
        for bad in ["", "0", "0.0", "0.0001", "1.5m", "-1", "one", "1,5", "."] {
            assert!(parse_cpu_milli(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exit_codes_follow_the_sandbox() {
        assert_eq!(
            exit_code(&sandbox(SandboxState::Exited, 0, "")),
            Some((0, None))
        );
        assert_eq!(
            exit_code(&sandbox(SandboxState::Exited, 3, "")),
            Some((3, None))
        );
        // Modulo 256, as a shell reports it.
        assert_eq!(
            exit_code(&sandbox(SandboxState::Exited, 256, "")),
            Some((0, None))
        );
        assert_eq!(
            exit_code(&sandbox(SandboxState::Exited, 257, "")),
            Some((1, None))
        );
        assert_eq!(
            exit_code(&sandbox(SandboxState::Exited, -1, "")),
            Some((255, None))
        );
        assert_eq!(
            exit_code(&sandbox(SandboxState::Failed, 0, "timed out")),
            Some((1, Some("sandbox 42 failed: timed out".into())))
        );
        assert_eq!(
            exit_code(&sandbox(SandboxState::Lost, 0, "node n1 is down")),
            Some((1, Some("sandbox 42 lost: node n1 is down".into())))
        );
        for live in [
            SandboxState::Pending,
            SandboxState::Scheduled,
            SandboxState::Running,
            SandboxState::Unknown,
        ] {
            assert_eq!(exit_code(&sandbox(live, 0, "")), None);
        }
    }

    #[test]
    fn states_by_name() {
        assert_eq!(parse_state("running"), Ok(SandboxState::Running));
        assert_eq!(parse_state("EXITED"), Ok(SandboxState::Exited));
        assert_eq!(parse_state("sandbox_state_lost"), Ok(SandboxState::Lost));
        assert_eq!(parse_state("unknown"), Ok(SandboxState::Unknown));
        assert_eq!(state_label(SandboxState::Unknown as i32), "unknown");
        let unknown = sandbox(SandboxState::Unknown, 0, "node n1 is down (no heartbeat)");
        assert_eq!(sandbox_json(&unknown)["status"]["state"], "unknown");
        assert_eq!(age_or_exit(&unknown, 0), "node n1 is down (no heartbeat)");
        assert!(describe(&unknown, 0).contains("state: unknown\n"));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").is_err());
        assert_eq!(state_label(SandboxState::Pending as i32), "pending");
        let json = sandbox_json(&sandbox(SandboxState::Running, 0, ""));
        assert_eq!(json["status"]["state"], "running");
    }

    #[test]
    fn gpu_column_and_describe() {
        let mut s = sandbox(SandboxState::Running, 0, "");
        assert_eq!(gpus_summary(&s), "-");
        s.spec = Some(pb::SandboxSpec {
            command: vec!["python".into(), "-c".into(), "print('hi')".into()],
            resources: Some(pb::Resources {
                gpu: Some(pb::GpuRequest {
                    options: vec!["H100:2".into()],
                    min_memory_mib: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(gpus_summary(&s), "H100:2");
        if let Some(st) = s.status.as_mut() {
            st.gpu_indices = vec![0, 1];
            st.gpu_model = "H100".into();
            st.gpu_milli_per_gpu = 1000;
            st.created_unix_ms = 1_776_159_000_000;
        }
        assert_eq!(gpus_summary(&s), "2×H100");
        let text = describe(&s, 1_776_159_090_000);
        assert!(text.contains("state: running\n"), "{text}");
        assert!(
            text.contains("created: 2026-04-14T09:30:00.000Z (1m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("command: python -c 'print('\\''hi'\\'')'\n"),
            "{text}"
        );
        assert!(text.contains("exit code: -\n"), "{text}");
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_776_159_000_123),
            "2026-04-14T09:30:00.123Z"
        );
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(3_600_000), "1h");
    }
}
