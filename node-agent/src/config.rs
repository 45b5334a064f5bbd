//! The `[agent]` section of a berth config file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use berth_proto::Validator;

use crate::image::RegistryConfig;
use crate::static_inventory::StaticInventory;
pub use berth_proto::node::{CapacityType, TaintEffect};

/// Most labels and taints per node; the scheduler indexes them.
pub const MAX_LABELS: usize = 64;
/// Most taints per node.
pub const MAX_TAINTS: usize = 16;

/// Node agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Node id, unique in the cluster (DNS-label style, at most 63 characters).
    pub node_id: String,
    /// Scheduler replicas to try, `host:port`; the agent follows leader hints from there.
    pub schedulers: Vec<String>,
    /// Cloud or site the node runs in ("aws", "gcp", "local", ...).
    pub provider: String,
    /// Provider region.
    pub region: String,
    /// Provider zone; may be empty.
    pub zone: String,
    /// Provider instance type ("p5.48xlarge").
    pub instance_type: String,
    /// On-demand or spot.
    pub capacity_type: CapacityType,
    /// What the node costs per hour, for the autoscaler and reports.
    pub price_per_hour_usd: f64,
    /// Where the GPU list comes from.
    pub inventory: InventorySource,
    /// How sandboxes are isolated.
    pub runtime: RuntimeKind,
    /// Path of the `runsc` binary for the gvisor runtime.
    pub runsc_path: String,
    /// gVisor platform (`runsc --platform`): `ptrace` works everywhere, including inside
    /// VMs without nested virtualisation; `kvm` is faster on bare metal with /dev/kvm.
    pub runsc_platform: String,
    /// Where the agent serves AgentService (sandbox logs) to the schedulers; port 0 picks
    /// a free port.
    pub listen_address: String,
    /// The address the schedulers should use to reach `listen_address` (behind NAT, or
    /// when listening on 0.0.0.0); empty means the bound address.
    pub advertise_address: String,
    /// Local state, so a restarted agent re-adopts its running sandboxes.
    pub state_dir: String,
    /// CPU kept back from sandboxes for the host and the agent.
    pub reserved_cpu_milli: u64,
    /// Memory kept back from sandboxes.
    pub reserved_memory_mib: u64,
    /// Seconds between NVML re-fingerprints (health, XID events).
    pub inventory_refresh_s: u64,
    /// Cap on each sandbox's captured stdout and stderr, in bytes each.
    pub max_output_bytes: u64,
    /// Where pulled images are kept; empty for `<state_dir>/images`.
    pub image_cache_dir: String,
    /// Size of the image cache past which the least recently used unused images go.
    pub image_cache_max_bytes: u64,
    /// Image pulls at once.
    pub max_concurrent_pulls: usize,
    /// Sandbox starts at once (from shim launch until the runtime runs the sandbox); more
    /// queue on the node.
    pub max_concurrent_starts: usize,
    /// Registries that need plain HTTP (`insecure`) or credentials.
    pub registries: Vec<RegistryConfig>,
    /// Where filesystem snapshots (`berth sandbox snapshot`) are pushed, as
    /// `host[:port]/path`: a sandbox of tenant T becomes `<this>/T/<sandbox id>:<unix ms>`
    /// (or a name the caller gives under `<this>/T/`). Pushed with the `registries`
    /// settings of its host. Empty: this node refuses snapshots.
    pub snapshot_repository: String,
    /// Most bytes of files (before compression) one snapshot's layer may hold.
    pub snapshot_max_bytes: u64,
    /// Most bytes of paused sandboxes' checkpoints (memory image and written files) kept
    /// in `state_dir`; the scheduler refuses a pause that would go past it. 0 = no budget.
    pub snapshot_disk_budget_bytes: u64,
    /// Where the agent serves Prometheus `/metrics`; empty for nowhere, port 0 picks one.
    pub metrics_address: String,
    /// Node labels used by placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Taints; sandboxes must tolerate them.
    pub taints: Vec<TaintConfig>,
    /// Sandbox networks (`[agent.network]`).
    pub network: NetworkConfig,
    /// How often the agent reads every sandbox's CPU and memory use from its cgroups and
    /// reports it to the scheduler, in milliseconds.
    pub usage_interval_ms: u64,
    /// This node's certificate (identity `spiffe://CLUSTER/node/NODE_ID`), key and the
    /// cluster CA (`[agent.tls]`); or `insecure = true`.
    pub tls: berth_net::TlsSettings,
    /// A file holding a join token (`berth node token create`): when `tls.cert` does not
    /// exist yet, the agent joins with it and writes the issued key and certificate to
    /// `tls.key` and `tls.cert`.
    pub join_token_file: String,
}

