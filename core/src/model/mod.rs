//! Domain types the scheduler keeps in its replicated state: nodes with their GPUs,
//! sandboxes with their bindings, tenant quotas. All are plain data (`Serialize` for
//! snapshots, `Eq` so `restore(snapshot(s)) == s` can be asserted); behaviour lives in
//! [`crate::state`] and [`crate::placement`].
//!
//! # Layout
//! - this file: nodes, GPUs, specs and their bounds, quotas;
//! - `sandbox`: a sandbox in the state, its lifecycle, placement, binding and snapshot.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use berth_proto::gpu::GpuRequest;
use berth_proto::node::{CapacityType, TaintEffect};
use berth_proto::{GpuModelName, ImageReference, Validator};

mod sandbox;
pub use sandbox::{Binding, Placement, Sandbox, SandboxState, SnapshotMode, SnapshotRecord};

/// Bounds on what one sandbox spec may carry (documented in `types.proto`).
pub mod limits {
    /// Longest tenant name.
    pub const TENANT_LEN: usize = 63;
    /// Longest request id.
    pub const REQUEST_ID_LEN: usize = 128;
    /// Longest image reference.
    pub const IMAGE_LEN: usize = berth_proto::image::MAX_REFERENCE_LEN;
    /// Longest label key or value, provider, region or toleration key or value.
    pub const SHORT_TEXT_BYTES: usize = 256;
    /// Most argv entries.
    pub const COMMAND_ARGS: usize = 256;
    /// Most environment variables.
    pub const ENV_VARS: usize = 256;
    /// Most bytes of argv or of env, each.
    pub const TEXT_BYTES: usize = 64 * 1024;
    /// Most labels on a sandbox, and required node labels in a constraint.
    pub const LABELS: usize = 32;
    /// Most providers in an allow-list.
    pub const PROVIDERS: usize = 16;
    /// Most regions in an allow-list.
    pub const REGIONS: usize = 64;
    /// Most tolerations.
    pub const TOLERATIONS: usize = 16;
    /// Priority range.
    pub const PRIORITY: std::ops::RangeInclusive<i32> = -1000..=1000;
    /// Largest CPU request: 1024 cores.
    pub const CPU_MILLI: u64 = 1024 * 1000;
    /// Largest memory request: 16 TiB.
    pub const MEMORY_MIB: u64 = 16 * 1024 * 1024;
    /// Longest timeout: 30 days.
    pub const TIMEOUT_MS: u64 = 30 * 24 * 3600 * 1000;
}

/// A node's id: the agent's configured `node_id`.
pub type NodeId = String;

/// A sandbox's id, assigned by the state machine in apply order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SandboxId(pub u64);

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sbx-{:010}", self.0)
    }
}

impl std::str::FromStr for SandboxId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("sbx-")
            .and_then(|n| n.parse().ok())
            .map(SandboxId)
            .ok_or_else(|| format!("{s:?} is not a sandbox id (sbx-NNNNNNNNNN)"))
    }
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// NVML index.
    pub index: u32,
    /// NVML UUID.
    pub uuid: String,
    /// Catalog model or verbatim name.
    pub model: GpuModelName,
    /// Memory as reported.
    pub memory_mib: u64,
    /// False after a fatal XID or uncorrectable ECC error: no new sandboxes.
    pub healthy: bool,
    /// Multi-Instance GPU mode, as reported.
    pub mig_mode: MigMode,
    /// Indices of the node's other GPUs reachable over NVLink, when known.
    pub nvlink_peers: Vec<u32>,
}

/// NVIDIA Multi-Instance GPU mode of a device, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MigMode {
    /// Not reported.
    #[default]
    Unknown,
    /// MIG is off.
    Disabled,
    /// MIG is on (the GPU is partitioned into instances).
    Enabled,
    /// The device does not support MIG.
    Unsupported,
}

/// Most images a node may report as cached (`types.proto`).
pub const MAX_CACHED_IMAGES: usize = 256;

/// A taint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// Effect.
    pub effect: TaintEffect,
}

