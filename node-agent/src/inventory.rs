//! The node's inventory: its GPUs (from NVML, or from a static file standing in for them),
//! its allocatable CPU and memory, and their wire form, the scheduler's `NodeInventory`.
//!
//! ```text
//!  AgentConfig.inventory ──► GpuSource::open ──► GpuSource::read (at start, then every
//!                              │                  inventory_refresh_s) ──► Inventory ──► to_pb
//!          "nvml" ─────────────┼─► driver found:  NVML devices + XidWatch   (source "nvml")
//!                              ├─► no driver:     no GPUs, one warning      (source "none")
//!   { static = PATH } ─────────┴─► the file, NVML never tried               (source "static:PATH")
//! ```
//!
//! CPU and memory are the static file's when it gives them, else the host's; the agent's
//! reservation (`reserved_cpu_milli`, `reserved_memory_mib`) is taken off either way.
//!
//! Health: an NVML GPU is unhealthy when it has uncorrected ECC errors since the driver
//! loaded, when it raised a hardware XID (sticky until the agent restarts, which an operator
//! does after resetting the GPU), or when NVML cannot answer a question about it. One bad GPU
//! never fails the whole inventory: it is reported, unhealthy, with the reason.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use berth_proto::GpuModelName;
use berth_proto::pb::v1 as pb;
use nvml_wrapper::Nvml;
#[cfg(target_os = "linux")]
use nvml_wrapper::error::NvmlError;

use crate::config::{AgentConfig, CapacityType, InventorySource, TaintEffect};
use crate::nvml::NvmlGpus;
use crate::static_inventory::{MAX_GPUS_PER_NODE, StaticInventory, StaticInventoryError};

/// Where the kernel reports the host's memory.
const MEMINFO: &str = "/proc/meminfo";

/// What the node has, as read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    /// GPUs in device-index order.
    pub gpus: Vec<pb::Gpu>,
    /// CPU left for sandboxes, in millicores (after `reserved_cpu_milli`).
    pub cpu_milli: u64,
    /// Memory left for sandboxes, in MiB (after `reserved_memory_mib`).
    pub memory_mib: u64,
    /// NVIDIA driver version ("550.54.15"); "static" for a static file, empty without GPUs.
    pub driver_version: String,
    /// CUDA version the driver supports ("12.4"); empty when unknown.
    pub cuda_version: String,
    /// Where the GPU list came from.
    pub source: InventoryOrigin,
}

/// Where a GPU list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InventoryOrigin {
    /// The NVIDIA driver, through NVML.
    Nvml,
    /// A static inventory file (the resolved path).
    Static(PathBuf),
    /// `inventory = "nvml"` on a machine without a driver: no GPUs.
    NoGpus,
}

impl InventoryOrigin {
    /// The wire form (`NodeInventory.inventory_source`): "nvml", `static:PATH` or "none".
    pub fn as_str(&self) -> String {
        match self {
            InventoryOrigin::Nvml => "nvml".into(),
            InventoryOrigin::Static(path) => format!("static:{}", path.display()),
            InventoryOrigin::NoGpus => "none".into(),
        }
    }
}

