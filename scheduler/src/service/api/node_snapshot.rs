//! `NodeService.FetchSnapshot`: a node resuming a sandbox whose snapshot another node holds
//! reads it through a replica. The replica grants exactly that transfer (the sandbox is
//! bound to the caller and its snapshot is elsewhere) and streams the holder agent's
//! `ReadSnapshot` through, so a node never reaches another node's agent itself and may
//! fetch nothing that is not bound to it.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_client::AgentServiceClient;

use super::sandbox_calls::{Boxed, upstream};
use super::{NodeApi, parse_sandbox_id};
use crate::service::auth::{Caller, caller};
use crate::service::{ServiceError, Store};

impl<S: Store> NodeApi<S> {
    pub(super) async fn fetch_snapshot_call(
        &self,
        request: Request<pb::FetchSnapshotRequest>,
    ) -> Result<Response<Boxed<pb::SnapshotData>>, Status> {
        let who = caller(&request);
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        // A node's certificate names it; without TLS (or for an operator) the request does.
        let node = match &who {
            Caller::Cert(identity) => match &identity.role {
                berth_net::Role::Node(name) => name.clone(),
                berth_net::Role::Admin(_) => req.node_id.clone(),
                _ => {
                    return Err(self.node_denied(
                        tonic::Code::PermissionDenied,
                        format!("{identity} may not fetch snapshots; nodes fetch their own"),
                    ));
                }
            },
            Caller::Insecure => req.node_id.clone(),
            Caller::Anonymous => {
                return Err(self.node_denied(
                    tonic::Code::Unauthenticated,
                    "NodeService.FetchSnapshot needs a node certificate".into(),
                ));
            }
        };
        let lookup = node.clone();
        let grant = self
            .handle
            .read(false, move |v| {
                let sandbox = v.state.sandbox(id)?;
                let bound = sandbox
                    .binding
                    .as_ref()
                    .is_some_and(|b| b.placement.node.as_str() == lookup);
                let snap = sandbox.snapshot.as_ref()?;
                if !bound || snap.node.as_str() == lookup {
                    return None;
                }
                let holder = v.state.node(&snap.node)?;
                Some((holder.spec.agent_address.clone(), snap.node.to_string()))
            })
            .await?;
        let Some((address, holder)) = grant else {
            return Err(self.node_denied(
                tonic::Code::PermissionDenied,
                format!(
                    "sandbox_id: {id} is not resuming on node {node} from another node's \
                     snapshot; a node fetches only the snapshot of a sandbox bound to it"
                ),
            ));
        };
        if address.is_empty() {
            return Err(ServiceError::Unavailable(format!(
                "node {holder}, which holds the snapshot of {id}, registered no agent address"
            ))
            .into());
        }
        let channel = self
            .agents
            .get_expecting(&address, Some(berth_net::Expect::Node(holder)))
            .map_err(|e| ServiceError::Unavailable(format!("the agent at {address}: {e}")))?;
        let stream = AgentServiceClient::new(channel)
            .read_snapshot(pb::ReadSnapshotRequest {
                sandbox_id: id.to_string(),
            })
            .await
            .map_err(|s| upstream(&address, s))?
            .into_inner();
        let stream = stream.map(move |item| item.map_err(|s| upstream(&address, s)));
        Ok(Response::new(Box::pin(stream)))
    }
}
