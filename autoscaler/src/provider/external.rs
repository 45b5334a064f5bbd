//! The `external` provider: any cloud, behind berth's `ProviderService` gRPC protocol.
//!
//! An operator whose cloud has no built-in provider runs a small service that implements
//! `berth.v1.ProviderService` (`proto/berth/v1/provider.proto`) against that cloud's API,
//! and configures a provider of `kind = "external"` with its `endpoint` (`host:port`,
//! plaintext HTTP/2). [`ExternalProvider`] is the autoscaler's client of that service.
//!
//! # Protocol
//! - `ScaleUp(ScaleUpRequest { group, count })`: ask for `count` more nodes of `group`;
//!   the answer may list the ids of the nodes being created.
//! - `RemoveNodes(RemoveNodesRequest { group, node_ids })`: release these nodes.
//! - `ListNodes(ListProviderNodesRequest { group })`: the group's nodes with their state
//!   (`PROVIDER_NODE_STATE_PROVISIONING`, `_RUNNING`, `_DELETING`, `_FAILED`) and whether
//!   the cloud announced an interruption.
//!
//! Every request carries the whole node group as configured (`NodeGroup`: name, region,
//! instance type, GPU model and count, CPU, memory, price, capacity type, labels), so the
//! service needs no berth configuration of its own. Node ids are the ids the nodes' agents
//! register with the scheduler.
//!
//! # Errors
//! The service answers with a gRPC status; this client maps it to a [`ProviderError`]
//! class, which decides what the autoscaler does next:
//!
//! | status | metadata `berth-provider-error` | class |
//! |---|---|---|
//! | `RESOURCE_EXHAUSTED` | `stockout` | [`ProviderError::Stockout`] |
//! | `RESOURCE_EXHAUSTED` | `quota`, absent or anything else | [`ProviderError::Quota`] |
//! | `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `ABORTED` | any | [`ProviderError::Transient`] |
//! | any other code | any | [`ProviderError::Permanent`] |
//!
//! A service that cannot be reached (connection refused, connect timeout) and a call that
//! gets no answer within the per-call timeout (which is also sent to the service as the
//! call's gRPC deadline) are [`ProviderError::Transient`] too. An
//! answer that breaks the protocol (a node with an empty or repeated id, or a state that
//! is unspecified or unknown) is [`ProviderError::Permanent`]. Every message names the
//! endpoint, the RPC and what the service said.
//!
//! A service written in Rust can use [`error_to_status`] to answer in these terms, and the
//! `*_to_pb` / `*_from_pb` functions here to convert messages.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use berth_proto::node::CapacityType;
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::provider_service_client::ProviderServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::config::NodeGroupConfig;

/// Metadata key (ASCII) whose value tells a stockout from a quota error on
/// `RESOURCE_EXHAUSTED`.
pub const PROVIDER_ERROR_METADATA_KEY: &str = "berth-provider-error";

/// Value of [`PROVIDER_ERROR_METADATA_KEY`] for a stockout.
pub const PROVIDER_ERROR_STOCKOUT: &str = "stockout";

/// Value of [`PROVIDER_ERROR_METADATA_KEY`] for a quota error.
pub const PROVIDER_ERROR_QUOTA: &str = "quota";

/// Longest the client waits for a TCP connection to the service (bounded further by the
/// per-call timeout).
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Client of an external provider service.
///
/// Cheap to clone; clones share one HTTP/2 connection, which is opened on the first call
/// and reopened after it breaks.
#[derive(Debug, Clone)]
pub struct ExternalProvider {
    endpoint: String,
    call_timeout: Duration,
    client: ProviderServiceClient<Channel>,
}

impl ExternalProvider {
    /// A client of the service at `endpoint` (`host:port`), without connecting yet.
    ///
    /// Each call gets at most `call_timeout` (connecting included; also sent to the service
    /// as the gRPC deadline). Must be called within a Tokio runtime. An endpoint that is not
    /// a valid `host:port`, a zero `call_timeout`, or no current runtime is
    /// [`ProviderError::Permanent`].
    pub fn connect_lazy(endpoint: &str, call_timeout: Duration) -> Result<Self, ProviderError> {
        Self::connect_lazy_tls(endpoint, call_timeout, None)
    }