/// `[agent.network]`: how sandboxes with a network policy are connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// IPv4 pool the sandboxes' /30s come from. Host-wide: every agent on a host must use
    /// the same one (their slots are shared under `run_dir`), and it must not overlap a
    /// network the host routes to.
    pub pool: String,
    /// Destinations no sandbox reaches, whatever its policy (IPv4 networks). The node
    /// itself and other sandboxes are never reachable; the scheduler replicas' addresses
    /// are added to this list.
    pub blocked: Vec<String>,
    /// Host-wide directory of sandbox network slots.
    pub run_dir: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            pool: "10.88.0.0/16".into(),
            // Link-local: the cloud metadata services (169.254.169.254) live here.
            blocked: vec!["169.254.0.0/16".into()],
            run_dir: "/run/berth/net".into(),
        }
    }
}

impl NetworkConfig {
    fn validate(&self, v: &mut Validator) {
        use berth_proto::network::Cidr;
        match self.pool.parse::<Cidr>() {
            Ok(c) if c.len > 30 => v.error("pool", format!("{c} is smaller than one /30")),
            Ok(_) => {}
            Err(why) => v.error("pool", why),
        }
        for (i, b) in self.blocked.iter().enumerate() {
            if let Err(why) = b.parse::<Cidr>() {
                v.error(&format!("blocked[{i}]"), why);
            }
        }
        v.check(!self.run_dir.trim().is_empty(), "run_dir", || {
            "must be set".into()
        });
    }
}

/// Source of the GPU inventory: `inventory = "nvml"`, `inventory = { static = "PATH" }`, or
/// `inventory = { nvml_or_static = "PATH" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventorySource {
    /// Ask the NVIDIA driver through NVML; with no driver, the node has no GPUs.
    Nvml,
    /// Read a TOML list of GPUs (dev mode, the local provider, machines without a driver).
    /// A relative path is relative to the config file. NVML is not asked.
    Static(PathBuf),
    /// Ask NVML; when it cannot be loaded (no driver), say so once and use this static file.
    NvmlOrStatic(PathBuf),
}

/// Sandbox isolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// gVisor `runsc`: a user-space kernel between the sandbox and the host.
    Gvisor,
    /// A plain child process: no isolation, for development only.
    Process,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintConfig {
    /// Key.
    pub key: String,
    /// Value; may be empty.
    #[serde(default)]
    pub value: String,
    /// Effect.
    pub effect: TaintEffect,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            node_id: String::new(),
            schedulers: vec!["127.0.0.1:7070".into()],
            provider: "local".into(),
            region: "local".into(),
            zone: String::new(),
            instance_type: "local".into(),
            capacity_type: CapacityType::OnDemand,
            price_per_hour_usd: 0.0,
            inventory: InventorySource::Nvml,
            runtime: RuntimeKind::Gvisor,
            runsc_path: "runsc".into(),
            runsc_platform: "ptrace".into(),
            listen_address: "127.0.0.1:0".into(),
            advertise_address: String::new(),
            state_dir: "berth-data/agent".into(),
            reserved_cpu_milli: 500,
            reserved_memory_mib: 1024,
            inventory_refresh_s: 30,
            max_output_bytes: 8 * 1024 * 1024,
            image_cache_dir: String::new(),
            image_cache_max_bytes: 20 << 30,
            max_concurrent_pulls: 2,
            max_concurrent_starts: 3,
            registries: Vec::new(),
            snapshot_repository: String::new(),
            snapshot_max_bytes: 4 << 30,
            snapshot_disk_budget_bytes: 64 << 30,
            metrics_address: String::new(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
            network: NetworkConfig::default(),
            usage_interval_ms: 5_000,
            tls: berth_net::TlsSettings::default(),
            join_token_file: String::new(),
        }
    }
}

