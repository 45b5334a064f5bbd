//! The autoscaler process: a reconcile loop around the pure [`Policy`].
//!
//! Every `interval_ms`, the instance holding the autoscaler lease:
//! 1. takes or renews the lease in the scheduler's replicated state (an instance that does
//!    not get it does nothing and asks again next round: HA without split brain);
//! 2. reads the scheduler's capacity view (pending demand with reasons, every node with its
//!    free capacity) and each group's nodes from its provider; nodes a provider has that
//!    have not registered yet are in flight;
//! 3. cordons nodes with a spot interruption notice;
//! 4. asks the policy for a decision and carries out its scale-ups; a stockout or quota
//!    error backs the group off (exponentially, `backoff.initial_s` doubling to `max_s`)
//!    and the policy decides again at once, so demand fails over in the same round;
//! 5. removes idle nodes: cordon (committed through Raft, after which nothing can be bound
//!    there), check the node is still empty (if not, uncordon and keep it), release it at
//!    the provider, forget it in the scheduler;
//! 6. records what it did, one line per action with its reason, in the replicated state
//!    (`berth cluster status` shows them) and in the log and metrics.
//!
//! The wall clock is read here, in the loop, and passed to the policy as a number.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_core::convert;
use berth_net::Client;
use berth_proto::pb::v1 as pb;

use crate::config::{AutoscalerConfig, NodeGroupConfig};
use crate::metrics::Metrics;
use crate::policy::decide::{
    ExistingNode, GROUP_LABEL, GroupStatus, PendingSandbox, Policy, planning_placer,
};
use crate::provider::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::round::{Attempt, Memory};

/// Most decision lines sent with one lease renewal (the state keeps the latest 64).
const MAX_LINES_PER_ROUND: usize = 64;

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundReport {
    /// This instance holds the lease (when not, nothing else happened).
    pub held: bool,
    /// Nodes requested per group.
    pub scaled_up: Vec<(String, u32)>,
    /// Nodes removed.
    pub removed: Vec<String>,
    /// Nodes cordoned for a spot interruption.
    pub cordoned: Vec<String>,
    /// Pending sandboxes no group could serve.
    pub unmet: u32,
    /// The decision lines recorded.
    pub lines: Vec<String>,
}

/// The autoscaler loop's state.
pub struct Controller {
    cfg: AutoscalerConfig,
    policy: Policy,
    providers: BTreeMap<String, Arc<dyn Provider>>,
    client: Client,
    holder: String,
    metrics: Metrics,
    call_timeout: Duration,
    idle_since: HashMap<String, u64>,
    memory: Memory,
    noticed: BTreeSet<String>,
    /// When each provider node not yet registered was first listed.
    first_seen: HashMap<String, u64>,
    held: bool,
}

impl Controller {
    /// A controller for a validated config. `providers` maps the config's provider names to
    /// implementations; `holder` names this instance in the lease.
    pub fn new(
        cfg: AutoscalerConfig,
        providers: BTreeMap<String, Arc<dyn Provider>>,
        holder: String,
        metrics: Metrics,
        tls: Option<berth_net::Tls>,
    ) -> Controller {
        let credentials = berth_net::client::Credentials {
            tls: tls.clone(),
            token: None,
        };
        let mut client = Client::new(cfg.schedulers.clone())
            .with_credentials(credentials)
            .unwrap_or_else(|_| Client::new(cfg.schedulers.clone()));
        client.deadline = Duration::from_secs(10);
        Controller {
            policy: Policy::new(cfg.clone(), planning_placer()),
            cfg,
            providers,
            client,
            holder,
            metrics,
            call_timeout: Duration::from_secs(60),
            idle_since: HashMap::new(),
            memory: Memory::new(),
            noticed: BTreeSet::new(),
            first_seen: HashMap::new(),
            held: false,
        }
    }

