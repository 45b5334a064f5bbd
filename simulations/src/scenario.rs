//! Scenario files for `berth sim run`: how long to simulate, the workload, and the pool
//! (an `[autoscaler]` section whose providers are `sim` clouds).
//!
//! ```toml
//! [scenario]
//! name = "diurnal"
//! duration_h = 24.0
//!
//! [workload]
//! kind = "diurnal"          # poisson | diurnal | burst | openb
//! peak_concurrent = 50000   # sandboxes running at the peak (Little's law sets the rate)
//! [[workload.mix]]
//! tenant = "agents"
//! gpu = ""                  # CPU-only; or a GPU request such as "H100:1"
//! cpu_milli = 2000
//! memory_mib = 4096
//! weight = 90
//! duration_mean_s = 1800
//!
//! [autoscaler]              # the same section berth autoscaler reads
//! ...
//! ```

use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;
use serde::Deserialize;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::config::ProviderConfig;
use berth_core::model::SandboxSpec;
use berth_proto::{GpuRequest, Validator};

/// Largest scenario file read.
pub const MAX_SCENARIO_BYTES: u64 = 1 << 20;

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Run settings.
    pub scenario: Meta,
    /// What arrives.
    pub workload: Workload,
    /// The pool and its autoscaler.
    pub autoscaler: AutoscalerConfig,
}

/// Run settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Name in reports.
    pub name: String,
    /// Simulated hours.
    #[serde(default = "default_duration_h")]
    pub duration_h: f64,
    /// Seed of the workload and the clouds (`--seed` overrides it).
    #[serde(default)]
    pub seed: u64,
    /// Seconds between time-series samples.
    #[serde(default = "default_sample_s")]
    pub sample_interval_s: u64,
}

fn default_duration_h() -> f64 {
    24.0
}

fn default_sample_s() -> u64 {
    300
}

/// The shape of arrivals over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// Constant rate.
    Poisson,
    /// A daily cycle between `base_fraction` and 1 of the peak, highest at `peak_hour`.
    Diurnal,
    /// `baseline_fraction` of the peak, then a ramp to the peak at `burst_start_h` over
    /// `ramp_h`, held `hold_h`, and down again over `ramp_h`.
    Burst,
    /// The openb trace's pods with their creation and deletion times.
    Openb,
}

/// What arrives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Kind.
    pub kind: WorkloadKind,
    /// Sandboxes running at the peak (synthetic kinds).
    #[serde(default)]
    pub peak_concurrent: u64,
    /// Diurnal: the low as a fraction of the peak.
    #[serde(default = "default_base")]
    pub base_fraction: f64,
    /// Diurnal: hour of the peak.
    #[serde(default = "default_peak_hour")]
    pub peak_hour: f64,
    /// Burst: the level outside the event as a fraction of the peak.
    #[serde(default = "default_base")]
    pub baseline_fraction: f64,
    /// Burst: when the ramp up starts.
    #[serde(default)]
    pub burst_start_h: f64,
    /// Burst: ramp length.
    #[serde(default = "default_ramp")]
    pub ramp_h: f64,
    /// Burst: time at the peak.
    #[serde(default)]
    pub hold_h: f64,
    /// Synthetic kinds: sandbox shapes and their weights.
    #[serde(default)]
    pub mix: Vec<MixEntry>,
    /// Openb: the pod list CSV (relative to the scenario file).
    #[serde(default)]
    pub pods: Option<PathBuf>,
    /// Openb: trace seconds per simulated second.
    #[serde(default = "default_compression")]
    pub time_compression: f64,
}

fn default_base() -> f64 {
    0.2
}
fn default_peak_hour() -> f64 {
    14.0
}
fn default_ramp() -> f64 {
    2.0
}
fn default_compression() -> f64 {
    1.0
}

/// One sandbox shape of a synthetic mix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixEntry {
    /// Tenant.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// GPU request ("H100:1", "any:500m"); empty for CPU-only.
    #[serde(default)]
    pub gpu: String,
    /// CPU.
    pub cpu_milli: u64,
    /// Memory.
    pub memory_mib: u64,
    /// Relative weight.
    pub weight: u32,
    /// Mean run time; durations are exponential.
    pub duration_mean_s: f64,
    /// Allowed regions (empty = any).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Allowed providers (empty = any).
    #[serde(default)]
    pub providers: Vec<String>,
}