impl AgentConfig {
    /// Records every problem; `config_dir` resolves a relative static inventory path.
    pub fn validate(&self, v: &mut Validator, config_dir: &Path) {
        v.identifier("node_id", &self.node_id, 63);
        let joining = !self.tls.insecure
            && !self.join_token_file.is_empty()
            && !Path::new(&self.tls.cert).exists();
        if joining {
            // The certificate comes from the join; the CA to check the replicas must be here.
            v.check(Path::new(&self.tls.ca).is_file(), "tls.ca", || {
                format!("{:?}: not a file (needed to join)", self.tls.ca)
            });
            v.check(
                Path::new(&self.join_token_file).is_file(),
                "join_token_file",
                || format!("{:?}: not a file", self.join_token_file),
            );
            for (field, value) in [("tls.cert", &self.tls.cert), ("tls.key", &self.tls.key)] {
                v.check(!value.is_empty(), field, || {
                    "must name where the joined certificate is written".into()
                });
            }
        } else if let Some(id) = v.nested("tls", |v| self.tls.validate(v)) {
            v.check(
                id.role == berth_net::Role::Node(self.node_id.clone()),
                "tls.cert",
                || format!("names {id}; this agent is node {}", self.node_id),
            );
        }
        v.check(!self.schedulers.is_empty(), "schedulers", || {
            "must list at least one".into()
        });
        for (i, address) in self.schedulers.iter().enumerate() {
            v.address(&format!("schedulers[{i}]"), address);
        }
        v.identifier("provider", &self.provider, 63);
        v.identifier("region", &self.region, 63);
        if !self.zone.is_empty() {
            v.identifier("zone", &self.zone, 63);
        }
        v.check(
            !self.instance_type.trim().is_empty(),
            "instance_type",
            || "must be set".into(),
        );
        v.check(
            self.price_per_hour_usd.is_finite() && self.price_per_hour_usd >= 0.0,
            "price_per_hour_usd",
            || format!("{} must be a finite number >= 0", self.price_per_hour_usd),
        );
        if let Some(path) = self.static_inventory_path(config_dir) {
            if let Err(e) = StaticInventory::load(&path) {
                v.error("inventory.static", e.to_string());
            }
        }
        if self.runtime == RuntimeKind::Gvisor {
            v.check(!self.runsc_path.trim().is_empty(), "runsc_path", || {
                "must be set".into()
            });
            v.check(
                matches!(self.runsc_platform.as_str(), "ptrace" | "kvm" | "systrap"),
                "runsc_platform",
                || {
                    format!(
                        "{:?} is not one of ptrace, kvm, systrap",
                        self.runsc_platform
                    )
                },
            );
        }
        let listen_ok = self
            .listen_address
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        v.check(listen_ok, "listen_address", || {
            format!(
                "{:?} is not a host:port address (port 0 picks a free one)",
                self.listen_address
            )
        });
        if !self.advertise_address.is_empty() {
            v.address("advertise_address", &self.advertise_address);
        }
        v.check(!self.state_dir.trim().is_empty(), "state_dir", || {
            "must be set".into()
        });
        v.check(
            (1..=3600).contains(&self.inventory_refresh_s),
            "inventory_refresh_s",
            || format!("{} is outside 1..=3600", self.inventory_refresh_s),
        );
        v.check(
            (4096..=1024 * 1024 * 1024).contains(&self.max_output_bytes),
            "max_output_bytes",
            || format!("{} is outside 4096..=1073741824", self.max_output_bytes),
        );
        v.check(
            self.image_cache_max_bytes >= 64 << 20,
            "image_cache_max_bytes",
            || format!("{} is below 67108864 (64 MiB)", self.image_cache_max_bytes),
        );
        v.check(
            (1..=64).contains(&self.max_concurrent_pulls),
            "max_concurrent_pulls",
            || format!("{} is outside 1..=64", self.max_concurrent_pulls),
        );
        v.check(
            (1..=256).contains(&self.max_concurrent_starts),
            "max_concurrent_starts",
            || format!("{} is outside 1..=256", self.max_concurrent_starts),
        );
        v.nested("network", |v| self.network.validate(v));
        v.check(
            (1_000..=600_000).contains(&self.usage_interval_ms),
            "usage_interval_ms",
            || format!("{} is outside 1000..=600000", self.usage_interval_ms),
        );
        for (i, r) in self.registries.iter().enumerate() {
            v.check(
                !r.host.is_empty()
                    && !r.host.contains('/')
                    && !r.host.contains(char::is_whitespace),
                &format!("registries[{i}].host"),
                || format!("{:?} is not a registry host (host or host:port)", r.host),
            );
            if !r.username.is_empty() {
                let path = config_dir.join(&r.password_file);
                v.check(
                    !r.password_file.is_empty() && path.is_file(),
                    &format!("registries[{i}].password_file"),
                    || {
                        format!(
                            "{} is not a readable file (needed with a username)",
                            path.display()
                        )
                    },
                );
            }
        }
        if !self.snapshot_repository.is_empty() {
            v.check(
                snapshot_repository_ok(&self.snapshot_repository),
                "snapshot_repository",
                || {
                    format!(
                        "{:?} is not `host[:port]/path` (a registry host, then lowercase \
                         path components; no tag or digest)",
                        self.snapshot_repository
                    )
                },
            );
        }
        v.check(
            (1 << 20..=1 << 40).contains(&self.snapshot_max_bytes),
            "snapshot_max_bytes",
            || {
                format!(
                    "{} is outside 1048576..=1099511627776 (1 MiB to 1 TiB)",
                    self.snapshot_max_bytes
                )
            },
        );
        if !self.metrics_address.is_empty() {
            let ok = self
                .metrics_address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            v.check(ok, "metrics_address", || {
                format!("{:?} is not a host:port address", self.metrics_address)
            });
        }
        v.check(self.labels.len() <= MAX_LABELS, "labels", || {
            format!("{} labels; the limit is {MAX_LABELS}", self.labels.len())
        });
        for (key, value) in &self.labels {
            v.check(label_ok(key), &format!("labels.{key}"), || {
                "label keys are 1..=63 characters of letters, digits, '-', '_', '.' and '/'".into()
            });
            v.check(value.len() <= 253, &format!("labels.{key}"), || {
                format!("value is {} characters; the limit is 253", value.len())
            });
        }
        v.check(self.taints.len() <= MAX_TAINTS, "taints", || {
            format!("{} taints; the limit is {MAX_TAINTS}", self.taints.len())
        });
        for (i, taint) in self.taints.iter().enumerate() {
            v.check(label_ok(&taint.key), &format!("taints[{i}].key"), || {
                format!("{:?} is not a valid key", taint.key)
            });
        }
    }

