//! `local`: nodes are real `berth agent` processes on this machine, each with a static GPU
//! inventory of its group's instance type. The default provider of `berth dev`.
//!
//! A scale-up writes, per node, an inventory file (the group's CPU, memory and GPUs, named
//! as NVML would name them) and an agent config under `work_dir/NODE/`, then starts
//! `berth agent --config … --stop-sandboxes-on-exit --exit-with-parent` with its output in
//! `agent.log` there (the agent exits when this process does, even on SIGKILL).
//! The node id is `GROUP-N`; the agent carries the group in the `berth.dev/node-group`
//! label. A removal sends SIGTERM (the agent stops its sandboxes and exits) and SIGKILL
//! after a grace period. A node whose process has exited lists as Failed until removed.
//! Dropping the provider kills what is left (`kill_on_drop`); [`LocalProvider::shutdown`]
//! stops them gracefully.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use berth_node_agent::AgentConfig;
use berth_node_agent::config::{InventorySource, RuntimeKind};
use berth_proto::GpuModelName;

use super::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::config::NodeGroupConfig;
use crate::policy::decide::GROUP_LABEL;

/// How long a removed agent gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts and stops `berth agent` processes.
pub struct LocalProvider {
    work_dir: PathBuf,
    berth: PathBuf,
    schedulers: Vec<String>,
    runtime: RuntimeKind,
    children: Mutex<Children>,
}

#[derive(Default)]
struct Children {
    next: BTreeMap<String, u64>,
    nodes: BTreeMap<String, BTreeMap<String, Child>>,
}

impl LocalProvider {
    /// A provider whose agents run `berth` (this binary, usually), report to `schedulers`
    /// and keep their files under `work_dir`.
    pub fn new(
        work_dir: &Path,
        berth: PathBuf,
        schedulers: Vec<String>,
        runtime: RuntimeKind,
    ) -> LocalProvider {
        LocalProvider {
            work_dir: work_dir.to_path_buf(),
            berth,
            schedulers,
            runtime,
            children: Mutex::new(Children::default()),
        }
    }

    /// SIGTERM to every agent, then waits for them (SIGKILL after [`STOP_GRACE`]).
    pub async fn shutdown(&self) {
        let mut children = self.children.lock().await;
        let all: Vec<Child> = std::mem::take(&mut children.nodes)
            .into_values()
            .flat_map(BTreeMap::into_values)
            .collect();
        for child in &all {
            terminate(child);
        }
        for child in all {
            reap(child).await;
        }
    }

    fn write_files(&self, group: &NodeGroupConfig, id: &str) -> Result<PathBuf, ProviderError> {
        let dir = self.work_dir.join(id);
        let io = |what: &str, e: std::io::Error| {
            ProviderError::Permanent(format!("local: {what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(|e| io("creating", e))?;
        let mut inventory = format!(
            "# {} ({}), written by the local provider.\ncpu_milli = {}\nmemory_mib = {}\n",
            group.instance_type, group.name, group.cpu_milli, group.memory_mib
        );
        if let (Some(model), true) = (&group.gpu_model, group.gpu_count > 0) {
            let model = GpuModelName::resolve(model);
            let (product, memory) = model.known().map_or_else(
                || (model.as_str().to_owned(), 0),
                |m| {
                    let info = m.info();
                    let product = info
                        .nvml_product_names
                        .first()
                        .copied()
                        .unwrap_or(info.name);
                    (product.to_owned(), info.memory_mib)
                },
            );
            inventory.push_str(&format!(
                "\n[[gpus]]\nproduct_name = {product:?}\nmemory_mib = {memory}\ncount = {}\n",
                group.gpu_count
            ));
        }
        std::fs::write(dir.join("inventory.toml"), inventory)
            .map_err(|e| io("writing the inventory in", e))?;
        let mut labels = group.labels.clone();
        labels.insert(GROUP_LABEL.into(), group.name.clone());
        let agent = AgentConfig {
            node_id: id.to_owned(),
            schedulers: self.schedulers.clone(),
            provider: group.provider.clone(),
            region: group.region.clone(),
            instance_type: group.instance_type.clone(),
            capacity_type: group.capacity_type,
            price_per_hour_usd: group.price_per_hour_usd,
            inventory: InventorySource::Static(PathBuf::from("inventory.toml")),
            runtime: self.runtime,
            state_dir: dir.join("state").display().to_string(),
            reserved_cpu_milli: 0,
            reserved_memory_mib: 0,
            labels,
            ..AgentConfig::default()
        };
        #[derive(serde::Serialize)]
        struct File {
            agent: AgentConfig,
        }
        let body = toml::to_string(&File { agent })
            .map_err(|e| ProviderError::Permanent(format!("local: agent config for {id}: {e}")))?;
        let config = dir.join("agent.toml");
        std::fs::write(&config, body).map_err(|e| io("writing the agent config in", e))?;
        Ok(config)
    }
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

async fn reap(mut child: Child) {
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

#[async_trait]
impl Provider for LocalProvider {
    async fn scale_up(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError> {
        let mut children = self.children.lock().await;
        for _ in 0..count {
            let n = children.next.entry(group.name.clone()).or_default();
            let id = format!("{}-{n}", group.name);
            *n += 1;
            let config = self.write_files(group, &id)?;
            let log = std::fs::File::create(self.work_dir.join(&id).join("agent.log"))
                .map_err(|e| ProviderError::Permanent(format!("local: agent log of {id}: {e}")))?;
            let err = log
                .try_clone()
                .map_err(|e| ProviderError::Permanent(format!("local: agent log of {id}: {e}")))?;
            let child = Command::new(&self.berth)
                .arg("agent")
                .arg("--config")
                .arg(&config)
                .arg("--stop-sandboxes-on-exit")
                .arg("--exit-with-parent")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    ProviderError::Permanent(format!(
                        "local: starting {} agent for {id}: {e}",
                        self.berth.display()
                    ))
                })?;
            tracing::info!(node = %id, group = %group.name, "local provider started an agent");
            children
                .nodes
                .entry(group.name.clone())
                .or_default()
                .insert(id, child);
        }
        Ok(())
    }

    async fn remove(&self, group: &NodeGroupConfig, nodes: &[String]) -> Result<(), ProviderError> {
        let removed: Vec<Child> = {
            let mut children = self.children.lock().await;
            let Some(list) = children.nodes.get_mut(&group.name) else {
                return Ok(());
            };
            nodes.iter().filter_map(|id| list.remove(id)).collect()
        };
        for child in &removed {
            terminate(child);
        }
        for child in removed {
            reap(child).await;
        }
        Ok(())
    }

    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError> {
        let mut children = self.children.lock().await;
        let Some(list) = children.nodes.get_mut(&group.name) else {
            return Ok(Vec::new());
        };
        Ok(list
            .iter_mut()
            .map(|(id, child)| ProviderNode {
                id: id.clone(),
                state: match child.try_wait() {
                    Ok(None) => InstanceState::Running,
                    _ => InstanceState::Failed,
                },
                interruption_notice: false,
            })
            .collect())
    }
}
