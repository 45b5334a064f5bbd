//! Node transitions: registration (with an agent's re-adoption and reports), status,
//! removal.

use std::collections::BTreeMap;

use berth_proto::Validator;

use super::command::{Rejection, StatusChange};
use super::{NodeRecord, State};
use crate::model::{NodeSpec, NodeStatus, SandboxId, SandboxState};

use super::apply::truncate;

impl State {
    /// Registers or re-registers a node. Its Unknown sandboxes return to what they were
    /// (the node is back). With `has` (an agent's registration), the agent's report of a
    /// sandbox stands (Exited with its code, Failed, Running), and a sandbox the state has
    /// Running there that the agent does not have is Lost.
    pub(super) fn register_node(
        &mut self,
        spec: &NodeSpec,
        has: Option<&BTreeMap<SandboxId, StatusChange>>,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let mut v = Validator::new();
        spec.validate(&mut v);
        v.finish().map_err(Rejection::InvalidSpec)?;
        let Some(existing) = self.nodes.get_mut(&spec.id) else {
            self.nodes.insert(
                spec.id.clone(),
                NodeRecord {
                    spec: spec.clone(),
                    status: NodeStatus::Ready,
                    status_reason: String::new(),
                    // The revision of the registration: unique and increasing even across a
                    // remove and re-add, so a plan for an earlier registration is always stale.
                    epoch: self.revision,
                    cpu_milli_allocated: 0,
                    memory_mib_allocated: 0,
                    gpu_milli_allocated: vec![0; spec.gpus.len()],
                    sandboxes: Default::default(),
                    snapshots: Default::default(),
                    standby: Default::default(),
                },
            );
            return Ok(());
        };
        existing.epoch = self.revision;
        existing.spec = spec.clone();
        if existing.status == NodeStatus::Down {
            existing.status = NodeStatus::Ready;
            existing.status_reason = "re-registered".into();
        }
        // Re-adopt what still fits the new inventory; what does not is Lost.
        let held: Vec<SandboxId> = existing.sandboxes.iter().copied().collect();
        existing.cpu_milli_allocated = 0;
        existing.memory_mib_allocated = 0;
        existing.gpu_milli_allocated = vec![0; spec.gpus.len()];
        existing.sandboxes.clear();
        for id in held {
            // Tenant usage is recomputed along with the node's: released here, re-held below.
            // Resources are already off the node and tenant, so `finish` must not release.
            self.account_tenant(id, false);
            self.reconnect(id);
            let report = has.and_then(|has| has.get(&id));
            match report {
                Some(StatusChange::Exited { code }) => {
                    self.finish(id, SandboxState::Exited { code: *code }, now_ms, false);
                    continue;
                }
                Some(StatusChange::Failed { reason }) => {
                    let reason = truncate(reason, 1024);
                    self.finish(id, SandboxState::Failed { reason }, now_ms, false);
                    continue;
                }
                // Checkpointed while the agent was away: it holds nothing any more. A pause
                // report for a sandbox that was not Running or Pausing is not believed.
                Some(StatusChange::Paused { bytes, mode })
                    if self.paused(id, *bytes, *mode, now_ms, false).is_ok() =>
                {
                    continue;
                }
                Some(
                    StatusChange::Running
                    | StatusChange::Standby
                    | StatusChange::Paused { .. }
                    | StatusChange::PauseFailed { .. },
                )
                | None => {}
            }
            let Some(sandbox) = self.sandboxes.get(&id) else {
                continue;
            };
            let started = matches!(
                sandbox.state,
                SandboxState::Running | SandboxState::Pausing | SandboxState::Standby { .. }
            );
            // On standby, it holds no CPU: as the state says, or as the agent reports of a
            // sandbox it had running (frozen while the node was away). One on its way back
            // from standby (Scheduled) is thawed by the assignment the new stream sends.
            let standby = matches!(sandbox.state, SandboxState::Standby { .. })
                || (sandbox.state == SandboxState::Running
                    && report == Some(&StatusChange::Standby));
            let cpu_needed = if standby { 0 } else { sandbox.spec.cpu_milli };
            if has.is_some() && report.is_none() && started {
                let reason = format!("the agent on {} restarted without it", spec.id);
                self.finish(id, SandboxState::Lost { reason }, now_ms, false);
                continue;
            }
            let node = self.nodes.get(&spec.id);
            let fits = match (&sandbox.binding, node) {
                (Some(b), Some(node)) => {
                    b.placement.gpu_indices.iter().all(|i| {
                        node.gpu_milli_free(*i as usize) >= b.placement.gpu_milli_per_gpu
                            && spec.gpus.get(*i as usize).map(|g| &g.model) == b.gpu_model.as_ref()
                    }) && node.cpu_milli_free() >= cpu_needed
                        && node.memory_mib_free() >= sandbox.spec.memory_mib
                }
                _ => false,
            };
            if fits {
                if let Some(record) = self.nodes.get_mut(&spec.id) {
                    if standby {
                        record.standby.insert(id);
                    } else {
                        record.standby.remove(&id);
                    }
                }
                self.hold(id);
                if report == Some(&StatusChange::Running) {
                    self.mark_running(id, now_ms);
                }
                if standby {
                    self.mark_standby(id, now_ms);
                }
            } else {
                let reason = format!(
                    "node {} re-registered without the resources it was bound to",
                    spec.id
                );
                self.finish(id, SandboxState::Lost { reason }, now_ms, false);
            }
        }
        if let Some(has) = has {
            self.lose_missing_snapshots(&spec.id, has, now_ms);
        }
        Ok(())
    }