    /// The image cache directory.
    pub fn image_cache_path(&self) -> PathBuf {
        if self.image_cache_dir.is_empty() {
            Path::new(&self.state_dir).join("images")
        } else {
            PathBuf::from(&self.image_cache_dir)
        }
    }

    /// The registries, with password files resolved against the config file's folder.
    pub fn registries_resolved(&self, config_dir: &Path) -> Vec<RegistryConfig> {
        self.registries
            .iter()
            .map(|r| RegistryConfig {
                password_file: if r.password_file.is_empty() {
                    String::new()
                } else {
                    config_dir.join(&r.password_file).display().to_string()
                },
                ..r.clone()
            })
            .collect()
    }

    /// The static inventory file, resolved against the config file's folder.
    pub fn static_inventory_path(&self, config_dir: &Path) -> Option<PathBuf> {
        match &self.inventory {
            InventorySource::Static(path) | InventorySource::NvmlOrStatic(path)
                if path.is_relative() =>
            {
                Some(config_dir.join(path))
            }
            InventorySource::Static(path) | InventorySource::NvmlOrStatic(path) => {
                Some(path.clone())
            }
            InventorySource::Nvml => None,
        }
    }
}

/// Whether `repository` is `host[:port]/path`: a reference without tag or digest whose
/// first component is a registry host (what `snapshot_repository` must be).
pub fn snapshot_repository_ok(repository: &str) -> bool {
    // A tag is added to check it as a reference would be (`host:port/x` must not read as
    // `host` tagged `port/x`).
    matches!(
        berth_proto::image::ImageReference::parse(&format!("{repository}/t/x:1")),
        Ok(r) if r.registry.is_some() && r.digest.is_none()
            && r.tag.as_deref() == Some("1")
            && repository.split_once('/').is_some_and(|(_, path)| !path.is_empty())
    )
}

