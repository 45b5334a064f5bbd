//! The tonic services of a scheduler replica: `SandboxService`, `AdminService`,
//! `NodeService` (the scheduler's side of the agent stream) and `Peer` (Raft traffic).
//!
//! Writes go to the leader; a follower answers FAILED_PRECONDITION with the leader's address
//! in the `berth-leader` metadata. Reads are linearizable (ReadIndex on the leader) unless
//! the client sends `berth-read: local`, which reads this replica's applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_server::AdminService;
use berth_proto::pb::v1::agent_service_client::AgentServiceClient;
use berth_proto::pb::v1::node_service_server::NodeService;
use berth_proto::pb::v1::peer_server::Peer;
use berth_proto::pb::v1::sandbox_service_server::SandboxService;

use super::convert;
use super::driver::{READ_MODE_METADATA, ReadView, ReplicaHandle, rejection_status};
use super::liveness::Liveness;
use super::watch::{self, WatchFilter, WatchSlots};
use crate::model::{NodeStatus, SandboxId, SandboxState};
use crate::replication::{CreateItem, MembershipChange};
use crate::state::{Command, ItemOutcome, Rejection};

/// Largest page of a list.
pub const PAGE_MAX: u32 = 1_000;
/// Most sandboxes an agent may report in its registration.
pub const MAX_OBSERVED: usize = 10_000;
/// Largest snapshot a replica accepts from a leader.
pub const SNAPSHOT_MAX_BYTES: usize = 4 << 30;

/// All four services over one replica.
#[derive(Clone)]
pub struct Services {
    handle: ReplicaHandle,
    cluster_id: String,
    liveness: Liveness,
    watches: WatchSlots,
}

impl Services {
    /// Services over a replica; `liveness` records the agents' heartbeats.
    pub fn new(handle: ReplicaHandle, cluster_id: String, liveness: Liveness) -> Services {
        Services {
            handle,
            cluster_id,
            liveness,
            watches: WatchSlots::default(),
        }
    }
}

fn linearizable<T>(request: &Request<T>) -> bool {
    request
        .metadata()
        .get(READ_MODE_METADATA)
        .and_then(|v| v.to_str().ok())
        != Some("local")
}

/// Largest create request; the spec's own limits (argv and env at 64 KiB each) keep a valid
/// one far below.
pub const MAX_CREATE_BYTES: usize = 1 << 20;

/// Refuses an oversized create with RESOURCE_EXHAUSTED naming its largest field.
fn check_create_size(req: &pb::CreateSandboxRequest) -> Result<(), Status> {
    use prost::Message as _;
    let size = req.encoded_len();
    if size <= MAX_CREATE_BYTES {
        return Ok(());
    }
    let field = match &req.spec {
        Some(spec) => {
            let text = |v: &[String]| v.iter().map(String::len).sum::<usize>();
            let map = |m: &std::collections::HashMap<String, String>| {
                m.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            };
            [
                ("spec.command", text(&spec.command)),
                ("spec.env", map(&spec.env)),
                ("spec.labels", map(&spec.labels)),
                ("spec.image", spec.image.len()),
                ("request_id", req.request_id.len()),
            ]
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map_or("spec", |(f, _)| f)
        }
        None => "request_id",
    };
    Err(Status::resource_exhausted(format!(
        "{field}: the request is {size} bytes; a create may be at most {MAX_CREATE_BYTES} bytes"
    )))
}

fn parse_sandbox_id(field: &str, value: &str) -> Result<SandboxId, Status> {
    value.parse::<SandboxId>().map_err(|_| {
        Status::invalid_argument(format!(
            "{field}: {value:?} is not a sandbox id (sbx-NNNNNNNNNN)"
        ))
    })
}

fn check_node_id(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() || value.len() > 63 {
        return Err(Status::invalid_argument(format!(
            "{field}: must be 1..=63 characters"
        )));
    }
    Ok(())
}

fn only_outcome(outcomes: Vec<ItemOutcome>) -> Result<ItemOutcome, Status> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| Status::internal("a command produced no outcome"))
}

