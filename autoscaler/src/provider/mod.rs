//! Providers: what carries the policy's decisions out on a cloud.
//!
//! A provider manages node groups as a cloud does instance groups: it is asked for more
//! nodes of a group, to remove given nodes, and what nodes a group has. Node ids are the
//! ids the nodes' agents register with the scheduler, so the autoscaler can tell which
//! requested nodes have arrived.
//!
//! Implementations:
//! - [`local`]: real `berth agent` processes on this machine with static inventories;
//! - [`sim`]: a seeded simulated cloud (delays, stockouts, quotas, spot interruptions);
//! - [`kubernetes`]: Cluster API `MachineDeployment`s through the Kubernetes API;
//! - [`external`]: any other cloud behind berth's `ProviderService` gRPC protocol.

use async_trait::async_trait;

use crate::config::NodeGroupConfig;

pub mod external;
pub mod kubernetes;
pub mod local;
pub mod sim;

/// Where a provider's node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InstanceState {
    /// Asked for; not running yet.
    Provisioning,
    /// Running (its agent may or may not have registered yet).
    Running,
    /// Being released.
    Deleting,
    /// The provider gave up on it (it still counts against nothing).
    Failed,
}

impl InstanceState {
    /// Stable lower-case name (metrics labels, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Provisioning => "provisioning",
            InstanceState::Running => "running",
            InstanceState::Deleting => "deleting",
            InstanceState::Failed => "failed",
        }
    }
}

/// One node as its provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderNode {
    /// The id its agent registers with the scheduler.
    pub id: String,
    /// State.
    pub state: InstanceState,
    /// The provider announced it will take this (spot) node back.
    pub interruption_notice: bool,
}

/// Why a provider call failed. The class decides what the autoscaler does next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The region has no capacity of the instance type: back off the group, fail over.
    #[error("stockout: {0}")]
    Stockout(String),
    /// An account or project quota was hit: back off the group, fail over.
    #[error("quota: {0}")]
    Quota(String),
    /// Worth retrying soon (timeouts, 5xx, conflicts that persisted).
    #[error("transient: {0}")]
    Transient(String),
    /// Will not go away by retrying (bad credentials, unknown group, bad request).
    #[error("{0}")]
    Permanent(String),
}

impl ProviderError {
    /// Metrics label: `stockout`, `quota`, `transient` or `permanent`.
    pub fn class(&self) -> &'static str {
        match self {
            ProviderError::Stockout(_) => "stockout",
            ProviderError::Quota(_) => "quota",
            ProviderError::Transient(_) => "transient",
            ProviderError::Permanent(_) => "permanent",
        }
    }
}

/// A cloud (or anything that starts nodes) as the autoscaler drives it.
///
/// Calls may take seconds (cloud APIs); the autoscaler bounds each with a timeout.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Asks for `count` more nodes of `group`.
    async fn scale_up(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError>;

    /// Releases these nodes of `group` (the autoscaler has cordoned them and they are empty).
    async fn remove(&self, group: &NodeGroupConfig, nodes: &[String]) -> Result<(), ProviderError>;

    /// The nodes `group` has, in every state but gone.
    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError>;
}

/// What building the configured providers needs from the process around them.
#[derive(Clone)]
pub struct Environment {
    /// The `berth` binary the local provider starts agents with.
    pub berth_binary: std::path::PathBuf,
    /// Scheduler endpoints the local provider's agents report to.
    pub schedulers: Vec<String>,
    /// Clock of the sim providers (the caller moves it).
    pub sim_clock: sim::SimClock,
    /// Per-call timeout of the external providers.
    pub call_timeout: std::time::Duration,
    /// Writes the local provider's agent configs; `None` where no agent can run (a config
    /// with a local provider is then refused).
    pub agent_config: Option<local::AgentConfigWriter>,
    /// The autoscaler's TLS towards external providers (`None`: plaintext).
    pub tls: Option<berth_net::Tls>,
}

/// The configured providers, by name, plus the local ones (to stop their agents on exit).
pub struct Built {
    /// Every provider by its config name.
    pub providers: std::collections::BTreeMap<String, std::sync::Arc<dyn Provider>>,
    /// The local providers among them.
    pub local: Vec<std::sync::Arc<local::LocalProvider>>,
}

/// Builds every provider of a validated config.
pub async fn build(
    cfg: &crate::config::AutoscalerConfig,
    env: &Environment,
) -> Result<Built, String> {
    use crate::config::ProviderConfig;
    use std::sync::Arc;
    let mut built = Built {
        providers: std::collections::BTreeMap::new(),
        local: Vec::new(),
    };
    for (name, provider) in &cfg.providers {
        let p: Arc<dyn Provider> = match provider {
            ProviderConfig::Local { work_dir, runtime } => {
                let writer = env.agent_config.clone().ok_or_else(|| {
                    format!(
                        "providers.{name}: a local provider needs the berth binary to start agents"
                    )
                })?;
                let local = Arc::new(local::LocalProvider::new(
                    std::path::Path::new(work_dir),
                    env.berth_binary.clone(),
                    env.schedulers.clone(),
                    runtime,
                    writer,
                ));
                built.local.push(local.clone());
                local
            }
            ProviderConfig::Sim(sim) => {
                Arc::new(sim::SimCloud::new(name, sim.clone(), env.sim_clock.clone()))
            }
            ProviderConfig::Kubernetes {
                namespace,
                kubeconfig,
            } => Arc::new(
                kubernetes::KubernetesProvider::new(namespace, kubeconfig)
                    .await
                    .map_err(|e| format!("providers.{name}: {e}"))?,
            ),
            ProviderConfig::External { endpoint } => Arc::new(
                external::ExternalProvider::connect_lazy_tls(
                    endpoint,
                    env.call_timeout,
                    env.tls.as_ref(),
                )
                .map_err(|e| format!("providers.{name}: {e}"))?,
            ),
        };
        built.providers.insert(name.clone(), p);
    }
    Ok(built)
}
