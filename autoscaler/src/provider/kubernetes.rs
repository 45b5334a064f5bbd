//! The `kubernetes` provider: node groups as Cluster API `MachineDeployment`s.
//!
//! Cluster API (CAPI) runs machines on any cloud that has a CAPI infrastructure provider
//! (AWS, Azure, GCP, vSphere, bare metal, ...), so this one provider reaches all of them
//! through the Kubernetes API of the management cluster.
//!
//! # Mapping
//! - A node group is one `MachineDeployment` (`cluster.x-k8s.io/v1beta1`) in the provider's
//!   namespace, named after the group ([`NodeGroupConfig::name`]), or after the group label
//!   `cluster.x-k8s.io/machine-deployment` when the group sets it.
//! - Its nodes are the `Machine`s labelled `cluster.x-k8s.io/deployment-name=<deployment>`.
//!   A node's id is the name of the Machine's Kubernetes node (`status.nodeRef.name`), which
//!   is what its agent registers with; before the node exists it is the Machine's own name.
//! - State comes from `status.phase`: `Pending`, `Provisioning` and `Provisioned` are
//!   [`InstanceState::Provisioning`] (so is a Machine without a phase yet), `Running` is
//!   [`InstanceState::Running`], `Deleting` and `Deleted` are [`InstanceState::Deleting`]
//!   (so is any Machine with `metadata.deletionTimestamp`), `Failed` and `Unknown` are
//!   [`InstanceState::Failed`].
//! - Spot interruption convention: CAPI has no standard signal, so berth reads two. A Machine
//!   has an interruption notice when it carries the condition type `berth.dev/SpotInterruption`
//!   with status `True`, or the annotation `berth.dev/spot-interruption` (any value). A
//!   termination handler on the node (or the cloud's CAPI provider) sets either one.
//!
//! # Calls
//! - `scale_up` reads the deployment's `scale` subresource and writes it back with
//!   `spec.replicas` raised, carrying the `metadata.resourceVersion` it read. A concurrent
//!   writer makes the API server answer 409 Conflict; the provider then re-reads and tries
//!   again (optimistic concurrency), so the result is always exactly `+count` over what the
//!   other writer left, never a lost update or a double one.
//! - `remove` marks each node's Machine with the annotation
//!   `cluster.x-k8s.io/delete-machine: "yes"` (a JSON merge patch), which is how CAPI chooses
//!   which Machines go when replicas drop, then lowers the scale by the number marked (same
//!   409 loop, never below 0). Unknown node ids and Machines already being deleted are
//!   skipped with a log line.
//! - Every request that fails with a 5xx, 429 or a connection error is retried with
//!   exponential backoff ([`RetryPolicy`]); when the attempts run out the call returns
//!   [`ProviderError::Transient`]. So does a conflict that persists through every attempt.
//!   403 or 422 with a quota message is [`ProviderError::Quota`]; 404 is
//!   [`ProviderError::Permanent`] ("MachineDeployment ns/name not found"); other 4xx are
//!   permanent too. Each message names the HTTP status and the object.
//! - The client built by [`KubernetesProvider::new`] has kube's own retry layer turned off
//!   (this module retries, and retries would multiply) and a 30 s response timeout.
//!
//! Cloud-side stockouts and quotas are not errors of `scale_up` here: CAPI accepts the new
//! replica count and the cloud refuses the instance later. They show up in `list` as
//! Machines that stay `Provisioning` or turn `Failed`, which the autoscaler's provisioning
//! timeout handles.
//!
//! No Kubernetes API server runs in berth's test environment; the provider is tested against
//! an in-process fake that speaks the real HTTP API (tests/kubernetes.rs).

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::autoscaling::v1::ScaleSpec;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tracing::{debug, info, warn};

use super::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::config::NodeGroupConfig;

