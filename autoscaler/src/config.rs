//! The `[autoscaler]` section of a berth config file: node groups, providers, and the limits
//! the policy never crosses (max nodes, scale-up rate, $/hour budget).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use berth_proto::gpu::request::MAX_GPUS_PER_SANDBOX;
use berth_proto::node::CapacityType;
use berth_proto::{GpuModelName, Validator};

/// Most node groups in one config.
pub const MAX_NODE_GROUPS: usize = 1024;

/// Autoscaler configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoscalerConfig {
    /// Scheduler replicas to read demand from and hold the autoscaler lease on.
    pub schedulers: Vec<String>,
    /// Time between decisions.
    pub interval_ms: u64,
    /// A node idle for this long is cordoned and removed (emptiest first).
    pub scale_down_cooldown_s: u64,
    /// Most nodes requested across all groups in any one minute.
    pub max_scale_up_nodes_per_minute: u32,
    /// Most nodes across all groups.
    pub max_nodes_total: u32,
    /// Spend ceiling: the $/hour of all nodes, running and requested, never exceeds it.
    pub budget_usd_per_hour: f64,
    /// Keep at least this many free whole GPUs ready per model ("H100" = 8).
    pub headroom_gpus: BTreeMap<String, u32>,
    /// Per-group backoff after stockouts and quota errors.
    pub backoff: BackoffConfig,
    /// Providers by name; node groups refer to them.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Groups of identical nodes the autoscaler may buy.
    pub node_groups: Vec<NodeGroupConfig>,
    /// A node that has not registered this long after the provider listed it is released
    /// and its group backed off (a cloud that accepted the request but never delivered).
    pub provision_timeout_s: u64,
    /// Which capacity type scale-up tries first for sandboxes that accept either.
    pub capacity_preference: CapacityPreference,
    /// Per-tenant override of `capacity_preference`.
    pub tenant_capacity_preference: BTreeMap<String, CapacityPreference>,
    /// The autoscaler's certificate (`spiffe://CLUSTER/autoscaler/NAME`), key and the
    /// cluster CA, used towards the replicas and external providers; or `insecure = true`.
    pub tls: berth_net::TlsSettings,
}

/// Spot or on-demand first, for sandboxes that accept either.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityPreference {
    /// Cheapest per sandbox slot, whatever the capacity type.
    #[default]
    Cheapest,
    /// Spot groups first, on-demand when no spot group can serve.
    Spot,
    /// On-demand groups first, spot when no on-demand group can serve.
    OnDemand,
}

/// Exponential backoff of a node group after a provider error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// First backoff.
    pub initial_s: u64,
    /// Ceiling.
    pub max_s: u64,
}

/// How to reach one provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// Starts `berth agent` processes on this machine with static inventories.
    Local {
        /// Folder for the agents' state and logs.
        #[serde(default = "default_local_dir")]
        work_dir: String,
        /// Sandbox runtime of the agents: "gvisor", "process", or "auto" (gvisor when
        /// runsc is installed).
        #[serde(default = "default_local_runtime")]
        runtime: String,
    },
    /// Scales Cluster API `MachineDeployment`s through the Kubernetes API.
    Kubernetes {
        /// Namespace of the MachineDeployments.
        namespace: String,
        /// Kubeconfig path; empty = in-cluster config.
        #[serde(default)]
        kubeconfig: String,
    },
    /// Seeded simulated cloud (the simulator and tests).
    Sim(SimCloudConfig),
    /// Any other cloud, through berth's external-provider gRPC protocol.
    External {
        /// `host:port` of the provider service.
        endpoint: String,
    },
}

/// A simulated cloud: provisioning delays, stockout windows, a node quota and spot
/// interruptions, all drawn from one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimCloudConfig {
    /// Seed of its delays and interruptions.
    pub seed: u64,
    /// Shortest provisioning delay (request to agent registered).
    pub delay_s_min: u64,
    /// Longest provisioning delay; delays are uniform between the two.
    pub delay_s_max: u64,
    /// Most nodes alive at once across the provider's groups (an account quota); 0 = none.
    pub quota_nodes: u32,
    /// Windows when a region has no capacity: scale-ups there fail with a stockout.
    pub stockouts: Vec<SimStockout>,
    /// Mean interruptions per spot node-hour (a spot node gets a notice 120 s before).
    pub spot_interruptions_per_hour: f64,
}

impl Default for SimCloudConfig {
    fn default() -> Self {
        SimCloudConfig {
            seed: 0,
            delay_s_min: 60,
            delay_s_max: 180,
            quota_nodes: 0,
            stockouts: Vec::new(),
            spot_interruptions_per_hour: 0.0,
        }
    }
}

