//! `AdminService`: cluster status, nodes (list, cordon, uncordon, drain, remove), tenant
//! quotas, membership, and the autoscaler's capacity view and lease (tokens and warm pools
//! are in `tokens` and `pools`).

use std::collections::{BTreeMap, BTreeSet};

use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_server::AdminService;

use super::{AdminApi, check_node_id, linearizable, only_outcome};
use crate::convert;
use crate::model::NodeStatus;
use crate::replication::MembershipChange;
use crate::service::driver::ReadView;
use crate::service::{ServiceError, Store};
use crate::state::{Command, ItemOutcome, Rejection};

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

impl<S: Store> AdminApi<S> {
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
            return Err(ServiceError::Rejected(r).into());
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
            .ok_or_else(|| ServiceError::NotFound("the node was removed meanwhile".into()).into())
    }

    async fn membership_response(&self) -> Result<Response<pb::MembershipResponse>, Status> {
        let replicas = self.handle.read(false, replicas).await?;
        Ok(Response::new(pb::MembershipResponse { replicas }))
    }
}

#[tonic::async_trait]
impl<S: Store> AdminService for AdminApi<S> {
    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.require_operator(&request, "ClusterStatus").await?;
        // This replica's own view: status must answer even without a quorum.
        let status = self.handle.read(false, cluster_status).await?;
        Ok(Response::new(status))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.require_operator(&request, "ListNodes").await?;
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
        self.require_operator(&request, "CordonNode").await?;
        self.set_node_status(request, NodeStatus::Cordoned).await
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.require_operator(&request, "UncordonNode").await?;
        self.set_node_status(request, NodeStatus::Ready).await
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.require_operator(&request, "DrainNode").await?;
        self.set_node_status(request, NodeStatus::Draining).await
    }

    async fn set_tenant_quota(
        &self,
        request: Request<pb::SetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        self.require_admin(&request, "SetTenantQuota").await?;
        let req = request.into_inner();
        let (tenant, quota) =
            convert::quota_from_pb(req.quota.as_ref(), "quota").map_err(ServiceError::from)?;
        let result = self
            .handle
            .command(Command::SetTenantQuota {
                tenant: tenant.clone(),
                quota: quota.clone(),
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        Ok(Response::new(convert::quota_to_pb(&tenant, &quota)))
    }

    async fn list_tenant_quotas(
        &self,
        request: Request<pb::ListTenantQuotasRequest>,
    ) -> Result<Response<pb::ListTenantQuotasResponse>, Status> {
        self.require_admin(&request, "ListTenantQuotas").await?;
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
        self.require_admin(&request, "AddPeer").await?;
        let req = request.into_inner();
        let mut v = berth_proto::Validator::new();
        v.check(req.peer_id != 0, "peer_id", || "must be non-zero".into());
        v.address("address", &req.address);
        v.finish().map_err(ServiceError::from)?;
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
        self.require_admin(&request, "RemovePeer").await?;
        let id = request.get_ref().peer_id;
        if id == 0 {
            return Err(ServiceError::invalid("peer_id", "must be non-zero").into());
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
        self.require_operator(&request, "CapacityView").await?;
        let linear = linearizable(&request);
        let view = self.handle.read(linear, capacity_view).await?;
        Ok(Response::new(view))
    }

    async fn remove_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        self.require_operator(&request, "RemoveNode").await?;
        let req = request.into_inner();
        if req.node_id.is_empty() {
            return Err(ServiceError::missing("node_id").into());
        }
        let result = self
            .handle
            .command(Command::RemoveNode { node: req.node_id })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn autoscaler_lease(
        &self,
        request: Request<pb::AutoscalerLeaseRequest>,
    ) -> Result<Response<pb::AutoscalerLeaseResponse>, Status> {
        self.require_operator(&request, "AutoscalerLease").await?;
        let req = request.into_inner();
        if req.holder.is_empty() {
            return Err(ServiceError::missing("holder").into());
        }
        if req.ttl_ms == 0 {
            return Err(ServiceError::invalid("ttl_ms", "must be above 0").into());
        }
        if req.decisions.len() > crate::state::MAX_AUTOSCALER_DECISIONS {
            return Err(ServiceError::invalid(
                "decisions",
                format!(
                    "{} lines; at most {} per request",
                    req.decisions.len(),
                    crate::state::MAX_AUTOSCALER_DECISIONS
                ),
            )
            .into());
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
            ItemOutcome::Rejected(r) => Err(ServiceError::Rejected(r).into()),
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

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let max = self.security.max_join_ttl_s;
        self.create_token_call(request, max).await
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        self.revoke_token_call(request).await
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.list_tokens_call(request).await
    }

    async fn set_warm_pool(
        &self,
        request: Request<pb::SetWarmPoolRequest>,
    ) -> Result<Response<pb::WarmPool>, Status> {
        self.set_warm_pool_call(request).await
    }

    async fn delete_warm_pool(
        &self,
        request: Request<pb::DeleteWarmPoolRequest>,
    ) -> Result<Response<pb::DeleteWarmPoolResponse>, Status> {
        self.delete_warm_pool_call(request).await
    }

    async fn list_warm_pools(
        &self,
        request: Request<pb::ListWarmPoolsRequest>,
    ) -> Result<Response<pb::ListWarmPoolsResponse>, Status> {
        self.list_warm_pools_call(request).await
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
