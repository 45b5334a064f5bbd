//! `SandboxService.SnapshotSandbox`: checked here, done by the node agent holding the
//! sandbox (its write layer is on that node's disk), which pushes the new image with its
//! own registry settings. The replica checks the caller's tenant (another tenant's sandbox
//! is answered as none), the fields, and the sandbox's state, finds the node (the bound
//! node of a Running or Standby sandbox, the snapshot's holder of a Paused one), and passes
//! the sandbox's tenant down: the agent pushes under `<snapshot_repository>/<tenant>/`.
//! The agent's answer (phases, then the result) is streamed through, so a long snapshot is
//! not cut by the unary deadline of the replica's channels to agents; cancelling the
//! client's call cancels the agent's.

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use berth_proto::image::ImageReference;
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_client::AgentServiceClient;

use super::sandbox_calls::{Boxed, upstream};
use super::{SandboxApi, parse_sandbox_id};
use crate::model::SandboxState;
use crate::service::{ServiceError, Store};

/// What the agent needs, or why the sandbox cannot be snapshotted.
struct Target {
    address: String,
    node: String,
    tenant: String,
}

/// `reference`, when given: a well-formed tag reference (the agent checks it is under the
/// tenant's part of its repository, which only it knows).
fn check_reference(reference: &str) -> Result<(), ServiceError> {
    if reference.is_empty() {
        return Ok(());
    }
    let parsed =
        ImageReference::parse(reference).map_err(|why| ServiceError::invalid("reference", why))?;
    if parsed.digest.is_some() || parsed.tag.is_none() {
        return Err(ServiceError::invalid(
            "reference",
            format!("{reference:?} must name a tag and no digest (REPOSITORY:TAG)"),
        ));
    }
    Ok(())
}

impl<S: Store> SandboxApi<S> {
    pub(super) async fn snapshot_call(
        &self,
        request: Request<pb::SnapshotSandboxRequest>,
    ) -> Result<Response<Boxed<pb::SnapshotSandboxProgress>>, Status> {
        let access = self.sandbox_access(&request).await?;
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        check_reference(&req.reference)?;
        let found = self
            .handle
            .read(false, move |v| {
                let sandbox = v
                    .state
                    .sandbox(id)
                    .filter(|s| access.covers(&s.spec.tenant))?;
                let state = sandbox.state.name();
                if sandbox.spec.image.is_empty() {
                    return Some(Err(format!(
                        "sandbox_id: {id} has no image (it runs on the host's root); only a \
                         sandbox created from an image can be snapshotted"
                    )));
                }
                let node = match &sandbox.state {
                    SandboxState::Running | SandboxState::Standby { .. } => {
                        sandbox.binding.as_ref().map(|b| b.placement.node.clone())
                    }
                    SandboxState::Paused => sandbox.snapshot.as_ref().map(|s| s.node.clone()),
                    _ => {
                        return Some(Err(format!(
                            "sandbox_id: {id} is {state}; only a running, standby or paused \
                             sandbox can be snapshotted"
                        )));
                    }
                };
                let Some(node) = node else {
                    return Some(Err(format!("sandbox_id: {id} is {state} but on no node")));
                };
                Some(match v.state.node(&node) {
                    Some(r) if !r.spec.agent_address.is_empty() => Ok(Target {
                        address: r.spec.agent_address.clone(),
                        node: node.to_string(),
                        tenant: sandbox.spec.tenant.clone(),
                    }),
                    Some(_) => Err(format!("node {node} registered no agent address")),
                    None => Err(format!("node {node} is no longer registered")),
                })
            })
            .await?;
        let target = match found {
            None => {
                return Err(ServiceError::NotFound(format!(
                    "sandbox_id: sandbox {id} does not exist"
                ))
                .into());
            }
            Some(Err(why)) => return Err(ServiceError::Precondition(why).into()),
            Some(Ok(t)) => t,
        };
        let channel = self
            .agents
            .get_expecting(&target.address, Some(berth_net::Expect::Node(target.node)))
            .map_err(|e| ServiceError::Precondition(format!("node agent: {e}")))?;
        let answer = AgentServiceClient::new(channel)
            .snapshot_sandbox(pb::AgentSnapshotRequest {
                sandbox_id: id.to_string(),
                reference: req.reference,
                tenant: target.tenant,
            })
            .await
            .map_err(|s| upstream(&target.address, s))?
            .into_inner();
        let address = target.address;
        Ok(Response::new(Box::pin(
            answer.map(move |r| r.map_err(|s| upstream(&address, s))),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_tags_without_digests() {
        assert!(check_reference("").is_ok());
        assert!(check_reference("127.0.0.1:5000/s/acme/dev:v1").is_ok());
        for bad in [
            "127.0.0.1:5000/s/acme/dev",
            "127.0.0.1:5000/s/Acme/dev:v1",
            "127.0.0.1:5000/s/acme/dev:v1@sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            let err = Status::from(check_reference(bad).expect_err(bad));
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(
                err.message().contains("reference"),
                "{bad}: {}",
                err.message()
            );
        }
    }
}