/// Why the inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The static inventory file is unreadable or wrong (the message names the file).
    #[error("static inventory: {0}")]
    Static(#[from] StaticInventoryError),
    /// NVML failed a question about the whole machine.
    #[error("NVML {query}: {source}")]
    Nvml {
        /// What was asked ("device count").
        query: &'static str,
        /// NVML's answer.
        source: NvmlError,
    },
    /// NVML reports more GPUs than a node may have.
    #[error("NVML reports {count} GPUs; the limit is {MAX_GPUS_PER_NODE} per node")]
    TooManyGpus {
        /// What NVML reported.
        count: u32,
    },
    /// The host's CPU count is unknown.
    #[error("cannot count this host's CPUs: {0}")]
    HostCpu(std::io::Error),
    /// The host's memory is unknown.
    #[error("cannot read the host's memory from {path}: {reason}")]
    HostMemory {
        /// File read.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The reservation takes everything.
    #[error("agent.{field} = {reserved} leaves nothing for sandboxes: the node has {total} {unit}")]
    NothingLeft {
        /// The config field ("reserved_cpu_milli").
        field: &'static str,
        /// Its value.
        reserved: u64,
        /// What the node has.
        total: u64,
        /// Unit of both ("millicores", "MiB").
        unit: &'static str,
    },
}

/// Reads the node's inventory once; see [`GpuSource`] to read it again later.
pub fn discover(cfg: &AgentConfig, config_dir: &Path) -> Result<Inventory, InventoryError> {
    GpuSource::open(cfg, config_dir).read()
}

/// The agent's source of inventory, opened once and read at every refresh.
///
/// It holds what must outlive one read: the NVML handle, the XID event set, the GPUs that
/// XIDs marked unhealthy, the last good answer for each GPU, and whether the source was
/// announced in the log. It is `Send + Sync`, so the agent can hold it across `.await`s.
pub struct GpuSource {
    node_id: String,
    reserved_cpu_milli: u64,
    reserved_memory_mib: u64,
    backend: Backend,
    /// The source was logged (once, at the first successful read).
    announced: bool,
}

enum Backend {
    Nvml(NvmlGpus),
    Static(PathBuf),
    NoGpus,
}

impl GpuSource {
    /// Opens the configured source. `inventory = "nvml"` and `{ nvml_or_static = PATH }`
    /// load NVML; when that fails (no driver) it logs one warning and the node reports no
    /// GPUs, or the static file's with `nvml_or_static`. `{ static = PATH }` never asks NVML.
    /// A static file is read by [`GpuSource::read`], so a broken one is reported there.
    pub fn open(cfg: &AgentConfig, config_dir: &Path) -> GpuSource {
        let file = cfg.static_inventory_path(config_dir);
        let backend = match (&cfg.inventory, file) {
            (InventorySource::Static(_), Some(path)) => Backend::Static(path),
            (_, file) => match shared_nvml() {
                Ok(nvml) => Backend::Nvml(NvmlGpus::new(nvml)),
                Err(e) => {
                    tracing::warn!(
                        node = %cfg.node_id,
                        "{}",
                        nvml_unavailable_message(&e, file.as_deref())
                    );
                    match file {
                        Some(path) => Backend::Static(path),
                        None => Backend::NoGpus,
                    }
                }
            },
        };
        GpuSource {
            node_id: cfg.node_id.clone(),
            reserved_cpu_milli: cfg.reserved_cpu_milli,
            reserved_memory_mib: cfg.reserved_memory_mib,
            backend,
            announced: false,
        }
    }

    /// Reads the inventory as it is now. A static file is re-read every time, so editing it
    /// changes what a dev-mode node reports at the next refresh.
    pub fn read(&mut self) -> Result<Inventory, InventoryError> {
        let inventory = match &mut self.backend {
            Backend::Static(path) => {
                let path = path.clone();
                let file = StaticInventory::load(&path)?;
                let (cpu_milli, memory_mib) = self.allocatable(Some(&file))?;
                Inventory {
                    gpus: static_gpus(&self.node_id, &file),
                    cpu_milli,
                    memory_mib,
                    driver_version: "static".into(),
                    cuda_version: String::new(),
                    source: InventoryOrigin::Static(path),
                }
            }
            Backend::Nvml(nvml) => {
                let (gpus, driver_version, cuda_version) = nvml.read()?;
                let (cpu_milli, memory_mib) = self.allocatable(None)?;
                Inventory {
                    gpus,
                    cpu_milli,
                    memory_mib,
                    driver_version,
                    cuda_version,
                    source: InventoryOrigin::Nvml,
                }
            }
            Backend::NoGpus => {
                let (cpu_milli, memory_mib) = self.allocatable(None)?;
                Inventory {
                    gpus: Vec::new(),
                    cpu_milli,
                    memory_mib,
                    driver_version: String::new(),
                    cuda_version: String::new(),
                    source: InventoryOrigin::NoGpus,
                }
            }
        };
        if !self.announced {
            self.announced = true;
            announce(&self.node_id, &inventory);
        }
        Ok(inventory)
    }

    /// Allocatable (CPU millicores, memory MiB): the file's figures or the host's, less the
    /// reservation.
    fn allocatable(&self, file: Option<&StaticInventory>) -> Result<(u64, u64), InventoryError> {
        let cpu_total = match file.and_then(|f| f.cpu_milli) {
            Some(cpu_milli) => cpu_milli,
            None => host_cpu_milli()?,
        };
        let memory_total = match file.and_then(|f| f.memory_mib) {
            Some(memory_mib) => memory_mib,
            None => host_memory_mib(Path::new(MEMINFO))?,
        };
        Ok((
            left_after_reservation(
                "reserved_cpu_milli",
                cpu_total,
                self.reserved_cpu_milli,
                "millicores",
            )?,
            left_after_reservation(
                "reserved_memory_mib",
                memory_total,
                self.reserved_memory_mib,
                "MiB",
            )?,
        ))
    }
}

fn announce(node_id: &str, inventory: &Inventory) {
    match &inventory.source {
        InventoryOrigin::Static(path) => tracing::info!(
            node = %node_id,
            "GPU inventory from static file {} ({} GPUs)",
            path.display(),
            inventory.gpus.len()
        ),
        InventoryOrigin::Nvml => tracing::info!(
            node = %node_id,
            driver = %inventory.driver_version,
            cuda = %inventory.cuda_version,
            "GPU inventory from NVML ({} GPUs)",
            inventory.gpus.len()
        ),
        // Already said, as a warning, by `GpuSource::open`.
        InventoryOrigin::NoGpus => {}
    }
}

/// The line logged when NVML cannot be loaded; `fallback` is the static file used instead
/// (`nvml_or_static`), if any.
pub fn nvml_unavailable_message(error: &NvmlError, fallback: Option<&Path>) -> String {
    let why = match error {
        NvmlError::LibloadingError(_)
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::LibraryNotFound
        | NvmlError::DriverNotLoaded => "no NVIDIA driver here",
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver",
        _ => "the NVIDIA driver did not answer",
    };
    match fallback {
        Some(path) => format!(
            "NVML unavailable ({error}): {why}; using the static inventory {}",
            path.display()
        ),
        None => format!(
            "NVML unavailable ({error}): {why}; this node reports no GPUs \
             (set inventory = {{ nvml_or_static = \"PATH\" }} to stand in for GPUs)"
        ),
    }
}

/// The process-wide NVML handle. NVML's own state is process-wide (`nvmlInit` counts
/// references), and an `EventSet` borrows the handle, so one `'static` handle lets a
/// [`GpuSource`] keep its [`XidWatch`](crate::nvml::XidWatch) without a self-referential struct or a leak per
/// source. A failed load is retried by the next `open`.
fn shared_nvml() -> Result<&'static Nvml, NvmlError> {
    static NVML: OnceLock<Nvml> = OnceLock::new();
    if let Some(nvml) = NVML.get() {
        return Ok(nvml);
    }
    let nvml = Nvml::init()?;
    // Should another thread win the race, this handle is dropped (nvmlShutdown) and theirs
    // is used.
    Ok(NVML.get_or_init(|| nvml))
}

