//! `berth bench resume`: pause and resume latency on `berth dev` (gVisor, started here as a
//! child on one node, pulling a busybox image from a local `docker-registry`), by sandbox
//! memory: the sandbox writes that many random bytes into its `/tmp` (gVisor memory), then
//! it is paused to disk and resumed through the API, each time from
//! the call to the state the node reports (PAUSED, RUNNING). Beside it, in the same run,
//! a bare runsc container of the same size ([`super::bench_resume_bare`]): `runsc
//! checkpoint`/`restore`, and the standby baselines `runsc pause`/`resume` and the cgroup
//! freezer, beside berth's standby tier (frozen in place through the freezer, thawed by a
//! resume: from the call to RUNNING).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use super::bench_dev::{BenchDev, NODE, until};
use super::bench_exec::{Latency, latency};

/// Arguments of `berth bench resume`.
#[derive(Debug, Args)]
pub(crate) struct ResumeArgs {
    /// Sandbox memory sizes to measure, MiB (the first is the target's).
    #[arg(long, value_delimiter = ',', default_values_t = [16u64, 256])]
    sizes_mib: Vec<u64>,
    /// Pause/resume cycles per size through berth.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    count: u32,
    /// Standby cycles through berth, and of the bare container (pause/resume, freezer).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    standby_count: u32,
    /// First of the ports the dev cluster uses (gRPC +0..3, metrics +10..13, agents +20).
    #[arg(long, default_value_t = 17_270)]
    base_port: u16,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct SizeReport {
    memory_mib: u64,
    berth_pause: Latency,
    berth_resume: Latency,
    /// From the standby call until the agent has frozen it.
    berth_standby: Latency,
    /// From the resume call until RUNNING, thawed in place.
    berth_standby_resume: Latency,
    bare_runsc_checkpoint: Latency,
    bare_runsc_restore: Latency,
    bare_runsc_pause: Latency,
    bare_runsc_resume: Latency,
    /// Absent when the cgroup v1 freezer is not available.
    bare_freezer_freeze: Option<Latency>,
    bare_freezer_thaw: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct ResumeReport {
    sizes: Vec<SizeReport>,
    target_checkpoint_resume_p50_ms: f64,
    target_standby_resume_p50_ms: f64,
}

pub(crate) fn run(args: &ResumeArgs) -> ExitCode {
    match super::block_on("bench resume", bench(args)) {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                print(&r);
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn print(r: &ResumeReport) {
    for s in &r.sizes {
        println!("{} MiB sandbox (p50 / p99 / max, ms):", s.memory_mib);
        let mut rows = vec![
            ("berth pause (to PAUSED)", &s.berth_pause),
            ("berth resume (to RUNNING)", &s.berth_resume),
            ("berth standby (to frozen)", &s.berth_standby),
            ("berth standby resume", &s.berth_standby_resume),
            ("bare runsc checkpoint", &s.bare_runsc_checkpoint),
            ("bare runsc restore", &s.bare_runsc_restore),
            ("bare runsc pause", &s.bare_runsc_pause),
            ("bare runsc resume", &s.bare_runsc_resume),
        ];
        if let (Some(f), Some(t)) = (&s.bare_freezer_freeze, &s.bare_freezer_thaw) {
            rows.push(("bare freezer freeze", f));
            rows.push(("bare freezer thaw", t));
        }
        for (name, l) in rows {
            println!(
                "  {name:<27} {:>8.1} {:>8.1} {:>8.1}   ({} calls)",
                l.p50_ms, l.p99_ms, l.max_ms, l.calls
            );
        }
    }
    println!(
        "targets: resume from a checkpoint of about 16 MiB p50 <= {} ms; from standby p50 <= {} ms \
         (the bare rows are the floor of each)",
        r.target_checkpoint_resume_p50_ms, r.target_standby_resume_p50_ms
    );
}

/// Runs a shell script in sandbox `id`, to a zero exit.
async fn exec(client: &mut Client, id: &str, script: &str) -> Result<(), String> {
    let command = vec!["/bin/sh".into(), "-c".into(), script.to_owned()];
    super::bench_exec::exec_to_exit(client, id, command).await
}

/// A running keep-alive sandbox of `image` holding `mib` MiB of random bytes in its memory.
async fn filled_sandbox(client: &mut Client, image: &str, mib: u64) -> Result<String, String> {
    let spec = pb::SandboxSpec {
        tenant: "bench".into(),
        image: image.to_owned(),
        keep_alive: true,
        resources: Some(pb::Resources {
            cpu_milli: 1000,
            memory_mib: mib + 256,
            gpu: None,
        }),
        ..Default::default()
    };
    let created = client
        .create(&format!("bench-resume-{mib}"), spec)
        .await
        .map_err(|s| format!("create: {}", s.message()))?;
    let id = created.sandbox.map(|s| s.id).unwrap_or_default();
    until(client, &id, pb::SandboxState::Running, Instant::now()).await?;
    // gVisor's /tmp is memory.
    exec(
        client,
        &id,
        &format!("head -c {mib}m /dev/urandom > /tmp/blob"),
    )
    .await?;
    Ok(id)
}

async fn bench(args: &ResumeArgs) -> Result<ResumeReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let bench = BenchDev::start(dir.path(), args.base_port, "berth-bench-resume", &[]).await?;
    let (image, mut client) = (bench.image.clone(), bench.client.clone());
    let mut sizes = Vec::new();
    for &mib in &args.sizes_mib {
        let id = filled_sandbox(&mut client, &image, mib).await?;
        let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
        for _ in 0..args.count {
            let t = Instant::now();
            client
                .pause(&id, false)
                .await
                .map_err(|s| s.message().to_owned())?;
            pauses.push(until(&mut client, &id, pb::SandboxState::Paused, t).await?);
            let t = Instant::now();
            client
                .resume(&id)
                .await
                .map_err(|s| s.message().to_owned())?;
            resumes.push(until(&mut client, &id, pb::SandboxState::Running, t).await?);
        }
        let frozen = dir
            .path()
            .join("dev/agents")
            .join(NODE)
            .join("sandboxes")
            .join(&id)
            .join("standby");
        let (mut freezes, mut thaws) = (Vec::new(), Vec::new());
        for _ in 0..args.standby_count {
            let t = Instant::now();
            client
                .pause(&id, true)
                .await
                .map_err(|s| s.message().to_owned())?;
            while !frozen.exists() {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err(format!("{id} was not frozen in 30 s"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            freezes.push(t.elapsed());
            let t = Instant::now();
            client
                .resume(&id)
                .await
                .map_err(|s| s.message().to_owned())?;
            thaws.push(until(&mut client, &id, pb::SandboxState::Running, t).await?);
        }
        exec(&mut client, &id, "test -s /tmp/blob").await?;
        let _ = client.delete(&id).await;
        let bare_dir = dir.path().join(format!("bare-{mib}"));
        let (standby, count) = (args.standby_count, args.count);
        let bare = tokio::task::spawn_blocking(move || {
            super::bench_resume_bare::measure(&bare_dir, mib, standby, count)
        })
        .await
        .map_err(|e| e.to_string())??;
        let some = |v: Vec<Duration>| (!v.is_empty()).then(|| latency(v));
        sizes.push(SizeReport {
            memory_mib: mib,
            berth_pause: latency(pauses),
            berth_resume: latency(resumes),
            berth_standby: latency(freezes),
            berth_standby_resume: latency(thaws),
            bare_runsc_checkpoint: latency(bare.checkpoint),
            bare_runsc_restore: latency(bare.restore),
            bare_runsc_pause: latency(bare.runsc_pause),
            bare_runsc_resume: latency(bare.runsc_resume),
            bare_freezer_freeze: some(bare.freezer_freeze),
            bare_freezer_thaw: some(bare.freezer_thaw),
        });
    }
    Ok(ResumeReport {
        sizes,
        target_checkpoint_resume_p50_ms: 300.0,
        target_standby_resume_p50_ms: 50.0,
    })
}