/// API group of Cluster API.
pub const CAPI_GROUP: &str = "cluster.x-k8s.io";
/// API version of Cluster API used.
pub const CAPI_VERSION: &str = "v1beta1";
/// Group label that names the `MachineDeployment` when it differs from the group's name.
pub const MACHINE_DEPLOYMENT_LABEL: &str = "cluster.x-k8s.io/machine-deployment";
/// Label CAPI puts on every Machine of a `MachineDeployment`.
pub const DEPLOYMENT_NAME_LABEL: &str = "cluster.x-k8s.io/deployment-name";
/// Annotation that makes CAPI delete this Machine first when replicas drop.
pub const DELETE_MACHINE_ANNOTATION: &str = "cluster.x-k8s.io/delete-machine";
/// Machine condition type of berth's spot interruption convention.
pub const SPOT_INTERRUPTION_CONDITION: &str = "berth.dev/SpotInterruption";
/// Machine annotation of berth's spot interruption convention.
pub const SPOT_INTERRUPTION_ANNOTATION: &str = "berth.dev/spot-interruption";

/// Response timeout of the client that [`KubernetesProvider::new`] builds.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How failed requests are retried: exponential backoff, doubling from `initial_backoff`
/// up to `max_backoff`, `attempts` tries in all (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per request (5xx, 429, connection errors) and per conflict loop (409).
    pub attempts: u32,
    /// Wait before the second try.
    pub initial_backoff: Duration,
    /// Longest wait between tries.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 5 s.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Scales Cluster API `MachineDeployment`s; see the [module docs](self).
#[derive(Clone)]
pub struct KubernetesProvider {
    client: kube::Client,
    namespace: String,
    retry: RetryPolicy,
    deployments: ApiResource,
    machines: ApiResource,
}

impl std::fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("namespace", &self.namespace)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// Why one request failed, before the retry loops decide what it means.
enum Failure {
    /// 409: someone else wrote the object since it was read.
    Conflict(String),
    /// Worth another try (5xx, 429, connection errors).
    Retryable(String),
    /// 404: the object does not exist.
    NotFound(String),
    /// Retrying will not help.
    Final(ProviderError),
}

impl Failure {
    fn into_error(self) -> ProviderError {
        match self {
            Failure::Conflict(message) | Failure::Retryable(message) => {
                ProviderError::Transient(message)
            }
            Failure::NotFound(message) => ProviderError::Permanent(message),
            Failure::Final(error) => error,
        }
    }
}

/// Sorts a kube error. `what` is the request ("PUT scale of MachineDeployment ns/name"),
/// `object` the object ("MachineDeployment ns/name").
fn classify(error: kube::Error, what: &str, object: &str) -> Failure {
    match error {
        kube::Error::Api(status) => {
            let code = status.code;
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", status.reason)
            };
            let message = format!("{what}: HTTP {code}{reason}: {}", status.message);
            let lower = status.message.to_lowercase();
            match code {
                409 => Failure::Conflict(message),
                429 | 500..=599 => Failure::Retryable(message),
                404 => Failure::NotFound(format!("{object} not found (HTTP 404 on {what})")),
                403 | 422 if lower.contains("quota") => {
                    Failure::Final(ProviderError::Quota(message))
                }
                _ if lower.contains("exceeded quota") => {
                    Failure::Final(ProviderError::Quota(message))
                }
                _ => Failure::Final(ProviderError::Permanent(message)),
            }
        }
        error @ (kube::Error::HyperError(_) | kube::Error::Service(_)) => {
            Failure::Retryable(format!("{what}: connection error: {error}"))
        }
        error => Failure::Final(ProviderError::Permanent(format!("{what}: {error}"))),
    }
}

/// The node id of a Machine: its node's name, or its own before it has a node.
fn node_id(machine: &DynamicObject) -> String {
    machine
        .data
        .pointer("/status/nodeRef/name")
        .and_then(|v| v.as_str())
        .filter(|name| !name.is_empty())
        .map_or_else(
            || machine.metadata.name.clone().unwrap_or_default(),
            str::to_owned,
        )
}

fn machine_state(machine: &DynamicObject) -> InstanceState {
    if machine.metadata.deletion_timestamp.is_some() {
        return InstanceState::Deleting;
    }
    match machine
        .data
        .pointer("/status/phase")
        .and_then(|v| v.as_str())
    {
        None | Some("" | "Pending" | "Provisioning" | "Provisioned") => InstanceState::Provisioning,
        Some("Running") => InstanceState::Running,
        Some("Deleting" | "Deleted") => InstanceState::Deleting,
        Some("Failed" | "Unknown") => InstanceState::Failed,
        Some(other) => {
            debug!(
                machine = machine.metadata.name.as_deref().unwrap_or(""),
                phase = other,
                "unrecognised Machine phase; counting it as provisioning"
            );
            InstanceState::Provisioning
        }
    }
}

