//! `local`: nodes are real `berth agent` processes on this machine, each with a static GPU
//! inventory of its group's instance type. The default provider of `berth dev`.
//!
//! A scale-up has the [`AgentConfigWriter`] (supplied by the `berth` binary, which owns the
//! agent's formats) write, per node, a static inventory of the group's CPU, memory and GPUs
//! and an agent config under `work_dir/NODE/`, then starts
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
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use super::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::config::NodeGroupConfig;

/// How long a removed agent gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the local provider asks its agent-config writer for: one node of a group.
#[derive(Debug, Clone, Copy)]
pub struct LocalNode<'a> {
    /// The node's group.
    pub group: &'a NodeGroupConfig,
    /// Node id (`GROUP-N`).
    pub id: &'a str,
    /// The node's own folder (created), for its config, inventory and state.
    pub dir: &'a Path,
    /// The provider's `runtime` setting ("auto", "gvisor" or "process").
    pub runtime: &'a str,
    /// Scheduler endpoints.
    pub schedulers: &'a [String],
}

/// Writes a node's `berth agent` config (and its static inventory) and returns the config's
/// path. The `berth` binary supplies it: the agent's file formats belong to the agent, and
/// the autoscaler crate does not depend on it.
pub type AgentConfigWriter = Arc<dyn Fn(&LocalNode<'_>) -> Result<PathBuf, String> + Send + Sync>;

/// Starts and stops `berth agent` processes.
pub struct LocalProvider {
    work_dir: PathBuf,
    berth: PathBuf,
    schedulers: Vec<String>,
    runtime: String,
    write_config: AgentConfigWriter,
    children: Mutex<Children>,
}

#[derive(Default)]
struct Children {
    next: BTreeMap<String, u64>,
    nodes: BTreeMap<String, BTreeMap<String, Child>>,
}

impl LocalProvider {
    /// A provider whose agents run `berth` (this binary, usually), report to `schedulers`,
    /// use the sandbox `runtime` setting and keep their files under `work_dir`;
    /// `write_config` writes each one's config.
    pub fn new(
        work_dir: &Path,
        berth: PathBuf,
        schedulers: Vec<String>,
        runtime: &str,
        write_config: AgentConfigWriter,
    ) -> LocalProvider {
        LocalProvider {
            work_dir: work_dir.to_path_buf(),
            berth,
            schedulers,
            runtime: runtime.to_owned(),
            write_config,
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
            let dir = self.work_dir.join(&id);
            std::fs::create_dir_all(&dir).map_err(|e| {
                ProviderError::Permanent(format!("local: creating {}: {e}", dir.display()))
            })?;
            let config = (self.write_config)(&LocalNode {
                group,
                id: &id,
                dir: &dir,
                runtime: &self.runtime,
                schedulers: &self.schedulers,
            })
            .map_err(|e| ProviderError::Permanent(format!("local: config of {id}: {e}")))?;
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
