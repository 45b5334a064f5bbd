//! `SandboxService.PauseSandbox` and `ResumeSandbox`: each proposes one command and answers
//! with the sandbox as it then stands (PAUSING, or PENDING/SCHEDULED on its way back). The
//! agent takes the snapshot and restores it; see `agent_outbound` for what it is sent.

use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;

use super::{SandboxApi, only_outcome, parse_sandbox_id};
use crate::model::SandboxId;
use crate::service::auth::Access;
use crate::service::{ServiceError, Store};
use crate::state::{Command, ItemOutcome};

impl<S: Store> SandboxApi<S> {
    pub(super) async fn pause_call(
        &self,
        request: Request<pb::PauseSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let access = self.sandbox_access(&request).await?;
        let id = parse_sandbox_id("sandbox_id", &request.get_ref().sandbox_id)?;
        self.visible(&access, id).await?;
        let command = if request.get_ref().standby {
            Command::StandbySandboxes { items: vec![id] }
        } else {
            Command::PauseSandboxes {
                items: vec![id],
                gpu_filesystem_only: self.sessions.gpu_pause_filesystem_only,
            }
        };
        self.propose_for(command, access, id).await
    }

    pub(super) async fn resume_call(
        &self,
        request: Request<pb::ResumeSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let access = self.sandbox_access(&request).await?;
        let id = parse_sandbox_id("sandbox_id", &request.get_ref().sandbox_id)?;
        self.visible(&access, id).await?;
        let command = Command::ResumeSandboxes { items: vec![id] };
        self.propose_for(command, access, id).await
    }

    /// NOT_FOUND unless the caller may see the sandbox (another tenant's is answered as one
    /// that does not exist).
    async fn visible(&self, access: &Access, id: SandboxId) -> Result<(), Status> {
        let seen = self.covers(access, id).await?;
        if seen {
            Ok(())
        } else {
            Err(ServiceError::NotFound(format!("sandbox_id: sandbox {id} does not exist")).into())
        }
    }

    /// Proposes a one-item command about `id` and answers with the sandbox after it.
    async fn propose_for(
        &self,
        command: Command,
        access: Access,
        id: SandboxId,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let result = self.handle.command(command).await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        self.visible_sandbox(false, access, id)
            .await
            .map(Response::new)
    }
}
