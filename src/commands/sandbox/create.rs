//! `berth sandbox create`: create a sandbox, wait for a node, stream its output, and exit
//! with its exit code.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tonic::{Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::SandboxState;
use berth_scheduler::service::client::Client;

use super::emit;
use super::show::sandbox_json;
use super::show::{state, status};
use super::{CreateArgs, NetworkMode, ShapeArgs};
use crate::exit::EXIT_FAILURE;

/// First and longest pause between polls of a sandbox's state.
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(500);
/// How long a sandbox may stay pending before `create` says what it is waiting for.
const PLACEMENT_QUIET: Duration = Duration::from_secs(2);
/// How long after its output ended a sandbox may take to be reported terminal.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(10);
/// Exit code after Ctrl-C (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;

/// The spec `create` asks for; an error names the flag at fault.
pub(super) fn spec(args: &CreateArgs) -> Result<pb::SandboxSpec, String> {
    let mut spec = shape_spec(&args.shape)?;
    spec.command = args.command.clone();
    spec.env = args.env.iter().cloned().collect();
    spec.labels = args.labels.iter().cloned().collect();
    spec.keep_alive = args.keep_alive;
    spec.auto_pause_idle_ms = args.auto_pause.map_or(0, millis);
    spec.auto_resume = args.auto_resume;
    Ok(spec)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The spec of a sandbox of this shape, running nothing yet; an error names the flag at
/// fault.
pub(crate) fn shape_spec(args: &ShapeArgs) -> Result<pb::SandboxSpec, String> {
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
        timeout_ms: args.timeout.map_or(0, millis),
        network: Some(network_policy(args)),
        idle_timeout_ms: args.idle_timeout.map_or(0, millis),
        ..Default::default()
    })
}

/// `--network` and `--allow` as the spec's policy.
fn network_policy(args: &ShapeArgs) -> pb::NetworkPolicy {
    use pb::NetworkMode as Mode;
    let mode = match (args.network, args.allow.is_empty()) {
        (_, false) => Mode::EgressAllow,
        (Some(NetworkMode::EgressAll), true) => Mode::EgressAll,
        (Some(NetworkMode::None) | None, true) => Mode::None,
    };
    pb::NetworkPolicy {
        mode: mode as i32,
        allow: args.allow.clone(),
    }
}

/// A request id no other `berth sandbox create` is likely to use: the time in nanoseconds
/// and the process id.
pub(super) fn request_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cli-{nanos:x}-{:x}", std::process::id())
}

pub(super) async fn create(
    client: &mut Client,
    spec: pb::SandboxSpec,
    detach: bool,
    json: bool,
) -> Result<ExitCode, Status> {
    let response = client.create(&request_id(), spec).await?;
    let from_pool = response.from_pool;
    let sandbox = response
        .sandbox
        .ok_or_else(|| Status::internal("the scheduler answered without the sandbox"))?;
    if !from_pool.is_empty() && !json {
        let created = sandbox.status.as_ref().map_or(0, |s| s.created_unix_ms);
        eprintln!(
            "sandbox {} from warm pool {from_pool} (created {})",
            sandbox.id,
            super::show::format_unix_ms(created)
        );
    }
    if detach {
        if json {
            let mut value = sandbox_json(&sandbox);
            value["from_pool"] = serde_json::Value::String(from_pool);
            emit(&format!("{value}\n"));
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
pub(super) async fn follow(
    client: &mut Client,
    mut sandbox: pb::Sandbox,
) -> Result<ExitCode, Status> {
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
pub(super) async fn poll_until_terminal(
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
pub(super) fn exit_code(sandbox: &pb::Sandbox) -> Option<(u8, Option<String>)> {
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
pub(super) struct Backoff {
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
pub(super) async fn copy_output(mut stream: Streaming<pb::LogChunk>) -> Result<(), Status> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::sandbox::test_sandbox as sandbox;

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
}