fn interruption_notice(machine: &DynamicObject) -> bool {
    let annotated = machine
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SPOT_INTERRUPTION_ANNOTATION));
    let conditioned = machine
        .data
        .pointer("/status/conditions")
        .and_then(|v| v.as_array())
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c.get("type").and_then(|t| t.as_str()) == Some(SPOT_INTERRUPTION_CONDITION)
                    && c.get("status").and_then(|s| s.as_str()) == Some("True")
            })
        });
    annotated || conditioned
}

impl KubernetesProvider {
    /// A provider for the MachineDeployments of `namespace`. An empty `kubeconfig` infers the
    /// configuration (`KUBECONFIG`, `~/.kube/config`, then in-cluster); otherwise that
    /// kubeconfig file is read (its current context).
    pub async fn new(namespace: &str, kubeconfig: &str) -> Result<Self, ProviderError> {
        let mut config = if kubeconfig.is_empty() {
            kube::Config::infer().await.map_err(|e| {
                ProviderError::Permanent(format!("kubernetes provider: no configuration: {e}"))
            })?
        } else {
            let file = Kubeconfig::read_from(kubeconfig)
                .map_err(|e| ProviderError::Permanent(format!("kubeconfig {kubeconfig}: {e}")))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| ProviderError::Permanent(format!("kubeconfig {kubeconfig}: {e}")))?
        };
        // This module retries itself (and counts conflicts); kube's layer would multiply tries.
        config.default_retry = false;
        config.read_timeout = Some(READ_TIMEOUT);
        config.default_namespace = namespace.to_owned();
        let client = kube::Client::try_from(config).map_err(|e| {
            ProviderError::Permanent(format!("kubernetes provider: building the client: {e}"))
        })?;
        Ok(Self::with_client(client, namespace))
    }

    /// A provider over an existing client (tests; callers with their own client setup).
    /// Turn the client's `default_retry` off, or its retries multiply this provider's.
    pub fn with_client(client: kube::Client, namespace: &str) -> Self {
        let resource = |kind: &str, plural: &str| {
            ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(CAPI_GROUP, CAPI_VERSION, kind),
                plural,
            )
        };
        KubernetesProvider {
            client,
            namespace: namespace.to_owned(),
            retry: RetryPolicy::default(),
            deployments: resource("MachineDeployment", "machinedeployments"),
            machines: resource("Machine", "machines"),
        }
    }

    /// Replaces the retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The namespace of the MachineDeployments.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The `MachineDeployment` that backs `group`.
    pub fn machine_deployment(group: &NodeGroupConfig) -> &str {
        group
            .labels
            .get(MACHINE_DEPLOYMENT_LABEL)
            .map_or(group.name.as_str(), String::as_str)
    }

    fn deployments(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &self.deployments)
    }

    fn machines(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &self.machines)
    }

    fn attempts(&self) -> u32 {
        self.retry.attempts.max(1)
    }

    /// Runs one request, retrying 5xx, 429 and connection errors with backoff.
    async fn call<T, F, Fut>(&self, what: &str, object: &str, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let mut backoff = self.retry.initial_backoff;
        let mut attempt = 1;
        loop {
            match op().await.map_err(|e| classify(e, what, object)) {
                Ok(value) => return Ok(value),
                Err(Failure::Retryable(message)) if attempt < self.attempts() => {
                    warn!(attempt, ?backoff, "{message}; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                    attempt += 1;
                }
                Err(Failure::Retryable(message)) => {
                    return Err(Failure::Final(ProviderError::Transient(format!(
                        "{message} (gave up after {attempt} attempts)"
                    ))));
                }
                Err(other) => return Err(other),
            }
        }
    }

    /// Changes the deployment's replicas by `delta` (clamped to 0..=i32::MAX), re-reading
    /// and retrying on 409 Conflict.
    async fn change_replicas(&self, deployment: &str, delta: i64) -> Result<(), ProviderError> {
        let api = self.deployments();
        let object = format!("MachineDeployment {}/{deployment}", self.namespace);
        let get = format!("GET scale of {object}");
        let put = format!("PUT scale of {object}");
        let post = PostParams::default();
        for round in 1..=self.attempts() {
            let mut scale = self
                .call(&get, &object, || api.get_scale(deployment))
                .await
                .map_err(Failure::into_error)?;
            let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
            let target = i32::try_from((i64::from(current) + delta).max(0)).unwrap_or(i32::MAX);
            if target == current {
                return Ok(());
            }
            scale.spec = Some(ScaleSpec {
                replicas: Some(target),
            });
            let written = self
                .call(&put, &object, || {
                    api.replace_scale(deployment, &post, &scale)
                })
                .await;
            match written {
                Ok(_) => {
                    info!(%object, from = current, to = target, "scaled");
                    return Ok(());
                }
                Err(Failure::Conflict(message)) => {
                    debug!(round, "{message}; re-reading the scale");
                }
                Err(other) => return Err(other.into_error()),
            }
        }
        Err(ProviderError::Transient(format!(
            "{put}: HTTP 409 Conflict persisted through {} attempts",
            self.attempts()
        )))
    }

    async fn list_machines(&self, deployment: &str) -> Result<Vec<DynamicObject>, ProviderError> {
        let api = self.machines();
        let selector = format!("{DEPLOYMENT_NAME_LABEL}={deployment}");
        let params = ListParams::default().labels(&selector);
        let what = format!("LIST Machines {}/{selector}", self.namespace);
        let object = format!(
            "Machines of MachineDeployment {}/{deployment}",
            self.namespace
        );
        let list = self
            .call(&what, &object, || api.list(&params))
            .await
            .map_err(Failure::into_error)?;
        Ok(list.items)
    }
}