// ---------------------------------------------------------------------------------------
// CPU and memory.

fn host_cpu_milli() -> Result<u64, InventoryError> {
    let cpus = std::thread::available_parallelism().map_err(InventoryError::HostCpu)?;
    Ok(u64::try_from(cpus.get())
        .unwrap_or(u64::MAX)
        .saturating_mul(1000))
}

fn host_memory_mib(meminfo: &Path) -> Result<u64, InventoryError> {
    let error = |reason: String| InventoryError::HostMemory {
        path: meminfo.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(meminfo).map_err(|e| error(e.to_string()))?;
    parse_mem_total_mib(&text).ok_or_else(|| error("no \"MemTotal: N kB\" line".into()))
}

/// `MemTotal` of a /proc/meminfo text, in MiB.
fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib / 1024)
}

fn left_after_reservation(
    field: &'static str,
    total: u64,
    reserved: u64,
    unit: &'static str,
) -> Result<u64, InventoryError> {
    match total.saturating_sub(reserved) {
        0 => Err(InventoryError::NothingLeft {
            field,
            reserved,
            total,
            unit,
        }),
        left => Ok(left),
    }
}

// ---------------------------------------------------------------------------------------
// Static GPUs.

fn static_gpus(node_id: &str, file: &StaticInventory) -> Vec<pb::Gpu> {
    (0u32..)
        .zip(file.devices())
        .map(|(index, device)| pb::Gpu {
            index,
            uuid: static_gpu_uuid(node_id, index),
            model: device.model.as_str().to_owned(),
            product_name: device.product_name.to_owned(),
            memory_mib: device.memory_mib,
            mig_mode: pb::MigMode::Disabled.into(),
            health: pb::GpuHealth::Healthy.into(),
            health_reason: String::new(),
            compute_capability: catalog_compute_capability(&device.model),
            nvlink_peers: Vec::new(),
        })
        .collect()
}