/// A stockout window of a simulated cloud.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimStockout {
    /// Region out of capacity.
    pub region: String,
    /// Only this instance type; empty = every type in the region.
    #[serde(default)]
    pub instance_type: String,
    /// Start, seconds of virtual time.
    pub start_s: u64,
    /// End (exclusive).
    pub end_s: u64,
}

fn default_local_runtime() -> String {
    "auto".into()
}

fn default_local_dir() -> String {
    "berth-data/local-provider".into()
}

/// A group of identical nodes in one provider region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGroupConfig {
    /// Unique name.
    pub name: String,
    /// Key into `providers`.
    pub provider: String,
    /// Provider region.
    pub region: String,
    /// Provider instance type.
    pub instance_type: String,
    /// GPU model of the instance ("H100"); absent for CPU-only groups.
    #[serde(default)]
    pub gpu_model: Option<String>,
    /// GPUs per node.
    #[serde(default)]
    pub gpu_count: u32,
    /// Allocatable CPU per node.
    pub cpu_milli: u64,
    /// Allocatable memory per node.
    pub memory_mib: u64,
    /// Price per node-hour.
    pub price_per_hour_usd: f64,
    /// On-demand or spot.
    #[serde(default = "on_demand")]
    pub capacity_type: CapacityType,
    /// Nodes kept even when idle.
    #[serde(default)]
    pub min_nodes: u32,
    /// Most nodes.
    pub max_nodes: u32,
    /// Labels the group's nodes carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn on_demand() -> CapacityType {
    CapacityType::OnDemand
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig {
            schedulers: vec!["127.0.0.1:7070".into()],
            interval_ms: 5_000,
            scale_down_cooldown_s: 600,
            max_scale_up_nodes_per_minute: 100,
            max_nodes_total: 10_000,
            budget_usd_per_hour: 10_000.0,
            headroom_gpus: BTreeMap::new(),
            backoff: BackoffConfig::default(),
            providers: BTreeMap::new(),
            node_groups: Vec::new(),
            provision_timeout_s: 900,
            capacity_preference: CapacityPreference::Cheapest,
            tenant_capacity_preference: BTreeMap::new(),
            tls: berth_net::TlsSettings::default(),
        }
    }
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial_s: 30,
            max_s: 900,
        }
    }
}

impl AutoscalerConfig {
    /// Records every problem under the validator's current path.
    pub fn validate(&self, v: &mut Validator) {
        if let Some(id) = v.nested("tls", |v| self.tls.validate(v)) {
            v.check(
                matches!(
                    id.role,
                    berth_net::Role::Autoscaler(_) | berth_net::Role::Admin(_)
                ),
                "tls.cert",
                || format!("names {id}; the autoscaler needs an autoscaler/NAME identity"),
            );
        }
        self.validate_policy(v);
    }