    /// A registering agent that no longer has a snapshot the state places on its node
    /// (its disk was lost or wiped): the sandboxes paused to it are Lost.
    fn lose_missing_snapshots(
        &mut self,
        node: &str,
        has: &BTreeMap<SandboxId, StatusChange>,
        now_ms: u64,
    ) {
        let missing: Vec<SandboxId> = self
            .nodes
            .get(node)
            .map(|n| {
                n.snapshots
                    .iter()
                    .filter(|id| !has.contains_key(id))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for id in missing {
            let reason = format!("the agent on {node} restarted without its snapshot");
            self.finish(id, SandboxState::Lost { reason }, now_ms, false);
        }
    }

    pub(super) fn set_node_status(
        &mut self,
        id: &str,
        status: NodeStatus,
        reason: &str,
        now_ms: u64,
    ) -> Result<(), Rejection> {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| Rejection::UnknownNode(id.to_owned()))?;
        if node.status == NodeStatus::Down && status != NodeStatus::Down {
            return Err(Rejection::MustReregister(id.to_owned()));
        }
        let reason = truncate(reason, 1024);
        node.status = status;
        node.status_reason = reason.clone();
        if status == NodeStatus::Down {
            let held: Vec<SandboxId> = node.sandboxes.iter().copied().collect();
            for sandbox in held {
                self.finish(
                    sandbox,
                    SandboxState::Lost {
                        reason: format!("node {id} is down: {reason}"),
                    },
                    now_ms,
                    true,
                );
            }
        }
        Ok(())
    }

    pub(super) fn remove_node(&mut self, id: &str, now_ms: u64) -> Result<(), Rejection> {
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| Rejection::UnknownNode(id.to_owned()))?;
        if !node.sandboxes.is_empty() {
            return Err(Rejection::NodeNotEmpty {
                node: id.to_owned(),
                count: node.sandboxes.len(),
            });
        }
        let snapshots: Vec<SandboxId> = node.snapshots.iter().copied().collect();
        for sandbox in snapshots {
            let reason = format!("node {id}, which held its snapshot, was removed");
            self.finish(sandbox, SandboxState::Lost { reason }, now_ms, false);
        }
        self.nodes.remove(id);
        Ok(())
    }
}