fn catalog_compute_capability(model: &GpuModelName) -> String {
    model.known().map_or_else(String::new, |m| {
        let (major, minor) = m.info().compute_capability;
        format!("{major}.{minor}")
    })
}

/// The UUID a static inventory gives GPU `index` of node `node_id`: shaped like NVML's
/// (`GPU-` and 32 lowercase hex digits grouped 8-4-4-4-12), the same at every start, and
/// different on every node, so the scheduler and `nvidia-smi`-minded tools can treat it as
/// real. Two 64-bit FNV-1a hashes with different salts make the 128 bits; FNV is used only
/// because it is stable across Rust versions and needs no dependency.
pub fn static_gpu_uuid(node_id: &str, index: u32) -> String {
    // A NUL separates the node id from the index: node ids never contain one, so no two
    // (node, index) pairs hash the same input.
    let input = [node_id.as_bytes(), &[0], &index.to_le_bytes()];
    let high = fnv1a_64(b"berth static GPU UUID, high half", &input);
    let low = fnv1a_64(b"berth static GPU UUID, low half", &input);
    let hex = format!("{high:016x}{low:016x}");
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn fnv1a_64(salt: &[u8], parts: &[&[u8]]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    std::iter::once(salt)
        .chain(parts.iter().copied())
        .flatten()
        .fold(OFFSET_BASIS, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

// ---------------------------------------------------------------------------------------
// Wire form.

/// What runs this node's sandboxes, as snapshot compatibility compares it: `process`, or
/// `gvisor/<runsc version>/<platform>` (runsc's own `--version` line; a checkpoint image is
/// restored only by the same runsc on the same platform). Runs `runsc --version` once.
pub fn runtime_identity(cfg: &AgentConfig) -> String {
    if cfg.runtime == crate::config::RuntimeKind::Process {
        return "process".into();
    }
    let version = std::process::Command::new(&cfg.runsc_path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("runsc version "))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mut id = format!("gvisor/{version}/{}", cfg.runsc_platform);
    id.truncate(128);
    id
}

/// The `NodeInventory` the agent registers: identity, placement and price from the config,
/// resources and GPUs from `inventory`.
/// `runtime` is [`runtime_identity`], read once at start.
pub fn to_pb(
    cfg: &AgentConfig,
    inventory: &Inventory,
    agent_address: &str,
    runtime: &str,
) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: cfg.node_id.clone(),
        provider: cfg.provider.clone(),
        region: cfg.region.clone(),
        zone: cfg.zone.clone(),
        instance_type: cfg.instance_type.clone(),
        capacity_type: match cfg.capacity_type {
            CapacityType::OnDemand => pb::CapacityType::OnDemand,
            CapacityType::Spot => pb::CapacityType::Spot,
        }
        .into(),
        price_per_hour_usd: cfg.price_per_hour_usd,
        labels: cfg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        taints: cfg
            .taints
            .iter()
            .map(|t| pb::Taint {
                key: t.key.clone(),
                value: t.value.clone(),
                effect: match t.effect {
                    TaintEffect::NoSchedule => pb::TaintEffect::NoSchedule,
                    TaintEffect::PreferNoSchedule => pb::TaintEffect::PreferNoSchedule,
                }
                .into(),
            })
            .collect(),
        cpu_milli: inventory.cpu_milli,
        memory_mib: inventory.memory_mib,
        gpus: inventory.gpus.clone(),
        cached_images: Vec::new(),
        driver_version: inventory.driver_version.clone(),
        cuda_version: inventory.cuda_version.clone(),
        inventory_source: inventory.source.as_str(),
        agent_address: agent_address.to_owned(),
        runtime: runtime.to_owned(),
        snapshot_budget_bytes: cfg.snapshot_disk_budget_bytes,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::config::TaintConfig;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/inventories")
    }

    fn static_config(node_id: &str, file: &str) -> AgentConfig {
        AgentConfig {
            node_id: node_id.into(),
            inventory: InventorySource::Static(file.into()),
            reserved_cpu_milli: 0,
            reserved_memory_mib: 0,
            ..AgentConfig::default()
        }
    }

    fn assert_nvml_shaped(uuid: &str) {
        let groups: Vec<&str> = uuid
            .strip_prefix("GPU-")
            .unwrap_or_else(|| panic!("{uuid}: no GPU- prefix"))
            .split('-')
            .collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12], "{uuid}");
        assert!(
            groups
                .iter()
                .all(|g| g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))),
            "{uuid}: not lowercase hex"
        );
    }

    #[test]
    fn static_uuids_look_like_nvml_and_never_change() {
        for index in 0..16 {
            let uuid = static_gpu_uuid("aws-use1-p5-0", index);
            assert_nvml_shaped(&uuid);
            assert_eq!(uuid, static_gpu_uuid("aws-use1-p5-0", index));
        }
        // Pinned: a different UUID after an upgrade would look to the scheduler like a
        // different GPU.
        // (Checked against an independent FNV-1a in Python.)
        assert_eq!(
            static_gpu_uuid("aws-use1-p5-0", 0),
            "GPU-b1aacd88-b725-7d1b-cccf-d0773903552f"
        );
        assert_ne!(static_gpu_uuid("a", 1), static_gpu_uuid("a1", 0));
        assert_ne!(static_gpu_uuid("node-a", 0), static_gpu_uuid("node-b", 0));
    }

    #[test]
    fn uuids_are_distinct_across_many_nodes() {
        let mut seen = HashSet::new();
        for node in 0..500 {
            for index in 0..MAX_GPUS_PER_NODE {
                assert!(seen.insert(static_gpu_uuid(&format!("node-{node}"), index)));
            }
        }
    }

    #[test]
    fn two_8xh100_nodes_report_16_distinct_gpus() {
        let mut uuids = HashSet::new();
        for node in ["aws-use1-p5-0", "gcp-usc1-a3-0"] {
            let inventory =
                discover(&static_config(node, "8xh100.toml"), &examples()).expect("reads");
            assert_eq!(
                inventory.source,
                InventoryOrigin::Static(examples().join("8xh100.toml"))
            );
            assert_eq!(
                inventory.source.as_str(),
                format!("static:{}", examples().join("8xh100.toml").display())
            );
            assert_eq!(
                (inventory.cpu_milli, inventory.memory_mib),
                (192_000, 2_097_152)
            );
            assert_eq!(
                (
                    inventory.driver_version.as_str(),
                    inventory.cuda_version.as_str()
                ),
                ("static", "")
            );
            assert_eq!(inventory.gpus.len(), 8);
            for (i, gpu) in inventory.gpus.iter().enumerate() {
                assert_eq!(gpu.index as usize, i);
                assert_nvml_shaped(&gpu.uuid);
                assert_eq!(gpu.uuid, static_gpu_uuid(node, gpu.index));
                assert_eq!(gpu.model, "H100");
                assert_eq!(gpu.product_name, "NVIDIA H100 80GB HBM3");
                assert_eq!(gpu.memory_mib, 81559);
                assert_eq!(gpu.compute_capability, "9.0");
                assert_eq!(gpu.mig_mode, i32::from(pb::MigMode::Disabled));
                assert_eq!(gpu.health, i32::from(pb::GpuHealth::Healthy));
                assert!(gpu.health_reason.is_empty());
                uuids.insert(gpu.uuid.clone());
            }
        }
        assert_eq!(uuids.len(), 16);
    }

    #[test]
    fn static_models_outside_the_catalog_keep_their_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("gpus.toml"),
            "cpu_milli = 1000\nmemory_mib = 1024\n[[gpus]]\nproduct_name = \"Mystery X\"\nmemory_mib = 4096\n",
        )
        .expect("write");
        let inventory = discover(&static_config("n", "gpus.toml"), dir.path()).expect("reads");
        let gpu = &inventory.gpus[0];
        assert_eq!((gpu.model.as_str(), gpu.memory_mib), ("Mystery X", 4096));
        assert_eq!(gpu.compute_capability, "");
    }

    #[test]
    fn cpu_and_memory_come_from_the_file_less_the_reservation() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("box.toml"),
            "cpu_milli = 8000\nmemory_mib = 32768\n[[gpus]]\nproduct_name = \"NVIDIA L4\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("bare.toml"),
            "[[gpus]]\nproduct_name = \"NVIDIA L4\"\n",
        )
        .expect("write");
        let reserved = |file: &str, cpu, memory| AgentConfig {
            reserved_cpu_milli: cpu,
            reserved_memory_mib: memory,
            ..static_config("n", file)
        };

        let boxed = discover(&reserved("box.toml", 500, 1024), dir.path()).expect("reads");
        assert_eq!((boxed.cpu_milli, boxed.memory_mib), (7500, 31744));

        // Without figures in the file, the host's.
        let host_cpu = host_cpu_milli().expect("cpus");
        let host_memory = host_memory_mib(Path::new(MEMINFO)).expect("meminfo");
        let bare = discover(&reserved("bare.toml", 500, 1024), dir.path()).expect("reads");
        assert_eq!(
            (bare.cpu_milli, bare.memory_mib),
            (host_cpu - 500, host_memory - 1024)
        );

        // A reservation that takes everything, or more, is refused, naming the field.
        for (cpu, memory, field) in [
            (8000, 0, "reserved_cpu_milli"),
            (9000, 0, "reserved_cpu_milli"),
            (0, 32768, "reserved_memory_mib"),
            (0, u64::MAX, "reserved_memory_mib"),
        ] {
            let err =
                discover(&reserved("box.toml", cpu, memory), dir.path()).expect_err("nothing left");
            assert!(
                matches!(err, InventoryError::NothingLeft { field: f, .. } if f == field),
                "{err}"
            );
            assert!(
                err.to_string().starts_with(&format!("agent.{field} = ")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_broken_static_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("bad.toml"), "cpu_milli = 0\ngpus = []\n").expect("write");
        let err = discover(&static_config("n", "bad.toml"), dir.path()).expect_err("invalid");
        let text = err.to_string();
        assert!(
            text.contains("bad.toml") && text.contains("cpu_milli"),
            "{text}"
        );
        let err = discover(&static_config("n", "missing.toml"), dir.path()).expect_err("missing");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn meminfo_total_is_read_in_mib() {
        let text = "MemFree:  100 kB\nMemTotal:       16318412 kB\nSwapTotal: 0 kB\n";
        assert_eq!(parse_mem_total_mib(text), Some(16318412 / 1024));
        assert_eq!(parse_mem_total_mib("MemTotal: 12 MB\n"), None);
        assert_eq!(parse_mem_total_mib("MemFree: 12 kB\n"), None);
    }

    #[test]
    fn without_a_driver_nvml_means_no_gpus() {
        let cfg = AgentConfig {
            node_id: "n".into(),
            inventory: InventorySource::Nvml,
            ..AgentConfig::default()
        };
        let inventory = discover(&cfg, Path::new(".")).expect("reads");
        match Nvml::init() {
            Ok(_) => assert_eq!(inventory.source, InventoryOrigin::Nvml),
            Err(e) => {
                assert_eq!(inventory.source, InventoryOrigin::NoGpus);
                assert_eq!(inventory.source.as_str(), "none");
                assert!(inventory.gpus.is_empty());
                assert_eq!(inventory.driver_version, "");
                assert!(inventory.cpu_milli > 0 && inventory.memory_mib > 0);
                let message = nvml_unavailable_message(&e, None);
                assert!(
                    message.starts_with(&format!("NVML unavailable ({e}): no NVIDIA driver here;")),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn the_nvml_unavailable_message_says_what_to_do() {
        assert_eq!(
            nvml_unavailable_message(&NvmlError::DriverNotLoaded, None),
            format!(
                "NVML unavailable ({}): no NVIDIA driver here; this node reports no GPUs \
                 (set inventory = {{ nvml_or_static = \"PATH\" }} to stand in for GPUs)",
                NvmlError::DriverNotLoaded
            )
        );
        assert_eq!(
            nvml_unavailable_message(
                &NvmlError::DriverNotLoaded,
                Some(Path::new("/etc/gpus.toml"))
            ),
            format!(
                "NVML unavailable ({}): no NVIDIA driver here; using the static inventory \
                 /etc/gpus.toml",
                NvmlError::DriverNotLoaded
            )
        );
        assert!(
            nvml_unavailable_message(&NvmlError::NoPermission, None).contains(
                "): no permission to talk to the NVIDIA driver; this node reports no GPUs"
            )
        );
        assert!(
            nvml_unavailable_message(&NvmlError::LibraryNotFound, None)
                .contains("no NVIDIA driver here")
        );
    }

    #[test]
    fn without_a_driver_nvml_falls_back_to_the_static_file() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("gpus.toml"),
            "[[gpus]]\nproduct_name = \"NVIDIA L4\"\ncount = 2\n",
        )
        .expect("write");
        let cfg = AgentConfig {
            node_id: "n".into(),
            inventory: InventorySource::NvmlOrStatic("gpus.toml".into()),
            ..AgentConfig::default()
        };
        let inventory = discover(&cfg, dir.path()).expect("reads");
        if Nvml::init().is_err() {
            assert_eq!(
                inventory.source,
                InventoryOrigin::Static(dir.path().join("gpus.toml"))
            );
            assert_eq!(inventory.gpus.len(), 2);
            assert_eq!(inventory.gpus[0].model, "L4");
        } else {
            assert_eq!(inventory.source, InventoryOrigin::Nvml);
        }
    }

    #[test]
    fn to_pb_fills_every_field() {
        let cfg = AgentConfig {
            node_id: "aws-usw2-g4dn-0".into(),
            provider: "aws".into(),
            region: "us-west-2".into(),
            zone: "us-west-2a".into(),
            instance_type: "g4dn.12xlarge".into(),
            capacity_type: CapacityType::Spot,
            price_per_hour_usd: 3.912,
            labels: BTreeMap::from([("team".to_string(), "ml".to_string())]),
            taints: vec![
                TaintConfig {
                    key: "gpu".into(),
                    value: "t4".into(),
                    effect: TaintEffect::NoSchedule,
                },
                TaintConfig {
                    key: "spot".into(),
                    value: String::new(),
                    effect: TaintEffect::PreferNoSchedule,
                },
            ],
            ..static_config("aws-usw2-g4dn-0", "4xt4.toml")
        };
        let inventory = discover(&cfg, &examples()).expect("reads");
        let wire = to_pb(&cfg, &inventory, "10.0.0.7:7071", "process");
        assert_eq!(wire.node_id, "aws-usw2-g4dn-0");
        assert_eq!(wire.provider, "aws");
        assert_eq!(wire.region, "us-west-2");
        assert_eq!(wire.zone, "us-west-2a");
        assert_eq!(wire.instance_type, "g4dn.12xlarge");
        assert_eq!(wire.capacity_type, i32::from(pb::CapacityType::Spot));
        assert_eq!(wire.price_per_hour_usd, 3.912);
        assert_eq!(wire.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(wire.labels.len(), 1);
        assert_eq!(
            wire.taints,
            [
                pb::Taint {
                    key: "gpu".into(),
                    value: "t4".into(),
                    effect: pb::TaintEffect::NoSchedule.into(),
                },
                pb::Taint {
                    key: "spot".into(),
                    value: String::new(),
                    effect: pb::TaintEffect::PreferNoSchedule.into(),
                },
            ]
        );
        assert_eq!((wire.cpu_milli, wire.memory_mib), (48_000, 196_608));
        assert_eq!(wire.gpus, inventory.gpus);
        assert_eq!(wire.gpus.len(), 4);
        assert!(
            wire.gpus
                .iter()
                .all(|g| g.model == "T4" && g.product_name == "Tesla T4")
        );
        assert_eq!(wire.driver_version, "static");
        assert_eq!(wire.inventory_source, inventory.source.as_str());
        assert!(wire.inventory_source.starts_with("static:"));
        assert_eq!(wire.agent_address, "10.0.0.7:7071");
        assert_eq!(wire.runtime, "process");
        assert!(wire.cached_images.is_empty());

        let on_demand = to_pb(
            &AgentConfig {
                capacity_type: CapacityType::OnDemand,
                ..cfg
            },
            &inventory,
            "",
            "process",
        );
        assert_eq!(
            on_demand.capacity_type,
            i32::from(pb::CapacityType::OnDemand)
        );
    }

    #[test]
    fn gpu_source_can_be_held_across_awaits() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<GpuSource>();
    }
}