    /// Runs rounds every `interval_ms` until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticker = tokio::time::interval(Duration::from_millis(self.cfg.interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick() => {
                    if let Err(e) = self.round(unix_ms()).await {
                        tracing::warn!(error = %e, "autoscaler round failed; retrying next round");
                    }
                }
            }
        }
    }

    fn ttl_ms(&self) -> u64 {
        (self.cfg.interval_ms * 3).max(2_000)
    }

    fn group(&self, name: &str) -> Option<&NodeGroupConfig> {
        self.cfg.node_groups.iter().find(|g| g.name == name)
    }

    fn provider(&self, group: &NodeGroupConfig) -> Option<Arc<dyn Provider>> {
        self.providers.get(&group.provider).cloned()
    }

    /// One round at `now_ms`.
    pub async fn round(&mut self, now_ms: u64) -> Result<RoundReport, String> {
        let lease = self
            .client
            .autoscaler_lease(&self.holder, self.ttl_ms(), Vec::new())
            .await
            .map_err(|s| format!("autoscaler lease: {}", s.message()))?;
        if !lease.granted {
            if self.held {
                tracing::warn!(holder = %lease.holder, "autoscaler lease lost");
            }
            self.held = false;
            self.metrics.lease_held.set(0);
            tracing::debug!(holder = %lease.holder, "waiting for the autoscaler lease");
            return Ok(RoundReport::default());
        }
        if !self.held {
            tracing::info!(holder = %self.holder, "holding the autoscaler lease");
        }
        self.held = true;
        self.metrics.lease_held.set(1);
        let mut report = RoundReport {
            held: true,
            ..RoundReport::default()
        };

        let view = self
            .client
            .capacity_view()
            .await
            .map_err(|s| format!("capacity view: {}", s.message()))?;
        let (nodes, pending) = self.read_view(&view, now_ms);
        let registered: BTreeSet<&str> = nodes.iter().map(|n| n.spec.id.as_str()).collect();

        // Each group's nodes at its provider.
        let mut status: BTreeMap<String, GroupStatus> = BTreeMap::new();
        let mut interrupted: Vec<(String, String)> = Vec::new();
        let mut stillborn: Vec<(NodeGroupConfig, Vec<String>)> = Vec::new();
        let mut spend = 0.0;
        self.metrics.nodes.reset();
        for group in self.cfg.node_groups.clone() {
            let mut s = GroupStatus::default();
            let listed = match self.list(&group).await {
                Ok(listed) => listed,
                Err(e) => {
                    // Without the list, in-flight nodes are unknown: buy nothing there now.
                    s.backoff_until_ms = s.backoff_until_ms.max(now_ms + 1);
                    s.last_error = Some(format!("listing nodes: {e}"));
                    status.insert(group.name.clone(), s);
                    continue;
                }
            };
            let timeout_ms = self.cfg.provision_timeout_s.saturating_mul(1000);
            let mut failed: Vec<String> = Vec::new();
            for n in &listed {
                if registered.contains(n.id.as_str()) {
                    self.first_seen.remove(&n.id);
                    continue;
                }
                let first = *self.first_seen.entry(n.id.clone()).or_insert(now_ms);
                if n.state == InstanceState::Failed
                    || (n.state != InstanceState::Deleting
                        && now_ms.saturating_sub(first) >= timeout_ms)
                {
                    failed.push(n.id.clone());
                }
            }
            if !failed.is_empty() {
                stillborn.push((group.clone(), failed.clone()));
            }
            for node in &listed {
                let known = registered.contains(node.id.as_str());
                let live = matches!(
                    node.state,
                    InstanceState::Provisioning | InstanceState::Running
                ) && !failed.contains(&node.id);
                if live {
                    spend += group.price_per_hour_usd;
                }
                if live && !known {
                    s.in_flight += 1;
                }
                let state = if known && live {
                    "registered"
                } else {
                    node.state.as_str()
                };
                self.metrics
                    .nodes
                    .with_label_values(&[group.name.as_str(), state])
                    .inc();
                if node.interruption_notice && known && self.noticed.insert(node.id.clone()) {
                    interrupted.push((node.id.clone(), group.name.clone()));
                }
            }
            status.insert(group.name.clone(), s);
        }
        self.metrics.usd_per_hour.set(spend);

        // Nodes that failed before registering: release them and back the group off, as
        // after a stockout (a group whose nodes never come up must not be bought forever).
        for (group, failed) in stillborn {
            let error = ProviderError::Transient(format!(
                "{} node(s) failed or did not register within provision_timeout_s: {}",
                failed.len(),
                failed.join(", ")
            ));
            self.count_error(&group, &error);
            let until = self.memory.back_off(&self.cfg, &group.name, &error, now_ms);
            if let Some(s) = status.get_mut(&group.name) {
                s.backoff_until_ms = until;
                s.last_error = Some(error.to_string());
            }
            // A failure is counted; the node is released again next round.
            let _ = self.release(&group, &failed).await;
            for id in &failed {
                self.first_seen.remove(id);
            }
            report.lines.push(line(
                now_ms,
                &format!(
                    "released {} in {} ({error}); backing off {} s",
                    failed.join(", "),
                    group.name,
                    until.saturating_sub(now_ms) / 1000
                ),
            ));
        }

        for (node, group) in interrupted {
            let reason = format!("spot interruption notice from the {group} provider");
            match self.client.cordon(&node, &reason).await {
                Ok(_) => {
                    self.metrics
                        .decisions
                        .with_label_values(&["cordon", "spot_interruption"])
                        .inc();
                    report
                        .lines
                        .push(line(now_ms, &format!("cordon {node} ({group}): {reason}")));
                    report.cordoned.push(node);
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e.message(), "cordoning an interrupted node")
                }
            }
        }

        // Decide, act, and decide again after a refusal, so demand fails over this round.
        let mut memory = std::mem::take(&mut self.memory);
        let (decision, attempts, decide_ms) = memory
            .decide_and_scale(
                &self.policy,
                now_ms,
                &pending,
                &nodes,
                &mut status,
                |g, n| {
                    let this = &*self;
                    async move { this.scale_up(&g, n).await }
                },
            )
            .await;
        self.memory = memory;
        self.metrics.decision_ms.set(decide_ms);
        for attempt in attempts {
            match attempt {
                Attempt::Granted {
                    group,
                    nodes,
                    reason,
                    causes,
                } => {
                    for (cause, n) in causes {
                        self.metrics
                            .decisions
                            .with_label_values(&["scale_up", cause.as_str()])
                            .inc_by(u64::from(n));
                    }
                    report.lines.push(line(
                        now_ms,
                        &format!("scale-up {group} +{nodes}: {reason}"),
                    ));
                    report.scaled_up.push((group, nodes));
                }
                Attempt::Refused {
                    group,
                    nodes,
                    error,
                    until_ms,
                } => report.lines.push(line(
                    now_ms,
                    &format!(
                        "scale-up {group} +{nodes} failed ({error}); backing off {} s",
                        until_ms.saturating_sub(now_ms) / 1000
                    ),
                )),
            }
        }
        self.metrics
            .groups_backing_off
            .set(self.memory.backing_off(now_ms) as i64);
        self.metrics.unmet.reset();
        for (reason, n) in &decision.unmet {
            self.metrics
                .unmet
                .with_label_values(&[reason.as_str()])
                .set(i64::from(*n));
        }
        report.unmet = decision.unmet.values().sum();
        if report.unmet > 0 && !report.scaled_up.is_empty() {
            let parts: Vec<String> = decision
                .unmet
                .iter()
                .map(|(r, n)| format!("{n} ({r})"))
                .collect();
            report
                .lines
                .push(line(now_ms, &format!("unmet: {}", parts.join(", "))));
        }

        for removal in &decision.remove {
            if let Some(done) = self
                .remove(
                    &removal.node,
                    &removal.group,
                    &removal.reason,
                    now_ms,
                    &mut report,
                )
                .await
            {
                report.removed.push(done);
            }
        }

        if !report.lines.is_empty() {
            for l in &report.lines {
                tracing::info!(decision = %l, "autoscaler");
            }
            let first = report.lines.len().saturating_sub(MAX_LINES_PER_ROUND);
            let lines = report.lines[first..].to_vec();
            if let Err(e) = self
                .client
                .autoscaler_lease(&self.holder, self.ttl_ms(), lines)
                .await
            {
                tracing::warn!(error = %e.message(), "recording autoscaler decisions");
            }
        }
        Ok(report)
    }

    /// The scheduler's nodes and pending demand, as the policy takes them.
    fn read_view(
        &mut self,
        view: &pb::CapacityViewResponse,
        now_ms: u64,
    ) -> (Vec<ExistingNode>, Vec<PendingSandbox>) {
        let mut nodes = Vec::with_capacity(view.nodes.len());
        let mut seen = HashMap::new();
        for capacity in &view.nodes {
            let Some(node) = &capacity.node else { continue };
            let Ok(spec) = convert::node_spec_from_pb(node.inventory.as_ref(), "node") else {
                continue;
            };
            let mut free: Vec<u32> = spec
                .gpus
                .iter()
                .map(|g| if g.healthy { 1000 } else { 0 })
                .collect();
            for a in &node.gpu_allocations {
                if let Some(f) = free.get_mut(a.index as usize) {
                    *f = f.saturating_sub(a.allocated_milli);
                }
            }
            let idle_since = if node.sandboxes == 0 {
                Some(*self.idle_since.entry(spec.id.clone()).or_insert(now_ms))
            } else {
                self.idle_since.remove(&spec.id);
                None
            };
            seen.insert(spec.id.clone(), ());
            nodes.push(ExistingNode {
                group: spec.labels.get(GROUP_LABEL).cloned(),
                ready: node.status == pb::NodeStatus::Ready as i32,
                cpu_milli_free: capacity.cpu_milli_free,
                memory_mib_free: capacity.memory_mib_free,
                gpu_milli_free: free,
                sandboxes: node.sandboxes,
                idle_since_ms: idle_since,
                spec: Arc::new(spec),
            });
        }
        self.idle_since.retain(|id, _| seen.contains_key(id));

        self.metrics.pending.reset();
        let mut pending = Vec::with_capacity(view.pending.len());
        for demand in &view.pending {
            let reasons: Vec<&str> = demand.reasons.iter().map(|r| r.reason.as_str()).collect();
            let reason = reasons.join("; ");
            self.metrics
                .pending
                .with_label_values(&[pending_reason(&reason)])
                .add(i64::from(demand.count));
            let spec = pb::SandboxSpec {
                tenant: demand.tenant.clone(),
                resources: demand.resources.clone(),
                constraints: demand.constraints.clone(),
                priority: demand.priority,
                ..Default::default()
            };
            match convert::spec_from_pb(Some(&spec), "pending") {
                Ok(spec) => pending.push(PendingSandbox {
                    id: berth_core::model::SandboxId(
                        demand
                            .sandbox_ids
                            .first()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                    ),
                    count: demand.count,
                    spec,
                    reason,
                }),
                Err(e) => tracing::warn!(error = %e.one_line(), "unreadable pending demand"),
            }
        }
        (nodes, pending)
    }

    /// One provider call for `group`, bounded by the call timeout; failures are logged and
    /// counted by class.
    async fn call<T, F, Fut>(
        &self,
        group: &NodeGroupConfig,
        what: &str,
        f: F,
    ) -> Result<T, ProviderError>
    where
        F: FnOnce(Arc<dyn Provider>) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let result = match self.provider(group) {
            None => Err(ProviderError::Permanent(format!(
                "provider {:?} is not configured",
                group.provider
            ))),
            Some(provider) => tokio::time::timeout(self.call_timeout, f(provider))
                .await
                .unwrap_or_else(|_| {
                    Err(ProviderError::Transient(format!(
                        "{what} timed out after {} s",
                        self.call_timeout.as_secs()
                    )))
                }),
        };
        if let Err(e) = &result {
            self.count_error(group, e);
        }
        result
    }

    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError> {
        self.call(group, "list", |p| async move { p.list(group).await })
            .await
    }

    async fn scale_up(&self, group: &NodeGroupConfig, n: u32) -> Result<(), ProviderError> {
        self.call(
            group,
            "scale-up",
            |p| async move { p.scale_up(group, n).await },
        )
        .await
    }

    async fn release(
        &self,
        group: &NodeGroupConfig,
        nodes: &[String],
    ) -> Result<(), ProviderError> {
        self.call(
            group,
            "remove",
            |p| async move { p.remove(group, nodes).await },
        )
        .await
    }

    fn count_error(&self, group: &NodeGroupConfig, e: &ProviderError) {
        tracing::warn!(group = %group.name, error = %e, "provider call failed");
        self.metrics
            .provider_errors
            .with_label_values(&[group.provider.as_str(), e.class()])
            .inc();
    }

    /// Cordons, re-checks, releases and forgets one idle node. Returns its id when gone.
    async fn remove(
        &mut self,
        node: &str,
        group_name: &str,
        reason: &str,
        now_ms: u64,
        report: &mut RoundReport,
    ) -> Option<String> {
        let group = self.group(group_name)?.clone();
        self.provider(&group)?;
        // Cordon first: once committed, apply refuses any bind there.
        let _ = self
            .client
            .cordon(node, &format!("autoscaler: removing ({reason})"))
            .await;
        let listed = self
            .client
            .list_nodes(pb::ListNodesRequest {
                provider: group.provider.clone(),
                region: group.region.clone(),
                statuses: Vec::new(),
            })
            .await
            .ok()?;
        let current = listed
            .nodes
            .iter()
            .find(|n| n.inventory.as_ref().is_some_and(|i| i.node_id == node));
        if let Some(current) = current
            && current.sandboxes > 0
        {
            let _ = self.client.uncordon(node).await;
            self.metrics
                .decisions
                .with_label_values(&["kept", "busy"])
                .inc();
            report.lines.push(line(
                now_ms,
                &format!("kept {node}: a sandbox landed before the cordon"),
            ));
            return None;
        }
        if let Err(e) = self.release(&group, &[node.to_owned()]).await {
            report.lines.push(line(
                now_ms,
                &format!("scale-down {node} failed at the provider: {e}"),
            ));
            return None;
        }
        if current.is_some()
            && let Err(e) = self.client.remove_node(node).await
        {
            tracing::warn!(%node, error = %e.message(), "forgetting a released node");
        }
        self.idle_since.remove(node);
        self.noticed.remove(node);
        self.metrics
            .decisions
            .with_label_values(&["scale_down", "idle"])
            .inc();
        report.lines.push(line(
            now_ms,
            &format!("scale-down {group_name} -{node}: {reason}"),
        ));
        Some(node.to_owned())
    }
}

/// A bounded label for a pending reason: the scheduler's first reason, up to its counts.
fn pending_reason(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.is_empty() {
        "not_yet_tried"
    } else if r.contains("quota") {
        "tenant_quota"
    } else if r.contains("gpu") {
        "no_gpu_capacity"
    } else if r.contains("cpu") || r.contains("memory") {
        "no_cpu_memory_capacity"
    } else if r.contains("not ready") || r.contains("no node") {
        "no_node"
    } else {
        "other"
    }
}

/// Now, in ms since the unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A decision line: UTC time, then the text.
fn line(now_ms: u64, text: &str) -> String {
    format!("{} {text}", utc(now_ms))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for ms since the unix epoch (civil-from-days, proleptic
/// Gregorian).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_083_505_000), "2026-12-01T00:05:05Z");
    }
}