#[async_trait]
impl Provider for KubernetesProvider {
    async fn scale_up(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError> {
        if count == 0 {
            return Ok(());
        }
        self.change_replicas(Self::machine_deployment(group), i64::from(count))
            .await
    }

    async fn remove(&self, group: &NodeGroupConfig, nodes: &[String]) -> Result<(), ProviderError> {
        if nodes.is_empty() {
            return Ok(());
        }
        let deployment = Self::machine_deployment(group);
        let machines = self.list_machines(deployment).await?;
        let api = self.machines();
        let patch = Patch::Merge(serde_json::json!({
            "metadata": { "annotations": { DELETE_MACHINE_ANNOTATION: "yes" } }
        }));
        let params = PatchParams::default();
        let mut marked = BTreeSet::new();
        for id in nodes {
            let Some(machine) = machines.iter().find(|m| node_id(m) == *id) else {
                warn!(node = %id, %deployment, "no Machine of this MachineDeployment has that node; skipped");
                continue;
            };
            let name = machine.metadata.name.clone().unwrap_or_default();
            if machine.metadata.deletion_timestamp.is_some() {
                info!(node = %id, machine = %name, "Machine is already being deleted; skipped");
                continue;
            }
            if marked.contains(&name) {
                continue;
            }
            let object = format!("Machine {}/{name}", self.namespace);
            let what = format!("PATCH {object}");
            match self
                .call(&what, &object, || api.patch(&name, &params, &patch))
                .await
            {
                Ok(_) => {
                    marked.insert(name);
                }
                Err(Failure::NotFound(message)) => {
                    warn!(node = %id, "{message}; it went away, skipped");
                }
                Err(other) => return Err(other.into_error()),
            }
        }
        if marked.is_empty() {
            return Ok(());
        }
        let count = i64::try_from(marked.len()).unwrap_or(i64::MAX);
        self.change_replicas(deployment, -count).await
    }

    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError> {
        let machines = self.list_machines(Self::machine_deployment(group)).await?;
        let mut nodes: Vec<ProviderNode> = machines
            .iter()
            .map(|machine| ProviderNode {
                id: node_id(machine),
                state: machine_state(machine),
                interruption_notice: interruption_notice(machine),
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }
}