    /// Everything but `tls`: what the simulator checks (it runs the policy against a
    /// simulated cluster and never opens a connection).
    pub fn validate_policy(&self, v: &mut Validator) {
        v.check(!self.schedulers.is_empty(), "schedulers", || {
            "must list at least one".into()
        });
        for (i, address) in self.schedulers.iter().enumerate() {
            v.address(&format!("schedulers[{i}]"), address);
        }
        v.check(
            (100..=3_600_000).contains(&self.interval_ms),
            "interval_ms",
            || format!("{} is outside 100..=3600000", self.interval_ms),
        );
        v.check(self.provision_timeout_s >= 1, "provision_timeout_s", || {
            "must be at least 1".into()
        });
        v.check(
            self.max_scale_up_nodes_per_minute >= 1,
            "max_scale_up_nodes_per_minute",
            || "must be at least 1".into(),
        );
        v.check(self.max_nodes_total >= 1, "max_nodes_total", || {
            "must be at least 1".into()
        });
        v.check(
            self.budget_usd_per_hour.is_finite() && self.budget_usd_per_hour > 0.0,
            "budget_usd_per_hour",
            || format!("{} must be a finite number > 0", self.budget_usd_per_hour),
        );
        for model in self.headroom_gpus.keys() {
            v.check(
                GpuModelName::resolve(model).known().is_some(),
                &format!("headroom_gpus.{model}"),
                || format!("{model:?} is not a catalog GPU model"),
            );
        }
        v.nested("backoff", |v| {
            v.check(self.backoff.initial_s >= 1, "initial_s", || {
                "must be at least 1".into()
            });
            v.check(
                self.backoff.max_s >= self.backoff.initial_s,
                "max_s",
                || {
                    format!(
                        "{} is below initial_s ({})",
                        self.backoff.max_s, self.backoff.initial_s
                    )
                },
            );
        });
        for (name, provider) in &self.providers {
            v.nested("providers", |v| {
                v.nested(name.as_str(), |v| {
                    v.identifier("", name, 63);
                    provider.validate(v);
                });
            });
        }
        if self.node_groups.len() > MAX_NODE_GROUPS {
            v.error(
                "node_groups",
                format!(
                    "{} groups; the limit is {MAX_NODE_GROUPS}",
                    self.node_groups.len()
                ),
            );
        }
        for (i, group) in self.node_groups.iter().enumerate() {
            v.nested("node_groups", |v| {
                v.nested(format!("[{i}]"), |v| {
                    if let Some(first) = self.node_groups[..i]
                        .iter()
                        .position(|g| g.name == group.name)
                    {
                        v.error(
                            "name",
                            format!("{:?} is also the name of node_groups[{first}]", group.name),
                        );
                    }
                    group.validate(v, &self.providers);
                });
            });
        }
        let min_total: u64 = self
            .node_groups
            .iter()
            .map(|g| u64::from(g.min_nodes))
            .sum();
        v.check(
            min_total <= u64::from(self.max_nodes_total),
            "max_nodes_total",
            || {
                format!(
                    "{} is below the sum of node_groups[].min_nodes ({min_total})",
                    self.max_nodes_total
                )
            },
        );
        let min_cost: f64 = self
            .node_groups
            .iter()
            .map(|g| f64::from(g.min_nodes) * g.price_per_hour_usd)
            .sum();
        v.check(
            min_cost <= self.budget_usd_per_hour,
            "budget_usd_per_hour",
            || {
                format!(
                    "{} is below the cost of every group's min_nodes (${min_cost:.2}/hour)",
                    self.budget_usd_per_hour
                )
            },
        );
    }
}

impl ProviderConfig {
    fn validate(&self, v: &mut Validator) {
        match self {
            ProviderConfig::Local { work_dir, runtime } => {
                v.check(!work_dir.trim().is_empty(), "work_dir", || {
                    "must be set".into()
                });
                v.check(
                    ["auto", "gvisor", "process"].contains(&runtime.as_str()),
                    "runtime",
                    || format!("{runtime:?} is not one of \"auto\", \"gvisor\", \"process\""),
                );
            }
            ProviderConfig::Kubernetes { namespace, .. } => {
                v.identifier("namespace", namespace, 63)
            }
            ProviderConfig::Sim(sim) => {
                v.check(sim.delay_s_max >= sim.delay_s_min, "delay_s_max", || {
                    format!(
                        "{} is below delay_s_min ({})",
                        sim.delay_s_max, sim.delay_s_min
                    )
                });
                v.check(
                    sim.spot_interruptions_per_hour.is_finite()
                        && sim.spot_interruptions_per_hour >= 0.0,
                    "spot_interruptions_per_hour",
                    || "must be a finite number >= 0".into(),
                );
                for (i, window) in sim.stockouts.iter().enumerate() {
                    v.check(
                        window.end_s > window.start_s,
                        &format!("stockouts[{i}].end_s"),
                        || format!("{} is not after start_s ({})", window.end_s, window.start_s),
                    );
                }
            }
            ProviderConfig::External { endpoint } => v.address("endpoint", endpoint),
        }
    }
}

