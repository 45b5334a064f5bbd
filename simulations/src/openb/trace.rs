//! Reading the openb CSVs (Alibaba `cluster-trace-gpu-v2023`) into berth's domain types.
//!
//! Node list: `sn, cpu_milli, memory_mib, gpu, model`. Pod list: `name, cpu_milli,
//! memory_mib, num_gpu, gpu_milli[, gpu_spec, qos, pod_phase, creation_time, deletion_time,
//! scheduled_time]`. GPU models are the trace's own codes (`G2`, `V100M16`, `T4`); names the
//! catalog knows (`T4`, `A10`) resolve to catalog models on both sides, the rest are kept
//! verbatim, so a pod's `gpu_spec` matches exactly the nodes the trace meant.

use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

use berth_core::model::{NodeSpec, SandboxSpec};
use berth_proto::GpuModelName;
use berth_proto::gpu::{GpuAmount, GpuOption, GpuRequest};

/// Most rows read from one file (the published traces have under 10,000).
const MAX_ROWS: usize = 1_000_000;

/// A trace file that cannot be used; says which file, row and column.
#[derive(Debug, Error)]
pub enum TraceError {
    /// Unreadable or not CSV.
    #[error("{path}: {source}")]
    Csv {
        /// File.
        path: String,
        /// Cause.
        source: csv::Error,
    },
    /// A row breaks a rule of the format.
    #[error("{path}: row {row}: {message}")]
    Row {
        /// File.
        path: String,
        /// 1-based data row.
        row: usize,
        /// What is wrong.
        message: String,
    },
    /// Too many rows.
    #[error("{path}: more than {MAX_ROWS} rows")]
    TooLarge {
        /// File.
        path: String,
    },
}

#[derive(Debug, Deserialize)]
struct NodeRow {
    sn: String,
    cpu_milli: u64,
    memory_mib: u64,
    gpu: u32,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PodRow {
    name: String,
    cpu_milli: u64,
    memory_mib: u64,
    num_gpu: u32,
    gpu_milli: u32,
    #[serde(default)]
    gpu_spec: Option<String>,
    #[serde(default)]
    creation_time: u64,
    #[serde(default)]
    deletion_time: u64,
}

/// A pod of the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TracePod {
    /// `openb-pod-0000`.
    pub name: String,
    /// As a sandbox spec (tenant `openb`).
    pub spec: SandboxSpec,
    /// Creation time in the trace, seconds.
    pub created_s: u64,
    /// Deletion time in the trace, seconds (at or after creation).
    pub deleted_s: u64,
}

impl TracePod {
    /// Total milli-GPU requested (`num_gpu · gpu_milli`).
    pub fn gpu_milli_total(&self) -> u64 {
        self.spec.gpu_milli(0)
    }

    /// Milli per GPU (0 for CPU-only): the quantity the artifact's tuning loop compares.
    pub fn gpu_milli_per_gpu(&self) -> u64 {
        self.spec
            .gpu
            .as_ref()
            .and_then(|g| g.options.first())
            .map_or(0, |o| u64::from(o.amount.milli_per_gpu()))
    }
}

fn reader(path: &Path) -> Result<csv::Reader<std::fs::File>, TraceError> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|source| TraceError::Csv {
            path: path.display().to_string(),
            source,
        })
}

/// Reads every row of a CSV as `T` and converts it, naming the file and the 1-based row of
/// the first bad one; at most [`MAX_ROWS`] rows.
fn read_rows<T: serde::de::DeserializeOwned, U>(
    path: &Path,
    convert: impl Fn(T) -> Result<U, String>,
) -> Result<Vec<U>, TraceError> {
    let name = path.display().to_string();
    let mut out = Vec::new();
    for (i, row) in reader(path)?.deserialize::<T>().enumerate() {
        if out.len() == MAX_ROWS {
            return Err(TraceError::TooLarge { path: name });
        }
        let converted = row.map_err(|e| e.to_string()).and_then(&convert);
        out.push(converted.map_err(|message| TraceError::Row {
            path: name.clone(),
            row: i + 1,
            message,
        })?);
    }
    Ok(out)
}

/// Reads a node list. Nodes without GPUs are kept (the all-node list has them).
pub fn load_nodes(path: &Path) -> Result<Vec<NodeSpec>, TraceError> {
    read_rows(path, |row: NodeRow| {
        if row.gpu > 16 {
            return Err(format!("{} GPUs; at most 16 per node", row.gpu));
        }
        let gpus = match (row.gpu, row.model.as_deref().map(str::trim)) {
            (0, _) => Vec::new(),
            (_, None | Some("") | Some("nan")) => return Err("GPUs without a model".into()),
            (count, Some(model)) => {
                let model = GpuModelName::resolve(model);
                let memory = model.known().map_or(0, |m| m.info().memory_mib);
                NodeSpec::uniform_gpus(&row.sn, &model, memory, count)
            }
        };
        Ok(NodeSpec::simple(
            row.sn.to_ascii_lowercase(),
            row.cpu_milli,
            row.memory_mib,
            gpus,
        ))
    })
}

/// Reads a pod list, sorted by name.
pub fn load_pods(path: &Path) -> Result<Vec<TracePod>, TraceError> {
    let mut pods = read_rows(path, pod_from_row)?;
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pods)
}

fn pod_from_row(row: PodRow) -> Result<TracePod, String> {
    let amount = match (row.num_gpu, row.gpu_milli) {
        (0, _) => None,
        (_, 0) => return Err(format!("num_gpu {} with gpu_milli 0", row.num_gpu)),
        (1, milli) if milli < 1000 => Some(GpuAmount::Shared(milli)),
        (n, milli) if milli >= 1000 && n <= 16 => Some(GpuAmount::Whole(n)),
        (n, milli) => {
            return Err(format!(
                "num_gpu {n} with gpu_milli {milli}: only one GPU can be shared"
            ));
        }
    };
    let gpu = match amount {
        None => None,
        Some(amount) => {
            // The trace repeats models now and then ("V100M16|V100M32|V100M32"); the
            // artifact matches any of them, so repeats are dropped here.
            let spec_models = row
                .gpu_spec
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty() && *s != "nan");
            let mut seen = std::collections::BTreeSet::new();
            let models: Vec<&str> = spec_models
                .unwrap_or("any")
                .split('|')
                .map(str::trim)
                .filter(|m| seen.insert(*m))
                .collect();
            let option =
                GpuOption::parse(&format!("{}{}", models.join("|"), amount_suffix(amount)))
                    .map_err(|e| e.to_string())?;
            Some(GpuRequest {
                options: vec![option],
                min_memory_mib: None,
            })
        }
    };
    // The trace has pods with 0 CPU; berth requires at least 1 milli-core.
    let spec = SandboxSpec::resources("openb", row.cpu_milli.max(1), row.memory_mib.max(1), gpu);
    Ok(TracePod {
        name: row.name,
        spec,
        created_s: row.creation_time,
        deleted_s: row.deletion_time.max(row.creation_time),
    })
}

fn amount_suffix(amount: GpuAmount) -> String {
    match amount {
        GpuAmount::Whole(n) => format!(":{n}"),
        GpuAmount::Shared(m) => format!(":{m}m"),
    }
}