#[tonic::async_trait]
impl SandboxService for Services {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        check_create_size(request.get_ref())?;
        let (request_id, spec) = convert::create_request_from_pb(request.get_ref())?;
        let response = self.handle.create(CreateItem { request_id, spec }).await?;
        Ok(Response::new(response))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let linear = linearizable(&request);
        let id = parse_sandbox_id("sandbox_id", &request.get_ref().sandbox_id)?;
        let found = self
            .handle
            .read(linear, move |v| {
                v.state
                    .sandbox(id)
                    .map(|s| convert::sandbox_to_pb_in(s, v.state))
            })
            .await?;
        found
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("sandbox {id} does not exist")))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let linear = linearizable(&request);
        let req = request.into_inner();
        let page_size = match req.page_size {
            0 => 100,
            n if n > PAGE_MAX => {
                return Err(Status::invalid_argument(format!(
                    "page_size: {n} is above the limit of {PAGE_MAX}"
                )));
            }
            n => n,
        } as usize;
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(parse_sandbox_id("page_token", &req.page_token)?)
        };
        let page = self
            .handle
            .read(linear, move |v| list_page(v, &req, after, page_size))
            .await?;
        Ok(Response::new(page))
    }

    async fn delete_sandbox(
        &self,
        request: Request<pb::DeleteSandboxRequest>,
    ) -> Result<Response<pb::DeleteSandboxResponse>, Status> {
        let id = parse_sandbox_id("sandbox_id", &request.get_ref().sandbox_id)?;
        let existed = self.handle.delete(id).await?;
        Ok(Response::new(pb::DeleteSandboxResponse { existed }))
    }

    type WatchSandboxesStream =
        Pin<Box<dyn Stream<Item = Result<pb::SandboxEvent, Status>> + Send + 'static>>;

    async fn watch_sandboxes(
        &self,
        request: Request<pb::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let filter = WatchFilter::from_request(request.get_ref())?;
        let (tx, rx) = mpsc::channel(256);
        watch::start(self.handle.clone(), &self.watches, filter, tx).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadLogsStream = LogStream;

    async fn read_logs(
        &self,
        request: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        // The node's agent address is part of its registered inventory, so any replica's
        // applied state knows it; no need to go through the leader.
        let target = self
            .handle
            .read(false, move |v| {
                let sandbox = v.state.sandbox(id)?;
                let Some(binding) = &sandbox.binding else {
                    return Some(Err(format!(
                        "sandbox_id: {id} has not been placed on a node yet ({})",
                        sandbox.state.name()
                    )));
                };
                let node = &binding.placement.node;
                Some(match v.state.node(node) {
                    Some(r) if !r.spec.agent_address.is_empty() => Ok(r.spec.agent_address.clone()),
                    Some(_) => Err(format!("node {node} registered no agent address")),
                    None => Err(format!("node {node} is no longer registered")),
                })
            })
            .await?;
        let address = match target {
            None => return Err(Status::not_found(format!("sandbox_id: no sandbox {id}"))),
            Some(Err(why)) => return Err(Status::failed_precondition(why)),
            Some(Ok(address)) => address,
        };
        let channel = super::transport::peer_channel(&address).map_err(Status::internal)?;
        let mut agent = AgentServiceClient::new(channel);
        let upstream = agent
            .read_logs(req)
            .await
            .map_err(|s| {
                Status::new(
                    if s.code() == tonic::Code::NotFound {
                        tonic::Code::NotFound
                    } else {
                        tonic::Code::Unavailable
                    },
                    format!("the agent at {address}: {}", s.message()),
                )
            })?
            .into_inner();
        Ok(Response::new(Box::pin(upstream)))
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send + 'static>>;

fn list_page(
    v: &ReadView<'_>,
    req: &pb::ListSandboxesRequest,
    after: Option<SandboxId>,
    page_size: usize,
) -> pb::ListSandboxesResponse {
    let start = after.map_or(SandboxId(0), |a| SandboxId(a.0 + 1));
    let revision = v.state.revision();
    let mut sandboxes = Vec::new();
    let mut next_page_token = String::new();
    for (id, s) in v.state.sandboxes().range(start..) {
        let matches = (req.tenant.is_empty() || s.spec.tenant == req.tenant)
            && (req.states.is_empty()
                || req
                    .states
                    .iter()
                    .any(|f| convert::sandbox_state_matches(*f, &s.state)))
            && (req.node_id.is_empty()
                || s.binding
                    .as_ref()
                    .is_some_and(|b| b.placement.node == req.node_id))
            && req
                .labels
                .iter()
                .all(|(k, val)| s.spec.labels.get(k) == Some(val));
        if !matches {
            continue;
        }
        if sandboxes.len() == page_size {
            if let Some(last) = sandboxes.last() {
                let last: &pb::Sandbox = last;
                next_page_token = last.id.clone();
            }
            break;
        }
        let mut out = convert::sandbox_to_pb_in(s, v.state);
        out.revision = revision;
        sandboxes.push(out);
        let _ = id;
    }
    pb::ListSandboxesResponse {
        sandboxes,
        next_page_token,
    }
}

fn replicas(v: &ReadView<'_>) -> Vec<pb::Replica> {
    let leader = v.raft.leader;
    let learners: BTreeSet<u64> = v.raft.learners.iter().copied().collect();
    v.peers
        .iter()
        .map(|(id, address)| {
            let role = if *id == leader {
                "leader"
            } else if learners.contains(id) {
                "learner"
            } else if *id == v.raft.id {
                v.raft.role
            } else {
                "follower"
            };
            pb::Replica {
                id: *id,
                address: address.clone(),
                role: role.to_owned(),
                match_index: v.raft.matched.get(id).copied().unwrap_or_default(),
            }
        })
        .collect()
}

fn cluster_status(v: &ReadView<'_>) -> pb::ClusterStatusResponse {
    let mut allocated: BTreeMap<String, u64> = BTreeMap::new();
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let mut ready = 0;
    for record in v.state.nodes().values() {
        if record.status == NodeStatus::Ready {
            ready += 1;
        }
        for (i, gpu) in record.spec.gpus.iter().enumerate() {
            let model = gpu.model.to_string();
            *total.entry(model.clone()).or_default() += 1000;
            *allocated.entry(model).or_default() +=
                u64::from(record.gpu_milli_allocated.get(i).copied().unwrap_or(0));
        }
    }
    pb::ClusterStatusResponse {
        leader_id: v.raft.leader,
        term: v.raft.term,
        commit_index: v.raft.commit,
        applied_index: v.raft.applied,
        replicas: replicas(v),
        nodes_ready: ready,
        nodes_total: v.state.nodes().len() as u32,
        sandboxes_by_state: v.state.sandboxes_by_state().clone().into_iter().collect(),
        gpus_allocated_milli: allocated.into_iter().collect(),
        gpus_total_milli: total.into_iter().collect(),
        invariant_violations: v.invariant_violations,
        recent_autoscaler_decisions: v
            .state
            .autoscaler()
            .decisions
            .iter()
            .rev()
            .cloned()
            .collect(),
        autoscaler_holder: v.state.autoscaler().holder.clone(),
        autoscaler_lease_expires_unix_ms: v.state.autoscaler().expires_ms,
    }
}

impl Services {
    async fn set_node_status(
        &self,
        request: Request<pb::NodeRequest>,
        status: NodeStatus,
    ) -> Result<Response<pb::Node>, Status> {
        let req = request.into_inner();
        check_node_id("node_id", &req.node_id)?;
        let reason = if req.reason.is_empty() {
            format!("{status:?} by an operator")
        } else {
            req.reason.clone()
        };
        let result = self
            .handle
            .command(Command::SetNodeStatus {
                node: req.node_id.clone(),
                status,
                reason,
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(rejection_status(&r));
        }
        let node = req.node_id;
        let heard = self.liveness.last_heard_unix_ms(&node);
        let found = self
            .handle
            .read(false, move |v| {
                v.state.node(&node).map(|r| convert::node_to_pb(r, v.state))
            })
            .await?;
        found
            .map(|mut n| {
                n.last_heartbeat_unix_ms = heard;
                n
            })
            .map(Response::new)
            .ok_or_else(|| Status::not_found("the node was removed meanwhile"))
    }

    async fn membership_response(&self) -> Result<Response<pb::MembershipResponse>, Status> {
        let replicas = self.handle.read(false, replicas).await?;
        Ok(Response::new(pb::MembershipResponse { replicas }))
    }
}

#[tonic::async_trait]
impl AdminService for Services {
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        // This replica's own view: status must answer even without a quorum.
        let status = self.handle.read(false, cluster_status).await?;
        Ok(Response::new(status))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let linear = linearizable(&request);
        let req = request.into_inner();
        let nodes = self
            .handle
            .read(linear, move |v| {
                v.state
                    .nodes()
                    .values()
                    .filter(|r| req.provider.is_empty() || r.spec.provider == req.provider)
                    .filter(|r| req.region.is_empty() || r.spec.region == req.region)
                    .filter(|r| {
                        req.statuses.is_empty()
                            || req
                                .statuses
                                .contains(&(convert::node_status_to_pb(r.status) as i32))
                    })
                    .map(|r| convert::node_to_pb(r, v.state))
                    .collect::<Vec<pb::Node>>()
            })
            .await?;
        let nodes = nodes
            .into_iter()
            .map(|mut n| {
                if let Some(inv) = &n.inventory {
                    n.last_heartbeat_unix_ms = self.liveness.last_heard_unix_ms(&inv.node_id);
                }
                n
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn cordon_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.set_node_status(request, NodeStatus::Cordoned).await
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.set_node_status(request, NodeStatus::Ready).await
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.set_node_status(request, NodeStatus::Draining).await
    }

    async fn set_tenant_quota(
        &self,
        request: Request<pb::SetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        let req = request.into_inner();
        let (tenant, quota) = convert::quota_from_pb(req.quota.as_ref(), "quota")?;
        let result = self
            .handle
            .command(Command::SetTenantQuota {
                tenant: tenant.clone(),
                quota: quota.clone(),
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(rejection_status(&r));
        }
        Ok(Response::new(convert::quota_to_pb(&tenant, &quota)))
    }

    async fn list_tenant_quotas(
        &self,
        request: Request<pb::ListTenantQuotasRequest>,
    ) -> Result<Response<pb::ListTenantQuotasResponse>, Status> {
        let linear = linearizable(&request);
        let quotas = self
            .handle
            .read(linear, |v| {
                v.state
                    .tenants()
                    .iter()
                    .map(|(t, r)| convert::quota_to_pb(t, &r.quota))
                    .collect()
            })
            .await?;
        Ok(Response::new(pb::ListTenantQuotasResponse { quotas }))
    }

    async fn add_peer(
        &self,
        request: Request<pb::AddPeerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let req = request.into_inner();
        let mut v = berth_proto::Validator::new();
        v.check(req.peer_id != 0, "peer_id", || "must be non-zero".into());
        v.address("address", &req.address);
        v.finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let change = if req.as_learner {
            MembershipChange::AddLearner {
                id: req.peer_id,
                address: req.address,
            }
        } else {
            MembershipChange::AddVoter {
                id: req.peer_id,
                address: req.address,
            }
        };
        self.handle.membership(change).await?;
        self.membership_response().await
    }

    async fn remove_peer(
        &self,
        request: Request<pb::RemovePeerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = request.get_ref().peer_id;
        if id == 0 {
            return Err(Status::invalid_argument("peer_id: must be non-zero"));
        }
        self.handle
            .membership(MembershipChange::Remove { id })
            .await?;
        self.membership_response().await
    }

    async fn capacity_view(
        &self,
        request: Request<pb::CapacityViewRequest>,
    ) -> Result<Response<pb::CapacityViewResponse>, Status> {
        let linear = linearizable(&request);
        let view = self.handle.read(linear, capacity_view).await?;
        Ok(Response::new(view))
    }

    async fn remove_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let req = request.into_inner();
        if req.node_id.is_empty() {
            return Err(Status::invalid_argument("node_id: must be set"));
        }
        let result = self
            .handle
            .command(Command::RemoveNode { node: req.node_id })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(rejection_status(&r));
        }
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn autoscaler_lease(
        &self,
        request: Request<pb::AutoscalerLeaseRequest>,
    ) -> Result<Response<pb::AutoscalerLeaseResponse>, Status> {
        let req = request.into_inner();
        if req.holder.is_empty() {
            return Err(Status::invalid_argument("holder: must be set"));
        }
        if req.ttl_ms == 0 {
            return Err(Status::invalid_argument("ttl_ms: must be above 0"));
        }
        if req.decisions.len() > crate::state::MAX_AUTOSCALER_DECISIONS {
            return Err(Status::invalid_argument(format!(
                "decisions: {} lines; at most {} per request",
                req.decisions.len(),
                crate::state::MAX_AUTOSCALER_DECISIONS
            )));
        }
        let holder = req.holder.clone();
        let result = self
            .handle
            .command(Command::AutoscalerLease {
                holder: req.holder,
                ttl_ms: req.ttl_ms,
                decisions: req.decisions,
            })
            .await?;
        match only_outcome(result.outcomes)? {
            ItemOutcome::Rejected(Rejection::LeaseHeld { holder, expires_ms }) => {
                Ok(Response::new(pb::AutoscalerLeaseResponse {
                    granted: false,
                    holder,
                    expires_unix_ms: expires_ms,
                }))
            }
            ItemOutcome::Rejected(r) => Err(rejection_status(&r)),
            _ => {
                let expires = self
                    .handle
                    .read(false, |v| v.state.autoscaler().expires_ms)
                    .await
                    .unwrap_or(0);
                Ok(Response::new(pb::AutoscalerLeaseResponse {
                    granted: true,
                    holder,
                    expires_unix_ms: expires,
                }))
            }
        }
    }
}

fn capacity_view(v: &ReadView<'_>) -> pb::CapacityViewResponse {
    // Pending sandboxes grouped by shape and constraints.
    let mut groups: BTreeMap<String, pb::PendingDemand> = BTreeMap::new();
    for s in v.state.pending() {
        let pb_spec = convert::sandbox_to_pb(s, 0).spec.unwrap_or_default();
        let key = format!(
            "{}|{}|{:?}|{:?}",
            s.spec.tenant, s.spec.priority, pb_spec.resources, pb_spec.constraints
        );
        let group = groups.entry(key).or_insert_with(|| pb::PendingDemand {
            resources: pb_spec.resources.clone(),
            constraints: pb_spec.constraints.clone(),
            oldest_created_unix_ms: s.created_ms,
            tenant: s.spec.tenant.clone(),
            priority: s.spec.priority,
            ..Default::default()
        });
        group.count += 1;
        group.oldest_created_unix_ms = group.oldest_created_unix_ms.min(s.created_ms);
        if group.sandbox_ids.len() < 100 {
            group.sandbox_ids.push(s.id.to_string());
        }
        if let Some(reason) = &s.pending_reason {
            if !group.reasons.iter().any(|r| &r.reason == reason) && group.reasons.len() < 8 {
                group.reasons.push(pb::FilterCount {
                    reason: reason.clone(),
                    nodes: 0,
                });
            }
        }
    }
    let nodes = v
        .state
        .nodes()
        .values()
        .map(|r| pb::NodeCapacity {
            node: Some(convert::node_to_pb(r, v.state)),
            cpu_milli_free: r.cpu_milli_free(),
            memory_mib_free: r.memory_mib_free(),
        })
        .collect();
    pb::CapacityViewResponse {
        pending: groups.into_values().collect(),
        nodes,
        revision: v.state.revision(),
    }
}

type SchedulerStream =
    Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send + 'static>>;

fn scheduler_message(m: pb::scheduler_message::Message) -> Result<pb::SchedulerMessage, Status> {
    Ok(pb::SchedulerMessage { message: Some(m) })
}

#[tonic::async_trait]
impl NodeService for Services {
    type ConnectStream = SchedulerStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = match inbound.next().await {
            Some(Ok(m)) => m,
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("the stream ended before register")),
        };
        let Some(pb::agent_message::Message::Register(register)) = first.message else {
            return Err(Status::invalid_argument(
                "message: the first message on the stream must be register",
            ));
        };
        let (tx, rx) = mpsc::channel(256);
        if !self.handle.is_leader() {
            let (leader_id, leader_address) = self.handle.leader();
            let _ = tx
                .send(scheduler_message(
                    pb::scheduler_message::Message::NotLeader(pb::NotLeader {
                        leader_id,
                        leader_address,
                    }),
                ))
                .await;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let spec = convert::node_spec_from_pb(register.inventory.as_ref(), "register.inventory")?;
        let node = spec.id.clone();
        if register.running.len() > MAX_OBSERVED {
            return Err(Status::invalid_argument(format!(
                "register.running: {} sandboxes; an agent reports at most {MAX_OBSERVED}",
                register.running.len()
            )));
        }
        // Everything the agent has, running or finished: the state machine re-adopts it and
        // makes Lost what the agent no longer has. A malformed id is simply not ours.
        let has: BTreeSet<SandboxId> = register
            .running
            .iter()
            .filter_map(|o| o.sandbox_id.parse().ok())
            .collect();
        let result = self
            .handle
            .command(Command::RegisterAgent { spec, has })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(rejection_status(&r));
        }
        // Running on the agent but not bound to this node in the state: the agent stops them.
        let running: Vec<String> = register
            .running
            .into_iter()
            .filter(|o| o.state == pb::SandboxState::Running as i32)
            .map(|o| o.sandbox_id)
            .collect();
        let lookup = node.clone();
        let (epoch, stop) = self
            .handle
            .read(false, move |v| {
                let record = v.state.node(&lookup);
                let bound = |id: &str| {
                    id.parse::<SandboxId>()
                        .is_ok_and(|id| record.is_some_and(|r| r.sandboxes.contains(&id)))
                };
                let stop: Vec<String> = running.into_iter().filter(|id| !bound(id)).collect();
                (record.map_or(0, |r| r.epoch), stop)
            })
            .await?;
        self.liveness.heard_from(&node);
        let _ = tx
            .send(scheduler_message(
                pb::scheduler_message::Message::RegisterAck(pb::RegisterAck {
                    epoch,
                    heartbeat_interval_ms: self.liveness.settings().heartbeat_interval.as_millis()
                        as u64,
                    stop_sandbox_ids: stop,
                }),
            ))
            .await;
        tracing::info!(node = %node, epoch, "agent registered");
        tokio::spawn(agent_inbound(
            self.handle.clone(),
            self.liveness.clone(),
            node.clone(),
            inbound,
        ));
        tokio::spawn(agent_outbound(self.handle.clone(), node, epoch, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Heartbeats, inventory changes and status reports from an agent.
async fn agent_inbound(
    handle: ReplicaHandle,
    liveness: Liveness,
    node: String,
    mut inbound: Streaming<pb::AgentMessage>,
) {
    let metrics = handle.metrics().clone();
    metrics.agent_streams.inc();
    while let Some(Ok(message)) = inbound.next().await {
        liveness.heard_from(&node);
        let command = match message.message {
            Some(pb::agent_message::Message::Heartbeat(_)) => continue,
            Some(pb::agent_message::Message::SandboxStatus(update)) => {
                match convert::status_update_from_pb(&node, &update) {
                    Ok(u) => Command::UpdateSandboxes { items: vec![u] },
                    Err(status) => {
                        tracing::warn!(node = %node, %status, "bad status report ignored");
                        continue;
                    }
                }
            }
            Some(pb::agent_message::Message::Inventory(update)) => {
                match convert::node_spec_from_pb(update.inventory.as_ref(), "inventory.inventory") {
                    Ok(spec) if spec.id == node => Command::RegisterNode { spec },
                    Ok(spec) => {
                        tracing::warn!(node = %node, other = %spec.id, "inventory update for another node ignored");
                        continue;
                    }
                    Err(status) => {
                        tracing::warn!(node = %node, %status, "bad inventory update ignored");
                        continue;
                    }
                }
            }
            Some(pb::agent_message::Message::Register(_)) | None => {
                tracing::warn!(node = %node, "unexpected message on an agent stream ignored");
                continue;
            }
        };
        match handle.command(command).await {
            Ok(result) => {
                for outcome in result.outcomes {
                    if let ItemOutcome::Rejected(r) = outcome {
                        tracing::debug!(node = %node, rejection = %r, "agent report not applied");
                    }
                }
            }
            Err(status) => tracing::warn!(node = %node, %status, "agent report not recorded"),
        }
    }
    metrics.agent_streams.dec();
    tracing::info!(node = %node, "agent stream closed");
}

/// Sends the agent its assignments and terminations as the applied state changes.
async fn agent_outbound(
    handle: ReplicaHandle,
    node: String,
    epoch: u64,
    tx: mpsc::Sender<Result<pb::SchedulerMessage, Status>>,
) {
    let mut revisions = handle.revisions();
    let mut sent: BTreeSet<SandboxId> = BTreeSet::new();
    // A replica that stops leading sends the agent on to the new leader: agents heartbeat
    // only to the leader, which is the one that marks silent nodes Down.
    let mut leadership = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        if !handle.is_leader() {
            let (leader_id, leader_address) = handle.leader();
            let msg = pb::scheduler_message::Message::NotLeader(pb::NotLeader {
                leader_id,
                leader_address,
            });
            let _ = tx.send(scheduler_message(msg)).await;
            return;
        }
        let lookup = node.clone();
        let known = sent.clone();
        let diff = handle
            .read(false, move |v| {
                let bound: BTreeSet<SandboxId> = v
                    .state
                    .node(&lookup)
                    .map(|r| r.sandboxes.clone())
                    .unwrap_or_default();
                let assign: Vec<pb::Sandbox> = bound
                    .iter()
                    .filter(|id| !known.contains(id))
                    .filter_map(|id| v.state.sandbox(*id))
                    .filter(|s| s.state == SandboxState::Scheduled)
                    .map(|s| {
                        convert::sandbox_to_pb_with_gpus(
                            s,
                            v.state.node(&lookup).map(|n| &n.spec),
                            v.state.revision(),
                        )
                    })
                    .collect();
                // Gone from the node: deleted, or Lost. One that ended on its own (Exited,
                // Failed) was reported by the agent, which keeps its output for `logs`.
                let terminate: Vec<SandboxId> = known
                    .iter()
                    .filter(|id| !bound.contains(id))
                    .filter(|id| {
                        !v.state.sandbox(**id).is_some_and(|s| {
                            matches!(
                                s.state,
                                SandboxState::Exited { .. } | SandboxState::Failed { .. }
                            )
                        })
                    })
                    .copied()
                    .collect();
                (assign, terminate, bound)
            })
            .await;
        let Ok((assign, terminate, bound)) = diff else {
            return;
        };
        for sandbox in assign {
            let msg = pb::scheduler_message::Message::Assign(pb::AssignSandbox {
                sandbox: Some(sandbox),
                epoch,
            });
            if tx.send(scheduler_message(msg)).await.is_err() {
                return;
            }
        }
        for id in terminate {
            let msg = pb::scheduler_message::Message::Terminate(pb::TerminateSandbox {
                sandbox_id: id.to_string(),
                reason: "deleted or finished".into(),
                grace_ms: 10_000,
            });
            if tx.send(scheduler_message(msg)).await.is_err() {
                return;
            }
        }
        sent = bound;
        loop {
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = leadership.tick() => {
                    if !handle.is_leader() || tx.is_closed() {
                        break;
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        // Coalesce bursts of applied entries into one look at the node. Each look is a
        // closure on the Raft thread, per connected agent and per burst: fine for hundreds of
        // nodes; thousands want a per-node change feed (a node revision kept by `apply`).
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn decode_messages(messages: &[Vec<u8>]) -> Result<Vec<Message>, Status> {
    messages
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            Message::parse_from_bytes(bytes).map_err(|e| {
                Status::invalid_argument(format!("messages[{i}]: not a Raft message: {e}"))
            })
        })
        .collect()
}

impl Services {
    fn check_cluster(&self, cluster_id: &str) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(Status::failed_precondition(format!(
                "cluster_id: {cluster_id:?} is not this replica's cluster ({:?})",
                self.cluster_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for Services {
    async fn send(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let batch = request.into_inner();
        self.check_cluster(&batch.cluster_id)?;
        if batch.to != self.handle.id() {
            return Err(Status::failed_precondition(format!(
                "to: this is replica {}, not {}",
                self.handle.id(),
                batch.to
            )));
        }
        let messages = decode_messages(&batch.messages)?;
        self.handle.step(messages)?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<Message> = None;
        let mut data: Vec<u8> = Vec::new();
        let mut done = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            self.check_cluster(&chunk.cluster_id)?;
            if header.is_none() {
                if chunk.message.is_empty() {
                    return Err(Status::invalid_argument(
                        "message: the first chunk must carry the snapshot message",
                    ));
                }
                header = Some(Message::parse_from_bytes(&chunk.message).map_err(|e| {
                    Status::invalid_argument(format!("message: not a Raft message: {e}"))
                })?);
            }
            if data.len() + chunk.data.len() > SNAPSHOT_MAX_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "data: the snapshot exceeds {SNAPSHOT_MAX_BYTES} bytes"
                )));
            }
            data.extend_from_slice(&chunk.data);
            if chunk.last {
                done = true;
                break;
            }
        }
        let (Some(mut message), true) = (header, done) else {
            return Err(Status::invalid_argument(
                "last: the stream ended before the last chunk",
            ));
        };
        message.mut_snapshot().set_data(data.into());
        self.handle.step(vec![message])?;
        Ok(Response::new(pb::RaftAck {}))
    }
}