fn label_ok(key: &str) -> bool {
    (1..=63).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_source_reads_both_forms() {
        let nvml: AgentConfig =
            toml::from_str("node_id = \"a\"\ninventory = \"nvml\"").expect("nvml");
        assert_eq!(nvml.inventory, InventorySource::Nvml);
        let file: AgentConfig =
            toml::from_str("node_id = \"a\"\ninventory = { static = \"gpus.toml\" }")
                .expect("static");
        assert_eq!(file.inventory, InventorySource::Static("gpus.toml".into()));
        let fallback: AgentConfig =
            toml::from_str("node_id = \"a\"\ninventory = { nvml_or_static = \"gpus.toml\" }")
                .expect("fallback");
        assert_eq!(
            fallback.inventory,
            InventorySource::NvmlOrStatic("gpus.toml".into())
        );
        assert!(toml::from_str::<AgentConfig>("inventory = \"cuda\"").is_err());
    }

    #[test]
    fn snapshot_repositories_name_a_host_and_a_path() {
        for ok in [
            "127.0.0.1:5000/snapshots",
            "registry.example.com/berth/snaps",
        ] {
            assert!(snapshot_repository_ok(ok), "{ok}");
        }
        for bad in [
            "snapshots",
            "127.0.0.1:5000",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/Snaps",
            "127.0.0.1:5000/s:tag",
            "127.0.0.1:5000/s@sha256:00",
        ] {
            assert!(!snapshot_repository_ok(bad), "{bad}");
        }
        let config = AgentConfig {
            node_id: "a".into(),
            snapshot_repository: "no-host".into(),
            snapshot_max_bytes: 1,
            ..AgentConfig::default()
        };
        let fields: Vec<String> = bad_fields(&config)
            .into_iter()
            .filter(|f| f.starts_with("snapshot"))
            .collect();
        assert_eq!(fields, ["snapshot_repository", "snapshot_max_bytes"]);
    }

    /// The fields `validate` names, in order.
    fn bad_fields(config: &AgentConfig) -> Vec<String> {
        let mut v = Validator::new();
        config.validate(&mut v, Path::new("/nonexistent"));
        v.finish()
            .expect_err("bad")
            .0
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn problems_are_collected() {
        let config = AgentConfig {
            node_id: "Node_1".into(),
            price_per_hour_usd: f64::NAN,
            inventory: InventorySource::Static("does-not-exist.toml".into()),
            labels: [("bad key!".to_string(), "v".to_string())].into(),
            ..AgentConfig::default()
        };
        assert_eq!(
            bad_fields(&config),
            [
                "node_id",
                "tls.ca",
                "tls.cert",
                "tls.key",
                "price_per_hour_usd",
                "inventory.static",
                "labels.bad key!"
            ]
        );
    }
}