/// What a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// Unique id.
    pub id: NodeId,
    /// Provider.
    pub provider: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Instance type.
    pub instance_type: String,
    /// On-demand or spot.
    pub capacity_type: CapacityType,
    /// Price in micro-dollars per hour (integers keep the state exactly comparable).
    pub price_micro_usd_per_hour: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Taints.
    pub taints: Vec<Taint>,
    /// Allocatable CPU.
    pub cpu_milli: u64,
    /// Allocatable memory.
    pub memory_mib: u64,
    /// GPUs, in index order.
    pub gpus: Vec<GpuDevice>,
    /// Images already present on the node (image-cache affinity), at most
    /// [`MAX_CACHED_IMAGES`].
    pub cached_images: Vec<String>,
    /// Where the node's agent serves its AgentService (logs), `host:port`; empty if none.
    pub agent_address: String,
    /// What runs sandboxes here (`process`, `gvisor/<runsc version>/<platform>`; empty
    /// when the agent did not say): snapshots move only between nodes that agree on it.
    pub runtime: String,
    /// Most bytes of paused sandboxes' snapshots the node keeps on disk; 0 = no budget.
    /// A pause that would go past it is refused.
    pub snapshot_budget_bytes: u64,
}

impl NodeSpec {
    /// A node with no labels or taints, on-demand and free: the shape tests and traces use.
    pub fn simple(
        id: impl Into<NodeId>,
        cpu_milli: u64,
        memory_mib: u64,
        gpus: Vec<GpuDevice>,
    ) -> NodeSpec {
        NodeSpec {
            id: id.into(),
            provider: "local".into(),
            region: "local".into(),
            zone: String::new(),
            instance_type: String::new(),
            capacity_type: CapacityType::OnDemand,
            price_micro_usd_per_hour: 0,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            cpu_milli,
            memory_mib,
            gpus,
            agent_address: String::new(),
            runtime: String::new(),
            snapshot_budget_bytes: 0,
            cached_images: Vec::new(),
        }
    }

    /// `count` healthy GPUs of one model with synthetic UUIDs derived from the node id.
    pub fn uniform_gpus(
        node_id: &str,
        model: &GpuModelName,
        memory_mib: u64,
        count: u32,
    ) -> Vec<GpuDevice> {
        (0..count)
            .map(|index| GpuDevice {
                index,
                uuid: format!("GPU-{node_id}-{index}"),
                model: model.clone(),
                memory_mib,
                healthy: true,
                mig_mode: crate::model::MigMode::Unknown,
                nvlink_peers: Vec::new(),
            })
            .collect()
    }

    /// Records every problem with the spec (bounds, duplicate GPU indices).
    pub fn validate(&self, v: &mut Validator) {
        v.identifier("id", &self.id, 63);
        v.check(self.gpus.len() <= 16, "gpus", || {
            format!("{} GPUs; the limit is 16 per node", self.gpus.len())
        });
        for (i, gpu) in self.gpus.iter().enumerate() {
            v.check(gpu.index as usize == i, &format!("gpus[{i}].index"), || {
                format!("is {}; GPUs must be listed in index order 0..n", gpu.index)
            });
            for (j, peer) in gpu.nvlink_peers.iter().enumerate() {
                let known = (*peer as usize) < self.gpus.len() && *peer != gpu.index;
                v.check(known, &format!("gpus[{i}].nvlink_peers[{j}]"), || {
                    format!("{peer} is not the index of another GPU of this node")
                });
            }
        }
        v.check(
            self.cached_images.len() <= MAX_CACHED_IMAGES,
            "cached_images",
            || {
                format!(
                    "{} images; the limit is {MAX_CACHED_IMAGES}",
                    self.cached_images.len()
                )
            },
        );
        v.check(self.labels.len() <= 64, "labels", || {
            format!("{} labels; the limit is 64", self.labels.len())
        });
        v.check(self.taints.len() <= 16, "taints", || {
            format!("{} taints; the limit is 16", self.taints.len())
        });
        if !self.agent_address.is_empty() {
            v.address("agent_address", &self.agent_address);
        }
        v.check(self.runtime.len() <= 128, "runtime", || {
            format!("is {} bytes; the limit is 128", self.runtime.len())
        });
    }
}

/// Scheduling status of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Accepting sandboxes.
    Ready,
    /// No new sandboxes; running ones continue.
    Cordoned,
    /// Cordoned, to be removed once empty.
    Draining,
    /// Missed its heartbeats (its sandboxes are Unknown for the disconnect grace, then
    /// Lost), or declared down by an operator (its sandboxes are Lost at once).
    Down,
}

impl NodeStatus {
    /// Lower-case name, as messages say it.
    pub fn name(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Cordoned => "cordoned",
            NodeStatus::Draining => "draining",
            NodeStatus::Down => "down",
        }
    }
}

/// A toleration of a taint key (and value, when non-empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Toleration {
    /// Key.
    pub key: String,
    /// Value; empty tolerates any value.
    pub value: String,
}

