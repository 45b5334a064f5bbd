//! `berth sim run SCENARIO` and `berth sim compare A B`: capacity-planning runs in virtual
//! time through the real placement engine and autoscaler policy.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;

use berth_sim::engine::{self, Run};
use berth_sim::report;
use berth_sim::scenario::Scenario;

use crate::exit::EXIT_FAILURE;

/// Arguments of `berth sim run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Scenario file (see simulations/scenarios/).
    scenario: PathBuf,
    /// Folder for summary.json, series.csv, the SVG plots and report.html
    /// [default: sim-out/NAME].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed (overrides the scenario's).
    #[arg(long)]
    seed: Option<u64>,
}

/// Arguments of `berth sim compare`.
#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// First scenario (its workload is used for both).
    a: PathBuf,
    /// Second scenario (its pool and autoscaler).
    b: PathBuf,
    /// Folder for both runs' outputs (A/ and B/) [default: sim-out/compare].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed (overrides the scenarios').
    #[arg(long)]
    seed: Option<u64>,
}

fn simulate(scenario: &Scenario, seed: u64, label: &str) -> Result<(Run, f64), String> {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = -1i64;
    let mut progress = |done: f64| {
        // A bar once the run has taken a couple of seconds; on a terminal it redraws.
        if started.elapsed().as_secs_f64() < 2.0 && done < 1.0 {
            return;
        }
        let pct = (done * 100.0) as i64;
        if pct / 5 == last / 5 && done < 1.0 {
            return;
        }
        last = pct;
        let bar = "#".repeat((pct / 5) as usize) + &".".repeat(20 - (pct / 5) as usize);
        let mut err = std::io::stderr();
        if tty {
            let _ = write!(err, "\r{label} [{bar}] {pct:3}%");
            if done >= 1.0 {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{label} [{bar}] {pct:3}%");
        }
    };
    let run = engine::run(scenario, seed, &mut progress)?;
    Ok((run, started.elapsed().as_secs_f64()))
}

fn headline(run: &Run, wall_s: f64, out: &Path) {
    let s = &run.summary;
    println!(
        "{}: {} simulated hours in {:.1} s wall ({:.0}× real time)",
        s.scenario,
        s.simulated_hours,
        wall_s,
        s.simulated_hours * 3600.0 / wall_s.max(1e-9)
    );
    println!(
        "  peak {} concurrent sandboxes, {} placed; wait p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        s.peak_concurrent_sandboxes, s.sandboxes_placed, s.wait_p50_s, s.wait_p99_s, s.wait_max_s
    );
    println!(
        "  cost ${:.0} vs lower bound ${:.0} ({:.2}×); {} stockouts, {} scale-ups, {} nodes released",
        s.cost_usd,
        s.cost_lower_bound_usd,
        s.cost_over_lower_bound,
        s.stockouts,
        s.scale_up_events,
        s.scale_down_nodes
    );
    println!("  report: {}", out.join("report.html").display());
}

pub(crate) fn run(args: &RunArgs) -> ExitCode {
    let result = (|| {
        let scenario = Scenario::load(&args.scenario)?;
        let seed = args.seed.unwrap_or(scenario.scenario.seed);
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| Path::new("sim-out").join(&scenario.scenario.name));
        let (run, wall) = simulate(&scenario, seed, &scenario.scenario.name)?;
        report::write(&run, &out)?;
        headline(&run, wall, &out);
        Ok::<(), String>(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth sim run: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

pub(crate) fn compare(args: &CompareArgs) -> ExitCode {
    let result = (|| {
        let a = Scenario::load(&args.a)?;
        let mut b = Scenario::load(&args.b)?;
        // The same workload on both pools.
        b.workload = a.workload.clone();
        b.scenario.duration_h = a.scenario.duration_h;
        let seed = args.seed.unwrap_or(a.scenario.seed);
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| Path::new("sim-out").join("compare"));
        let (ra, wa) = simulate(&a, seed, "A")?;
        let (rb, wb) = simulate(&b, seed, "B")?;
        report::write(&ra, &out.join("A"))?;
        report::write(&rb, &out.join("B"))?;
        headline(&ra, wa, &out.join("A"));
        headline(&rb, wb, &out.join("B"));
        let (sa, sb) = (&ra.summary, &rb.summary);
        println!("\n{:<28} {:>14} {:>14}", "", sa.scenario, sb.scenario);
        let rows: [(&str, f64, f64); 7] = [
            ("wait p50 (s)", sa.wait_p50_s, sb.wait_p50_s),
            ("wait p99 (s)", sa.wait_p99_s, sb.wait_p99_s),
            (
                "peak concurrent",
                sa.peak_concurrent_sandboxes as f64,
                sb.peak_concurrent_sandboxes as f64,
            ),
            ("cost ($)", sa.cost_usd, sb.cost_usd),
            (
                "cost / lower bound",
                sa.cost_over_lower_bound,
                sb.cost_over_lower_bound,
            ),
            (
                "fragmentation (%)",
                sa.fragmentation_pct,
                sb.fragmentation_pct,
            ),
            ("stockouts", sa.stockouts as f64, sb.stockouts as f64),
        ];
        for (name, x, y) in rows {
            println!("{name:<28} {x:>14.2} {y:>14.2}");
        }
        Ok::<(), String>(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth sim compare: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
