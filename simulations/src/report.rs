//! What `berth sim run` writes to `--out`: `summary.json`, `series.csv`, four SVG plots
//! (plotters) and `report.html` that shows them with the summary table.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::engine::{Run, Sample};

/// Writes every output file into `dir` (created if missing).
pub fn write(run: &Run, dir: &Path) -> Result<(), String> {
    let io = |what: &str, e: &dyn std::fmt::Display| format!("{}: {what}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(|e| io("creating", &e))?;
    let summary = summary_json(run)?;
    std::fs::write(dir.join("summary.json"), summary).map_err(|e| io("summary.json", &e))?;
    std::fs::write(dir.join("series.csv"), series_csv(run)).map_err(|e| io("series.csv", &e))?;
    let t: Vec<f64> = run.series.iter().map(|s| s.t_h).collect();
    let line = |f: fn(&Sample) -> f64| run.series.iter().map(f).collect::<Vec<f64>>();
    plot(
        &dir.join("sandboxes.svg"),
        "Sandboxes over time",
        "sandboxes",
        &t,
        &[
            ("running".to_string(), line(|s| s.running as f64)),
            ("pending".to_string(), line(|s| s.pending as f64)),
        ],
    )?;
    let nodes: Vec<(String, Vec<f64>)> = run
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            (
                g.clone(),
                run.series
                    .iter()
                    .map(|s| f64::from(s.nodes.get(i).copied().unwrap_or(0)))
                    .collect(),
            )
        })
        .collect();
    plot(
        &dir.join("nodes.svg"),
        "Nodes per group",
        "nodes",
        &t,
        &nodes,
    )?;
    plot(
        &dir.join("gpu_allocation.svg"),
        "GPU allocation",
        "allocated (%)",
        &t,
        &[("GPUs allocated".to_string(), line(|s| s.gpu_alloc_pct))],
    )?;
    plot(
        &dir.join("cost.svg"),
        "Spend rate",
        "$ per hour",
        &t,
        &[("$/hour".to_string(), line(|s| s.usd_per_hour))],
    )?;
    std::fs::write(dir.join("report.html"), html(run)?).map_err(|e| io("report.html", &e))?;
    Ok(())
}

/// `summary.json`: the same run gives the same bytes.
pub fn summary_json(run: &Run) -> Result<String, String> {
    serde_json::to_string_pretty(&run.summary)
        .map(|s| s + "\n")
        .map_err(|e| e.to_string())
}

fn series_csv(run: &Run) -> String {
    let mut out = String::from("t_h,pending,running,gpu_alloc_pct,usd_per_hour");
    for g in &run.groups {
        let _ = write!(out, ",nodes_{g}");
    }
    out.push('\n');
    for s in &run.series {
        let _ = write!(
            out,
            "{:.4},{},{},{:.2},{:.2}",
            s.t_h, s.pending, s.running, s.gpu_alloc_pct, s.usd_per_hour
        );
        for n in &s.nodes {
            let _ = write!(out, ",{n}");
        }
        out.push('\n');
    }
    out
}

/// One line chart: title, y-axis label, time in hours on x.
fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    t: &[f64],
    lines: &[(String, Vec<f64>)],
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let x_max = t.last().copied().unwrap_or(1.0).max(1e-3);
    let y_max = lines
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.05;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("simulated time (hours)")
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, values)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                t.iter().copied().zip(values.iter().copied()),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(run: &Run) -> Result<String, String> {
    let value = serde_json::to_value(&run.summary).map_err(|e| e.to_string())?;
    let mut rows = String::new();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            let shown = match v {
                serde_json::Value::Object(o) if o.is_empty() => "—".to_string(),
                serde_json::Value::Object(o) => o
                    .iter()
                    .map(|(a, b)| format!("{a}: {b}"))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                other => other.to_string(),
            };
            let _ = writeln!(rows, "<tr><th>{}</th><td>{}</td></tr>", escape(k), shown);
        }
    }
    Ok(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>berth sim: {name}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; font-weight: normal; }}
img {{ display: block; margin: 1em 0; max-width: 100%; border: 1px solid #eee; }}
</style></head>
<body>
<h1>berth sim: {name}</h1>
<p>Seed {seed}; {hours} simulated hours. Figures from <code>summary.json</code>; the time
series is in <code>series.csv</code>.</p>
<table>
{rows}</table>
<img src="sandboxes.svg" alt="running and pending sandboxes over time">
<img src="nodes.svg" alt="nodes per group over time">
<img src="gpu_allocation.svg" alt="GPU allocation over time">
<img src="cost.svg" alt="spend rate over time">
</body></html>
"#,
        name = escape(&run.summary.scenario),
        seed = run.summary.seed,
        hours = run.summary.simulated_hours,
    ))
}