    /// The same over mutual TLS: the service's certificate must chain to the cluster CA and
    /// name an identity of the cluster (e.g. `spiffe://CLUSTER/provider/NAME`).
    pub fn connect_lazy_tls(
        endpoint: &str,
        call_timeout: Duration,
        tls: Option<&berth_net::Tls>,
    ) -> Result<Self, ProviderError> {
        let invalid = |why: &dyn std::fmt::Display| {
            ProviderError::Permanent(format!("external provider endpoint {endpoint:?}: {why}"))
        };
        if endpoint.trim().is_empty() {
            return Err(invalid(&"must be host:port"));
        }
        if endpoint.contains('/') {
            return Err(invalid(&"must be host:port, without a scheme or path"));
        }
        if call_timeout.is_zero() {
            return Err(invalid(&"the call timeout must be > 0"));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(invalid(&"must be connected from within a Tokio runtime"));
        }
        let channel = berth_net::channel(
            endpoint,
            &berth_net::NetConfig::provider(call_timeout.min(MAX_CONNECT_TIMEOUT))
                .with_tls(tls, berth_net::Expect::AnyIdentity),
        )
        .map_err(|e| invalid(&e))?;
        Ok(ExternalProvider {
            endpoint: endpoint.to_owned(),
            call_timeout,
            client: ProviderServiceClient::new(channel),
        })
    }

    /// The service's `host:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound on each call.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// A request carrying the call timeout as its gRPC deadline.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// Runs one call under the call timeout and maps its failure.
    async fn call<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, ProviderError> {
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) if !deadline_expired(&status) => {
                Err(status_to_error(&self.endpoint, rpc, &status))
            }
            // Either this timeout or the channel's enforcement of the same deadline.
            Ok(Err(_)) | Err(_) => Err(ProviderError::Transient(format!(
                "external provider {}: {rpc}: no answer within {} ms",
                self.endpoint,
                self.call_timeout.as_millis()
            ))),
        }
    }

    /// A protocol violation in an answer.
    fn bad_answer(&self, rpc: &str, why: &str) -> ProviderError {
        ProviderError::Permanent(format!(
            "external provider {}: {rpc}: bad answer: {why}",
            self.endpoint
        ))
    }
}