/// Where a sandbox may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Constraints {
    /// Allowed providers; empty = any.
    pub providers: Vec<String>,
    /// Allowed regions; empty = any.
    pub regions: Vec<String>,
    /// Required node labels.
    pub node_labels: BTreeMap<String, String>,
    /// Tolerated taints.
    pub tolerations: Vec<Toleration>,
    /// Required capacity type; `None` = either.
    pub capacity_type: Option<CapacityType>,
}

impl Constraints {
    /// Whether the sandbox tolerates a taint.
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.tolerations
            .iter()
            .any(|t| t.key == taint.key && (t.value.is_empty() || t.value == taint.value))
    }
}

/// The checks of a command line and its environment (a spec's, an exec's): no NUL bytes, a
/// non-empty program, at most 256 arguments and variables and 64 KiB of each, and names
/// that an environment can hold. Fields `command[i]`, `command`, `env`, `env["NAME"]`.
pub fn validate_argv_env(v: &mut Validator, command: &[String], env: &BTreeMap<String, String>) {
    use limits::*;
    for (i, arg) in command.iter().enumerate() {
        v.check(!arg.contains('\0'), &format!("command[{i}]"), || {
            "contains a NUL byte".into()
        });
    }
    v.check(
        command.first().is_none_or(|program| !program.is_empty()),
        "command[0]",
        || "the program is empty".into(),
    );
    v.check(command.len() <= COMMAND_ARGS, "command", || {
        format!("{} arguments; the limit is {COMMAND_ARGS}", command.len())
    });
    let argv_bytes: usize = command.iter().map(String::len).sum();
    v.check(argv_bytes <= TEXT_BYTES, "command", || {
        format!("{argv_bytes} bytes; the limit is {TEXT_BYTES}")
    });
    v.check(env.len() <= ENV_VARS, "env", || {
        format!("{} variables; the limit is {ENV_VARS}", env.len())
    });
    let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
    v.check(env_bytes <= TEXT_BYTES, "env", || {
        format!("{env_bytes} bytes; the limit is {TEXT_BYTES}")
    });
    for (name, value) in env {
        let field = format!("env[{name:?}]");
        if name.is_empty() {
            v.error(&field, "the name is empty");
        } else if name.contains('=') {
            v.error(
                &field,
                "the name contains '=', which ends a name in an environment",
            );
        } else if name.contains('\0') {
            v.error(&field, "the name contains a NUL byte");
        }
        v.check(!value.contains('\0'), &field, || {
            "the value contains a NUL byte".into()
        });
    }
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Owner; quotas apply per tenant.
    pub tenant: String,
    /// OCI image.
    pub image: String,
    /// argv.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// CPU request.
    pub cpu_milli: u64,
    /// Memory request.
    pub memory_mib: u64,
    /// GPU request; `None` = CPU-only.
    pub gpu: Option<GpuRequest>,
    /// Placement constraints.
    pub constraints: Constraints,
    /// Higher first within a batch.
    pub priority: i32,
    /// Session limit once running; 0 = none (the service layer fills in the tenant's
    /// default before the spec reaches the log).
    pub timeout_ms: u64,
    /// What it may reach on the network.
    pub network: crate::network::NetworkPolicy,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Stays Running after its command ends (or runs none) until deleted or a limit ends it.
    pub keep_alive: bool,
    /// Ends it after this long without an exec or file call; 0 = none.
    pub idle_timeout_ms: u64,
    /// Pauses it to disk after this long without an exec or file call; 0 = never.
    pub auto_pause_idle_ms: u64,
    /// An exec or file call while it is Paused or on Standby resumes it first.
    pub auto_resume: bool,
}

impl SandboxSpec {
    /// A spec with only resources set: the shape traces and benchmarks use.
    pub fn resources(
        tenant: &str,
        cpu_milli: u64,
        memory_mib: u64,
        gpu: Option<GpuRequest>,
    ) -> SandboxSpec {
        SandboxSpec {
            tenant: tenant.into(),
            image: String::new(),
            command: Vec::new(),
            env: BTreeMap::new(),
            cpu_milli,
            memory_mib,
            gpu,
            constraints: Constraints::default(),
            priority: 0,
            timeout_ms: 0,
            network: crate::network::NetworkPolicy::None,
            labels: BTreeMap::new(),
            keep_alive: false,
            idle_timeout_ms: 0,
            auto_pause_idle_ms: 0,
            auto_resume: false,
        }
    }

