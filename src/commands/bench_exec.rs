//! `berth bench exec`: exec round trips into one long-lived sandbox on `berth dev` (gVisor,
//! started here as a child on one node), through the leader and through a follower, with
//! a bare `runsc exec` of the same program into the same sandbox measured in the same run
//! as the baseline: what the helper inside the sandbox (`berth-sandboxd`) saves.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use super::bench_burst::{spawn_dev, wait_up};

/// Arguments of `berth bench exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Exec round trips per path (leader, follower).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    count: u32,
    /// Bare `runsc exec` calls for the baseline.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    runsc_count: u32,
    /// The program each exec runs.
    #[arg(long, default_value = "true")]
    program: String,
    /// First of the ports the dev cluster uses (gRPC +0..3, metrics +10..13, agents +20).
    #[arg(long, default_value_t = 17_170)]
    base_port: u16,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Latencies of one path, in ms.
#[derive(Debug, Serialize)]
pub(super) struct Latency {
    pub(super) calls: usize,
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
}

pub(super) fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    Latency {
        calls: samples.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

#[derive(Debug, Serialize)]
struct ExecReport {
    program: String,
    through_leader: Latency,
    through_follower: Latency,
    bare_runsc_exec: Latency,
    target_p50_ms: f64,
    target_p99_ms: f64,
}

const NODE: &str = "gcp-euw4-g2-0";

pub(crate) fn run(args: &ExecArgs) -> ExitCode {
    match super::block_on("bench exec", bench(args)) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!("exec {:?} round trips (p50 / p99 / max, ms):", r.program);
                for (name, l) in [
                    ("through the leader", &r.through_leader),
                    ("through a follower", &r.through_follower),
                    ("bare runsc exec", &r.bare_runsc_exec),
                ] {
                    println!(
                        "  {name:<20} {:>7.1} {:>7.1} {:>7.1}   ({} calls)",
                        l.p50_ms, l.p99_ms, l.max_ms, l.calls
                    );
                }
                println!(
                    "  target               {:>7.1} {:>7.1}",
                    r.target_p50_ms, r.target_p99_ms
                );
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn exec_once(client: &mut Client, id: &str, program: &str) -> Result<Duration, String> {
    let started = Instant::now();
    exec_to_exit(client, id, vec![program.to_owned()]).await?;
    Ok(started.elapsed())
}

/// Runs `command` in sandbox `id` with no stdin, to its exit; an error unless it exits 0
/// (with its stderr).
pub(super) async fn exec_to_exit(
    client: &mut Client,
    id: &str,
    command: Vec<String>,
) -> Result<(), String> {
    use pb::exec_request::Message;
    let requests = vec![
        pb::ExecRequest {
            message: Some(Message::Start(pb::ExecStart {
                sandbox_id: id.to_owned(),
                command: command.clone(),
                ..Default::default()
            })),
        },
        pb::ExecRequest {
            message: Some(Message::StdinClose(true)),
        },
    ];
    let mut svc = client
        .sandbox_service()
        .map_err(|s| s.message().to_owned())?;
    let mut answers = svc
        .exec(tokio_stream::iter(requests))
        .await
        .map_err(|s| format!("exec: {}", s.message()))?
        .into_inner();
    let mut stderr = Vec::new();
    while let Some(m) = answers
        .message()
        .await
        .map_err(|s| s.message().to_owned())?
    {
        match m.message {
            Some(pb::exec_response::Message::Stderr(b)) => stderr.extend_from_slice(&b),
            Some(pb::exec_response::Message::Exit(e)) => {
                return (e.exit_code == 0).then_some(()).ok_or_else(|| {
                    format!(
                        "{command:?} exited with {}: {}",
                        e.exit_code,
                        String::from_utf8_lossy(&stderr).trim()
                    )
                });
            }
            _ => {}
        }
    }
    Err("the exec stream ended without an exit".into())
}

/// The sandbox's runsc root and container id (`<id>-<hash>`, from runsc's state file).
fn runsc_target(data: &Path, id: &str) -> Result<(PathBuf, String), String> {
    let root = data
        .join("agents")
        .join(NODE)
        .join("sandboxes")
        .join(id)
        .join("runsc");
    let entries = std::fs::read_dir(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".state") {
            let cid = stem.split("_sandbox").next().unwrap_or(stem).to_owned();
            return Ok((root, cid));
        }
    }
    Err(format!("no runsc state in {}", root.display()))
}

async fn bench(args: &ExecArgs) -> Result<ExecReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (_dev, endpoints) = spawn_dev(dir.path(), args.base_port, "gvisor", 5_000, &[NODE.into()])?;
    wait_up(&endpoints, 1, dir.path()).await?;
    let mut client = super::bench_burst::dev_client(dir.path(), endpoints.clone()).await?;
    client.deadline = Duration::from_secs(30);
    let spec = pb::SandboxSpec {
        tenant: "bench".into(),
        keep_alive: true,
        resources: Some(pb::Resources {
            cpu_milli: 1000,
            memory_mib: 512,
            gpu: None,
        }),
        ..Default::default()
    };
    let created = client
        .create("bench-exec", spec)
        .await
        .map_err(|s| format!("create: {}", s.message()))?;
    let id = created.sandbox.map(|s| s.id).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.get(&id).await.map_err(|s| s.message().to_owned())?;
        let state = s.status.map(|st| st.state).unwrap_or_default();
        if state == pb::SandboxState::Running as i32 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{id} did not start running"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = client.status().await.map_err(|s| s.message().to_owned())?;
    let leader = status
        .replicas
        .iter()
        .find(|r| r.role == "leader")
        .map(|r| r.address.clone())
        .ok_or("no leader")?;
    let follower = status
        .replicas
        .iter()
        .find(|r| r.role == "follower")
        .map(|r| r.address.clone())
        .ok_or("no follower")?;
    let mut paths = Vec::new();
    for address in [leader, follower] {
        let mut c = super::bench_burst::dev_client(dir.path(), vec![address]).await?;
        // Warm the connection and the helper's first spawn, then measure.
        exec_once(&mut c, &id, &args.program).await?;
        let mut samples = Vec::new();
        for _ in 0..args.count {
            samples.push(exec_once(&mut c, &id, &args.program).await?);
        }
        paths.push(latency(samples));
    }
    let (root, cid) = runsc_target(&dir.path().join("dev"), &id)?;
    let program = args.program.clone();
    let count = args.runsc_count;
    let bare = tokio::task::spawn_blocking(move || -> Result<Vec<Duration>, String> {
        let mut samples = Vec::new();
        for _ in 0..count {
            let started = Instant::now();
            let status = Command::new("runsc")
                .arg(format!("--root={}", root.display()))
                .args(["--platform=ptrace", "exec", &cid, &program])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .map_err(|e| format!("runsc exec: {e}"))?;
            if !status.success() {
                return Err(format!("runsc exec {cid} {program}: {status}"));
            }
            samples.push(started.elapsed());
        }
        Ok(samples)
    })
    .await
    .map_err(|e| e.to_string())??;
    let mut paths = paths.into_iter();
    Ok(ExecReport {
        program: args.program.clone(),
        through_leader: paths.next().ok_or("leader")?,
        through_follower: paths.next().ok_or("follower")?,
        bare_runsc_exec: latency(bare),
        target_p50_ms: 30.0,
        target_p99_ms: 100.0,
    })
}