fn default_tenant() -> String {
    "default".into()
}

impl Scenario {
    /// Reads and validates a scenario file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Scenario, String> {
        let size = std::fs::metadata(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?
            .len();
        if size > MAX_SCENARIO_BYTES {
            return Err(format!(
                "{}: {size} bytes is over the {MAX_SCENARIO_BYTES}-byte limit",
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut scenario: Scenario =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(pods) = &scenario.workload.pods
            && pods.is_relative()
        {
            let base = path.parent().unwrap_or(Path::new("."));
            scenario.workload.pods = Some(base.join(pods));
        }
        scenario.validate().map_err(|e| {
            e.lines()
                .map(|line| format!("{}: {line}", path.display()))
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        Ok(scenario)
    }

    /// Every problem, with its field path.
    pub fn validate(&self) -> Result<(), String> {
        let mut v = Validator::new();
        v.nested("scenario", |v| {
            v.check(
                self.scenario.duration_h > 0.0 && self.scenario.duration_h <= 24.0 * 31.0,
                "duration_h",
                || format!("{} is outside (0, 744]", self.scenario.duration_h),
            );
            v.check(
                self.scenario.sample_interval_s >= 1,
                "sample_interval_s",
                || "must be at least 1".into(),
            );
        });
        v.nested("workload", |v| {
            let w = &self.workload;
            if w.kind == WorkloadKind::Openb {
                v.check(w.pods.is_some(), "pods", || {
                    "an openb workload needs it".into()
                });
                v.check(w.time_compression > 0.0, "time_compression", || {
                    "must be > 0".into()
                });
            } else {
                v.check(
                    (1..=10_000_000).contains(&w.peak_concurrent),
                    "peak_concurrent",
                    || format!("{} is outside 1..=10000000", w.peak_concurrent),
                );
                v.check(!w.mix.is_empty(), "mix", || {
                    "needs at least one entry".into()
                });
            }
            for (i, m) in w.mix.iter().enumerate() {
                v.nested(format!("mix[{i}]"), |v| {
                    if !m.gpu.is_empty()
                        && let Err(e) = GpuRequest::parse(&[m.gpu.as_str()], None)
                    {
                        v.error("gpu", e.to_string());
                    }
                    v.check(m.duration_mean_s > 0.0, "duration_mean_s", || {
                        "must be > 0".into()
                    });
                    v.check(m.cpu_milli >= 1, "cpu_milli", || {
                        "must be at least 1".into()
                    });
                });
            }
        });
        v.nested("autoscaler", |v| {
            self.autoscaler.validate_policy(v);
            for (name, provider) in &self.autoscaler.providers {
                v.check(
                    matches!(provider, ProviderConfig::Sim(_)),
                    &format!("providers.{name}.kind"),
                    || "the simulator drives only kind = \"sim\" providers".into(),
                );
            }
        });
        v.finish().map_err(|e| e.to_string())
    }
}

/// A synthetic workload's arrivals: (arrival ms, duration ms, mix index), in time order.
pub fn arrivals(workload: &Workload, duration_ms: u64, seed: u64) -> Vec<(u64, u64, usize)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xa771_7a15);
    let total_weight: f64 = workload.mix.iter().map(|m| f64::from(m.weight)).sum();
    if total_weight <= 0.0 {
        return Vec::new();
    }
    let mean_s: f64 = workload
        .mix
        .iter()
        .map(|m| f64::from(m.weight) * m.duration_mean_s)
        .sum::<f64>()
        / total_weight;
    // Little's law: peak rate = peak concurrency / mean duration. Thinning draws candidates
    // at the peak rate and keeps each with the intensity at its time.
    let peak_rate_per_ms = workload.peak_concurrent as f64 / (mean_s * 1000.0);
    let mut out = Vec::new();
    let mut t = 0.0f64;
    loop {
        t += exponential(&mut rng, 1.0 / peak_rate_per_ms);
        if t >= duration_ms as f64 {
            break;
        }
        if uniform(&mut rng) > intensity(workload, t / 3_600_000.0) {
            continue;
        }
        let mut pick = uniform(&mut rng) * total_weight;
        let mut index = workload.mix.len() - 1;
        for (i, m) in workload.mix.iter().enumerate() {
            pick -= f64::from(m.weight);
            if pick < 0.0 {
                index = i;
                break;
            }
        }
        let duration = exponential(&mut rng, workload.mix[index].duration_mean_s * 1000.0);
        out.push((t as u64, (duration as u64).max(1), index));
    }
    out
}

/// The arrival intensity (0..=1 of the peak) at hour `h`.
pub fn intensity(w: &Workload, h: f64) -> f64 {
    match w.kind {
        WorkloadKind::Poisson | WorkloadKind::Openb => 1.0,
        WorkloadKind::Diurnal => {
            let phase = std::f64::consts::TAU * (h - w.peak_hour) / 24.0;
            w.base_fraction + (1.0 - w.base_fraction) * (1.0 + phase.cos()) / 2.0
        }
        WorkloadKind::Burst => {
            let base = w.baseline_fraction;
            let up = w.burst_start_h;
            let top = up + w.ramp_h;
            let down = top + w.hold_h;
            let end = down + w.ramp_h;
            let ramp = |x: f64| base + (1.0 - base) * x.clamp(0.0, 1.0);
            if h < up || h >= end {
                base
            } else if h < top {
                ramp((h - up) / w.ramp_h.max(1e-9))
            } else if h < down {
                1.0
            } else {
                ramp((end - h) / w.ramp_h.max(1e-9))
            }
        }
    }
}

/// The spec of a mix entry.
pub fn mix_spec(m: &MixEntry) -> SandboxSpec {
    let gpu = (!m.gpu.is_empty())
        .then(|| GpuRequest::parse(&[m.gpu.as_str()], None).ok())
        .flatten();
    let mut spec = SandboxSpec::resources(&m.tenant, m.cpu_milli, m.memory_mib, gpu);
    spec.constraints.regions.clone_from(&m.regions);
    spec.constraints.providers.clone_from(&m.providers);
    spec
}

fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - uniform(rng)).ln()
}

use rand_chacha::rand_core::SeedableRng;

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(kind: WorkloadKind) -> Workload {
        Workload {
            kind,
            peak_concurrent: 1_000,
            base_fraction: 0.2,
            peak_hour: 14.0,
            baseline_fraction: 0.1,
            burst_start_h: 10.0,
            ramp_h: 2.0,
            hold_h: 4.0,
            mix: vec![MixEntry {
                tenant: "t".into(),
                gpu: String::new(),
                cpu_milli: 1_000,
                memory_mib: 1_024,
                weight: 1,
                duration_mean_s: 600.0,
                regions: Vec::new(),
                providers: Vec::new(),
            }],
            pods: None,
            time_compression: 1.0,
        }
    }

    #[test]
    fn shapes_of_intensity() {
        let d = workload(WorkloadKind::Diurnal);
        assert!((intensity(&d, 14.0) - 1.0).abs() < 1e-9);
        assert!((intensity(&d, 2.0) - 0.2).abs() < 1e-9);
        let b = workload(WorkloadKind::Burst);
        assert!((intensity(&b, 5.0) - 0.1).abs() < 1e-9);
        assert!((intensity(&b, 11.0) - 0.55).abs() < 1e-9);
        assert!((intensity(&b, 13.0) - 1.0).abs() < 1e-9);
        assert!((intensity(&b, 20.0) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn poisson_arrivals_follow_littles_law_and_replay() {
        let w = workload(WorkloadKind::Poisson);
        let a = arrivals(&w, 3_600_000, 5);
        // 1,000 concurrent at 600 s mean: 1.67 arrivals/s, about 6,000 in an hour.
        assert!((5_500..6_500).contains(&a.len()), "{}", a.len());
        assert_eq!(a, arrivals(&w, 3_600_000, 5));
        assert_ne!(a, arrivals(&w, 3_600_000, 6));
        assert!(a.windows(2).all(|p| p[0].0 <= p[1].0));
    }
}