    /// Records every problem with the spec, with field paths relative to the spec.
    pub fn validate(&self, v: &mut Validator) {
        use limits::*;
        v.identifier("tenant", &self.tenant, TENANT_LEN);
        // Empty: the node's default root file system. Otherwise an OCI reference, checked
        // here so that a malformed one is refused at the API rather than by a failed pull.
        if !self.image.is_empty() {
            if let Err(why) = ImageReference::parse(&self.image) {
                v.error("image", why);
            }
        }
        validate_argv_env(v, &self.command, &self.env);
        v.check(
            (1..=CPU_MILLI).contains(&self.cpu_milli),
            "resources.cpu_milli",
            || format!("{} is outside 1..={CPU_MILLI}", self.cpu_milli),
        );
        v.check(
            (1..=MEMORY_MIB).contains(&self.memory_mib),
            "resources.memory_mib",
            || format!("{} is outside 1..={MEMORY_MIB}", self.memory_mib),
        );
        let c = &self.constraints;
        v.check(
            c.providers.len() <= PROVIDERS,
            "constraints.providers",
            || format!("{} entries; the limit is {PROVIDERS}", c.providers.len()),
        );
        v.check(c.regions.len() <= REGIONS, "constraints.regions", || {
            format!("{} entries; the limit is {REGIONS}", c.regions.len())
        });
        v.check(
            c.node_labels.len() <= LABELS,
            "constraints.node_labels",
            || format!("{} entries; the limit is {LABELS}", c.node_labels.len()),
        );
        v.check(
            c.tolerations.len() <= TOLERATIONS,
            "constraints.tolerations",
            || {
                format!(
                    "{} entries; the limit is {TOLERATIONS}",
                    c.tolerations.len()
                )
            },
        );
        v.check(PRIORITY.contains(&self.priority), "priority", || {
            format!("{} is outside -1000..=1000", self.priority)
        });
        v.check(self.timeout_ms <= TIMEOUT_MS, "timeout_ms", || {
            format!("{} is above 30 days", self.timeout_ms)
        });
        v.check(
            self.idle_timeout_ms <= TIMEOUT_MS,
            "idle_timeout_ms",
            || format!("{} is above 30 days", self.idle_timeout_ms),
        );
        v.check(
            self.auto_pause_idle_ms <= TIMEOUT_MS,
            "auto_pause_idle_ms",
            || format!("{} is above 30 days", self.auto_pause_idle_ms),
        );
        v.check(
            self.auto_pause_idle_ms == 0 || self.keep_alive,
            "auto_pause_idle_ms",
            || "needs keep_alive: only a sandbox that stays up can be paused when idle".into(),
        );
        v.nested("network", |v| self.network.validate(v));
        v.check(self.labels.len() <= LABELS, "labels", || {
            format!("{} labels; the limit is {LABELS}", self.labels.len())
        });
        // Every short string of the spec is bounded too, so no map entry or list item can
        // carry a large payload into the replicated state.
        let short = |v: &mut Validator, field: String, text: &str| {
            v.check(text.len() <= SHORT_TEXT_BYTES, &field, || {
                format!("is {} bytes; the limit is {SHORT_TEXT_BYTES}", text.len())
            });
        };
        for (key, value) in &self.labels {
            short(v, format!("labels[{key:?}]"), key);
            short(v, format!("labels[{key:?}]"), value);
        }
        for (i, p) in c.providers.iter().enumerate() {
            short(v, format!("constraints.providers[{i}]"), p);
        }
        for (i, r) in c.regions.iter().enumerate() {
            short(v, format!("constraints.regions[{i}]"), r);
        }
        for (key, value) in &c.node_labels {
            short(v, format!("constraints.node_labels[{key:?}]"), key);
            short(v, format!("constraints.node_labels[{key:?}]"), value);
        }
        for (i, t) in c.tolerations.iter().enumerate() {
            short(v, format!("constraints.tolerations[{i}].key"), &t.key);
            short(v, format!("constraints.tolerations[{i}].value"), &t.value);
        }
    }

    /// Milli-GPUs this spec takes if bound with `option` of its request.
    pub fn gpu_milli(&self, option: usize) -> u64 {
        self.gpu
            .as_ref()
            .and_then(|g| g.options.get(option))
            .map_or(0, |o| o.amount.total_milli())
    }
}

/// Limits on one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantQuota {
    /// Most sandboxes not yet terminal; `None` = unlimited.
    pub max_concurrent_sandboxes: Option<u32>,
    /// Most milli-GPUs held per model (1000 per whole GPU); absent models are unlimited.
    pub max_gpu_milli_per_model: BTreeMap<GpuModelName, u64>,
}