#[async_trait]
impl Provider for ExternalProvider {
    async fn scale_up(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError> {
        if count == 0 {
            return Ok(());
        }
        let request = self.request(pb::ScaleUpRequest {
            group: Some(node_group_to_pb(group)),
            count,
        });
        let mut client = self.client.clone();
        let response = self.call("ScaleUp", client.scale_up(request)).await?;
        tracing::debug!(
            endpoint = %self.endpoint,
            group = %group.name,
            count,
            node_ids = ?response.node_ids,
            "external provider accepted scale-up"
        );
        Ok(())
    }

    async fn remove(&self, group: &NodeGroupConfig, nodes: &[String]) -> Result<(), ProviderError> {
        if nodes.is_empty() {
            return Ok(());
        }
        let request = self.request(pb::RemoveNodesRequest {
            group: Some(node_group_to_pb(group)),
            node_ids: nodes.to_vec(),
        });
        let mut client = self.client.clone();
        self.call("RemoveNodes", client.remove_nodes(request))
            .await?;
        Ok(())
    }

    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError> {
        let request = self.request(pb::ListProviderNodesRequest {
            group: Some(node_group_to_pb(group)),
        });
        let mut client = self.client.clone();
        let response = self.call("ListNodes", client.list_nodes(request)).await?;
        let mut seen = HashSet::with_capacity(response.nodes.len());
        let mut nodes = Vec::with_capacity(response.nodes.len());
        for node in response.nodes {
            let node = provider_node_from_pb(node).map_err(|e| self.bad_answer("ListNodes", &e))?;
            if !seen.insert(node.id.clone()) {
                return Err(
                    self.bad_answer("ListNodes", &format!("node {:?} is listed twice", node.id))
                );
            }
            nodes.push(node);
        }
        Ok(nodes)
    }
}

/// Maps a status from the service to the error class of the protocol (see the module
/// docs), naming the endpoint, the RPC and the status message.
pub fn status_to_error(endpoint: &str, rpc: &str, status: &Status) -> ProviderError {
    let message = format!(
        "external provider {endpoint}: {rpc}: {:?}: {}",
        status.code(),
        status.message()
    );
    match status.code() {
        Code::ResourceExhausted => {
            let stockout = status
                .metadata()
                .get(PROVIDER_ERROR_METADATA_KEY)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(PROVIDER_ERROR_STOCKOUT));
            if stockout {
                ProviderError::Stockout(message)
            } else {
                ProviderError::Quota(message)
            }
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted => {
            ProviderError::Transient(message)
        }
        // The channel's own enforcement of the call's deadline (tonic reports it as
        // CANCELLED, with `TimeoutExpired` as the source): no answer in time.
        Code::Cancelled if deadline_expired(status) => ProviderError::Transient(message),
        _ => ProviderError::Permanent(message),
    }
}

/// Whether tonic produced this status because the call's deadline passed on this side.
fn deadline_expired(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The status a provider service answers an error of this class with (for services
/// written in Rust): stockout and quota as `RESOURCE_EXHAUSTED` with the
/// `berth-provider-error` metadata entry, transient as `UNAVAILABLE`, permanent as
/// `FAILED_PRECONDITION`.
pub fn error_to_status(error: &ProviderError) -> Status {
    let exhausted = |kind: &'static str, message: &str| {
        let mut status = Status::resource_exhausted(message);
        status.metadata_mut().insert(
            PROVIDER_ERROR_METADATA_KEY,
            MetadataValue::from_static(kind),
        );
        status
    };
    match error {
        ProviderError::Stockout(m) => exhausted(PROVIDER_ERROR_STOCKOUT, m),
        ProviderError::Quota(m) => exhausted(PROVIDER_ERROR_QUOTA, m),
        ProviderError::Transient(m) => Status::unavailable(m.as_str()),
        ProviderError::Permanent(m) => Status::failed_precondition(m.as_str()),
    }
}

/// A node group as the protocol carries it.
pub fn node_group_to_pb(group: &NodeGroupConfig) -> pb::NodeGroup {
    pb::NodeGroup {
        name: group.name.clone(),
        region: group.region.clone(),
        instance_type: group.instance_type.clone(),
        gpu_model: group.gpu_model.clone().unwrap_or_default(),
        gpu_count: group.gpu_count,
        cpu_milli: group.cpu_milli,
        memory_mib: group.memory_mib,
        price_per_hour_usd: group.price_per_hour_usd,
        capacity_type: capacity_type_to_pb(group.capacity_type).into(),
        labels: group
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// A capacity type as the protocol carries it.
pub fn capacity_type_to_pb(capacity_type: CapacityType) -> pb::CapacityType {
    match capacity_type {
        CapacityType::OnDemand => pb::CapacityType::OnDemand,
        CapacityType::Spot => pb::CapacityType::Spot,
    }
}

/// A capacity type from the protocol; `None` for UNSPECIFIED and unknown values.
pub fn capacity_type_from_pb(capacity_type: i32) -> Option<CapacityType> {
    match pb::CapacityType::try_from(capacity_type) {
        Ok(pb::CapacityType::OnDemand) => Some(CapacityType::OnDemand),
        Ok(pb::CapacityType::Spot) => Some(CapacityType::Spot),
        Ok(pb::CapacityType::Unspecified) | Err(_) => None,
    }
}

/// An instance state as the protocol carries it.
pub fn instance_state_to_pb(state: InstanceState) -> pb::ProviderNodeState {
    match state {
        InstanceState::Provisioning => pb::ProviderNodeState::Provisioning,
        InstanceState::Running => pb::ProviderNodeState::Running,
        InstanceState::Deleting => pb::ProviderNodeState::Deleting,
        InstanceState::Failed => pb::ProviderNodeState::Failed,
    }
}

/// An instance state from the protocol; `None` for UNSPECIFIED and unknown values.
pub fn instance_state_from_pb(state: i32) -> Option<InstanceState> {
    match pb::ProviderNodeState::try_from(state) {
        Ok(pb::ProviderNodeState::Provisioning) => Some(InstanceState::Provisioning),
        Ok(pb::ProviderNodeState::Running) => Some(InstanceState::Running),
        Ok(pb::ProviderNodeState::Deleting) => Some(InstanceState::Deleting),
        Ok(pb::ProviderNodeState::Failed) => Some(InstanceState::Failed),
        Ok(pb::ProviderNodeState::Unspecified) | Err(_) => None,
    }
}

/// A provider node as the protocol carries it.
pub fn provider_node_to_pb(node: &ProviderNode) -> pb::ProviderNode {
    pb::ProviderNode {
        id: node.id.clone(),
        state: instance_state_to_pb(node.state).into(),
        interruption_notice: node.interruption_notice,
    }
}

/// A provider node from the protocol. Errors (naming the node) on an empty id and on an
/// unspecified or unknown state.
pub fn provider_node_from_pb(node: pb::ProviderNode) -> Result<ProviderNode, String> {
    if node.id.is_empty() {
        return Err("a node has an empty id".into());
    }
    let Some(state) = instance_state_from_pb(node.state) else {
        let name = pb::ProviderNodeState::try_from(node.state)
            .map_or_else(|_| node.state.to_string(), |s| s.as_str_name().to_owned());
        return Err(format!("node {:?} has state {name}", node.id));
    };
    Ok(ProviderNode {
        id: node.id,
        state,
        interruption_notice: node.interruption_notice,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        let class = |status: Status| status_to_error("h:1", "ScaleUp", &status).class();
        for error in [
            ProviderError::Stockout("s".into()),
            ProviderError::Quota("q".into()),
            ProviderError::Transient("t".into()),
            ProviderError::Permanent("p".into()),
        ] {
            assert_eq!(class(error_to_status(&error)), error.class());
        }
        assert_eq!(class(Status::resource_exhausted("x")), "quota");
        assert_eq!(class(Status::deadline_exceeded("x")), "transient");
        assert_eq!(class(Status::aborted("x")), "transient");
        assert_eq!(class(Status::invalid_argument("x")), "permanent");
        assert_eq!(class(Status::internal("x")), "permanent");
        let error = status_to_error("h:1", "ListNodes", &Status::not_found("no group g"));
        assert_eq!(
            error.to_string(),
            "external provider h:1: ListNodes: NotFound: no group g"
        );
    }

    #[test]
    fn node_round_trip_and_rejections() {
        for state in [
            InstanceState::Provisioning,
            InstanceState::Running,
            InstanceState::Deleting,
            InstanceState::Failed,
        ] {
            let node = ProviderNode {
                id: "n-1".into(),
                state,
                interruption_notice: state == InstanceState::Running,
            };
            assert_eq!(provider_node_from_pb(provider_node_to_pb(&node)), Ok(node));
        }
        let bad = |id: &str, state: i32| {
            provider_node_from_pb(pb::ProviderNode {
                id: id.into(),
                state,
                interruption_notice: false,
            })
        };
        assert_eq!(
            bad("n", 0),
            Err("node \"n\" has state PROVIDER_NODE_STATE_UNSPECIFIED".into())
        );
        assert_eq!(bad("n", 99), Err("node \"n\" has state 99".into()));
        assert_eq!(bad("", 1), Err("a node has an empty id".into()));
        for c in [CapacityType::OnDemand, CapacityType::Spot] {
            assert_eq!(
                capacity_type_from_pb(capacity_type_to_pb(c).into()),
                Some(c)
            );
        }
        assert_eq!(capacity_type_from_pb(0), None);
    }
}