impl NodeGroupConfig {
    fn validate(&self, v: &mut Validator, providers: &BTreeMap<String, ProviderConfig>) {
        v.identifier("name", &self.name, 63);
        v.check(providers.contains_key(&self.provider), "provider", || {
            let known: Vec<&str> = providers.keys().map(String::as_str).collect();
            format!(
                "{:?} is not one of the configured providers {known:?}",
                self.provider
            )
        });
        v.identifier("region", &self.region, 63);
        v.check(
            !self.instance_type.trim().is_empty(),
            "instance_type",
            || "must be set".into(),
        );
        match (&self.gpu_model, self.gpu_count) {
            (Some(model), 0) => v.error(
                "gpu_count",
                format!("must be at least 1 with gpu_model = {model:?}"),
            ),
            (None, n) if n > 0 => v.error("gpu_model", format!("must be set with gpu_count = {n}")),
            (Some(model), _) if model.trim().is_empty() => {
                v.error("gpu_model", "must not be empty")
            }
            _ => {}
        }
        v.check(self.gpu_count <= MAX_GPUS_PER_SANDBOX, "gpu_count", || {
            format!("{} is above {MAX_GPUS_PER_SANDBOX}", self.gpu_count)
        });
        v.check(self.cpu_milli > 0, "cpu_milli", || "must be > 0".into());
        v.check(self.memory_mib > 0, "memory_mib", || "must be > 0".into());
        v.check(
            self.price_per_hour_usd.is_finite() && self.price_per_hour_usd >= 0.0,
            "price_per_hour_usd",
            || format!("{} must be a finite number >= 0", self.price_per_hour_usd),
        );
        v.check(self.max_nodes >= 1, "max_nodes", || {
            "must be at least 1".into()
        });
        v.check(self.min_nodes <= self.max_nodes, "min_nodes", || {
            format!("{} is above max_nodes ({})", self.min_nodes, self.max_nodes)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        budget_usd_per_hour = 500.0
        headroom_gpus = { H100 = 8 }
        [providers.aws]
        kind = "external"
        endpoint = "127.0.0.1:7400"
        [[node_groups]]
        name = "aws-use1-p5"
        provider = "aws"
        region = "us-east-1"
        instance_type = "p5.48xlarge"
        gpu_model = "H100"
        gpu_count = 8
        cpu_milli = 192000
        memory_mib = 2000000
        price_per_hour_usd = 98.32
        max_nodes = 4

        [tls]
        insecure = true
    "#;

    fn errors(config: &AutoscalerConfig) -> Vec<String> {
        let mut v = Validator::new();
        config.validate(&mut v);
        v.finish().map_or_else(
            |e| e.0.into_iter().map(|e| e.to_string()).collect(),
            |()| vec![],
        )
    }

    #[test]
    fn example_is_valid() {
        let config: AutoscalerConfig = toml::from_str(EXAMPLE).expect("parses");
        assert_eq!(errors(&config), Vec::<String>::new());
        assert_eq!(config.node_groups[0].capacity_type, CapacityType::OnDemand);
    }

    #[test]
    fn tls_is_required_unless_insecure_but_not_by_the_simulator() {
        let mut config: AutoscalerConfig = toml::from_str(EXAMPLE).expect("parses");
        config.tls = berth_net::TlsSettings::default();
        let named: Vec<String> = errors(&config)
            .iter()
            .filter_map(|e| e.split(':').next().map(str::to_owned))
            .collect();
        assert_eq!(named, ["tls.ca", "tls.cert", "tls.key"]);
        let mut v = Validator::new();
        config.validate_policy(&mut v);
        assert!(v.finish().is_ok());
    }

    #[test]
    fn sim_and_local_providers_parse_and_name_bad_fields() {
        let text = r#"
            [providers.sim]
            kind = "sim"
            seed = 4
            delay_s_min = 30
            delay_s_max = 10
            stockouts = [{ region = "us-east-1", start_s = 100, end_s = 50 }]
            [providers.here]
            kind = "local"
            runtime = "docker"
        "#;
        let config: AutoscalerConfig = toml::from_str(text).expect("parses");
        let ProviderConfig::Sim(sim) = &config.providers["sim"] else {
            panic!("a sim provider: {config:?}");
        };
        assert_eq!(sim.seed, 4);
        assert_eq!(sim.stockouts[0].region, "us-east-1");
        let errors = errors(&config);
        for field in [
            "providers.sim.delay_s_max",
            "providers.sim.stockouts[0].end_s",
            "providers.here.runtime",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(field)),
                "{field} not named in {errors:?}"
            );
        }
        let unknown =
            toml::from_str::<AutoscalerConfig>("[providers.sim]\nkind = \"sim\"\nsed = 4\n")
                .expect_err("a typo");
        assert!(unknown.to_string().contains("sed"), "{unknown}");
    }

    #[test]
    fn cross_field_problems_are_reported_together() {
        let mut config: AutoscalerConfig = toml::from_str(EXAMPLE).expect("parses");
        let mut second = config.node_groups[0].clone();
        second.provider = "gcp".into();
        second.min_nodes = 9;
        config.node_groups.push(second);
        config.headroom_gpus.insert("H1000".into(), 1);
        assert_eq!(
            errors(&config),
            [
                "headroom_gpus.H1000: \"H1000\" is not a catalog GPU model",
                "node_groups[1].name: \"aws-use1-p5\" is also the name of node_groups[0]",
                "node_groups[1].provider: \"gcp\" is not one of the configured providers [\"aws\"]",
                "node_groups[1].min_nodes: 9 is above max_nodes (4)",
                "budget_usd_per_hour: 500 is below the cost of every group's min_nodes ($884.88/hour)",
            ]
        );
    }
}
