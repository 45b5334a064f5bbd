//! `SandboxService`: create, get, list, delete, watch, and logs proxied to the node agent
//! (the batch creates and deletes are in `sandbox_batch`, over this file's `create_item`
//! and `delete_item`; exec and file calls are in `sandbox_calls`).

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::sandbox_service_server::SandboxService;

use super::sandbox_calls::{Boxed, upstream};
use super::{PAGE_MAX, SandboxApi, check_create_size, linearizable, parse_sandbox_id};
use crate::convert;
use crate::model::SandboxId;
use crate::service::auth::Access;
use crate::service::driver::ReadView;
use crate::service::watch::{self, WatchFilter};
use crate::service::{ServiceError, Store};
use crate::state::Submission;

/// Marks a `GetSandbox` one replica sent another for a sandbox's usage, so it is not sent on.
const USAGE_FORWARDED: &str = "berth-usage-forwarded";
/// How long a follower waits for the leader's usage figures before answering without them.
const USAGE_FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl<S: Store> SandboxApi<S> {
    /// Sandbox `id` as `access` may see it: NOT_FOUND when it does not exist or belongs to
    /// another tenant (which is not told apart, so ids leak nothing).
    pub(super) async fn visible_sandbox(
        &self,
        linear: bool,
        access: Access,
        id: SandboxId,
    ) -> Result<pb::Sandbox, Status> {
        let found = self
            .handle
            .read(linear, move |v| {
                v.state
                    .sandbox(id)
                    .filter(|s| access.covers(&s.spec.tenant))
                    .map(|s| convert::sandbox_to_pb_in(s, v.state))
            })
            .await?;
        found.ok_or_else(|| ServiceError::NotFound(format!("sandbox {id} does not exist")).into())
    }

    /// Whether sandbox `id` exists and `access` may see it (a linearizable read).
    pub(super) async fn covers(&self, access: &Access, id: SandboxId) -> Result<bool, Status> {
        let access = access.clone();
        Ok(self
            .handle
            .read(true, move |v| {
                v.state
                    .sandbox(id)
                    .is_some_and(|s| access.covers(&s.spec.tenant))
            })
            .await?)
    }

    /// A Running sandbox's last reported usage: from the leader's book here, or, on a
    /// follower, asked of the leader (best effort: without an answer, none is shown).
    async fn fill_usage(&self, id: SandboxId, sandbox: &mut pb::Sandbox, forwarded: bool) {
        let Some(status) = sandbox.status.as_mut() else {
            return;
        };
        if status.state != pb::SandboxState::Running as i32 || status.node_id.is_empty() {
            return;
        }
        if self.handle.is_leader() {
            status.usage = self.usage.get(id, &status.node_id);
            return;
        }
        let (_, address) = self.handle.leader();
        if forwarded || address.is_empty() {
            return;
        }
        let Ok(channel) = self.agents.get(&address) else {
            return;
        };
        let mut request = Request::new(pb::GetSandboxRequest {
            sandbox_id: sandbox.id.clone(),
        });
        request.metadata_mut().insert(
            USAGE_FORWARDED,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        request.metadata_mut().insert(
            crate::service::driver::READ_MODE_METADATA,
            tonic::metadata::MetadataValue::from_static("local"),
        );
        let mut client =
            berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient::new(channel);
        if let Ok(Ok(answer)) =
            tokio::time::timeout(USAGE_FORWARD_TIMEOUT, client.get_sandbox(request)).await
        {
            status.usage = answer.into_inner().status.and_then(|s| s.usage);
        }
    }
}

#[tonic::async_trait]
impl<S: Store> SandboxService for SandboxApi<S> {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::CreateSandboxResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let item = self.create_item(&access, request.into_inner())?;
        let response = self.handle.create(item).await?;
        Ok(Response::new(response))
    }

    async fn create_sandboxes(
        &self,
        request: Request<pb::CreateSandboxesRequest>,
    ) -> Result<Response<pb::CreateSandboxesResponse>, Status> {
        self.create_sandboxes_call(request).await
    }

    async fn delete_sandboxes(
        &self,
        request: Request<pb::DeleteSandboxesRequest>,
    ) -> Result<Response<pb::DeleteSandboxesResponse>, Status> {
        self.delete_sandboxes_call(request).await
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let access = self.sandbox_access(&request).await?;
        let linear = linearizable(&request);
        let id = parse_sandbox_id("sandbox_id", &request.get_ref().sandbox_id)?;
        let mut found = self.visible_sandbox(linear, access, id).await?;
        let forwarded = request.metadata().contains_key(USAGE_FORWARDED);
        self.fill_usage(id, &mut found, forwarded).await;
        Ok(Response::new(found))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let access = self.sandbox_access(&request).await?;
        let linear = linearizable(&request);
        let mut req = request.into_inner();
        self.own_tenant(&access, "tenant", &mut req.tenant)?;
        let page_size = match req.page_size {
            0 => 100,
            n if n > PAGE_MAX => {
                return Err(ServiceError::invalid(
                    "page_size",
                    format!("{n} is above the limit of {PAGE_MAX}"),
                )
                .into());
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
        let access = self.sandbox_access(&request).await?;
        let existed = self
            .delete_item(&access, "sandbox_id", &request.get_ref().sandbox_id)
            .await?;
        Ok(Response::new(pb::DeleteSandboxResponse { existed }))
    }

    type WatchSandboxesStream =
        Pin<Box<dyn Stream<Item = Result<pb::SandboxEvent, Status>> + Send + 'static>>;

    async fn watch_sandboxes(
        &self,
        mut request: Request<pb::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let access = self.sandbox_access(&request).await?;
        self.own_tenant(&access, "tenant", &mut request.get_mut().tenant)?;
        let filter = WatchFilter::from_request(request.get_ref())?;
        let after = request.get_ref().after_revision;
        let (tx, rx) = mpsc::channel(256);
        watch::start(self.handle.clone(), &self.watches, filter, after, tx).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadLogsStream = Boxed<pb::LogChunk>;

    async fn read_logs(
        &self,
        request: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<Self::ReadLogsStream>, Status> {
        let access = self.sandbox_access(&request).await?;
        let req = request.into_inner();
        let id = parse_sandbox_id("sandbox_id", &req.sandbox_id)?;
        // The node's agent address is part of its registered inventory, so any replica's
        // applied state knows it; no need to go through the leader.
        let (address, mut agent) = self.agent_of(id, false, &access).await?;
        let answer = agent
            .read_logs(req)
            .await
            .map_err(|s| upstream(&address, s))?
            .into_inner();
        Ok(Response::new(Box::pin(answer)))
    }

    type ExecStream = Boxed<pb::ExecResponse>;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.exec_call(request).await
    }

    async fn write_file(
        &self,
        request: Request<tonic::Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        self.write_file_call(request).await
    }

    type ReadFileStream = Boxed<pb::ReadFileResponse>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        self.read_file_call(request).await
    }

    async fn list_dir(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        self.list_dir_call(request).await
    }

    async fn pause_sandbox(
        &self,
        request: Request<pb::PauseSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        self.pause_call(request).await
    }

    async fn resume_sandbox(
        &self,
        request: Request<pb::ResumeSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        self.resume_call(request).await
    }

    type SnapshotSandboxStream = Boxed<pb::SnapshotSandboxProgress>;

    async fn snapshot_sandbox(
        &self,
        request: Request<pb::SnapshotSandboxRequest>,
    ) -> Result<Response<Self::SnapshotSandboxStream>, Status> {
        self.snapshot_call(request).await
    }
}

impl<S: Store> SandboxApi<S> {
    /// One create checked as it comes through the door, for CreateSandbox and each item of
    /// CreateSandboxes alike: the size limit, the tenant (a tenant token's own, or
    /// PERMISSION_DENIED), every field, then the session defaults. The result is what
    /// [`Store::create`] takes.
    pub(super) fn create_item(
        &self,
        access: &Access,
        mut request: pb::CreateSandboxRequest,
    ) -> Result<Submission, Status> {
        check_create_size(&request)?;
        if let Some(spec) = request.spec.as_mut() {
            self.own_tenant(access, "spec.tenant", &mut spec.tenant)?;
        }
        let (request_id, mut spec) =
            convert::create_request_from_pb(&request).map_err(ServiceError::from)?;
        self.sessions.apply(&mut spec).map_err(ServiceError::from)?;
        Ok(Submission::new(request_id, spec))
    }

    /// One delete, for DeleteSandbox and each id of DeleteSandboxes alike: `value` (the
    /// request's `field`) must be a sandbox id; another tenant's sandbox is answered as one
    /// that does not exist. Whether it existed.
    pub(super) async fn delete_item(
        &self,
        access: &Access,
        field: &str,
        value: &str,
    ) -> Result<bool, Status> {
        let id = parse_sandbox_id(field, value)?;
        if *access != Access::Admin {
            // Another tenant's sandbox is answered as a sandbox that does not exist.
            if !self.covers(access, id).await? {
                return Ok(false);
            }
        }
        Ok(self.handle.delete(id).await?)
    }

    /// A tenant token acts for its own tenant: an empty `field` (a create's spec, a list or
    /// watch filter) becomes its tenant, another tenant's is refused (and counted).
    fn own_tenant(&self, access: &Access, field: &str, tenant: &mut String) -> Result<(), Status> {
        if let Access::Tenant(t) = access {
            if tenant.is_empty() {
                *tenant = t.clone();
            } else if tenant != t {
                return Err(self.denied(
                    crate::service::auth::service::SANDBOX,
                    tonic::Code::PermissionDenied,
                    format!("{field}: {tenant:?} is not the tenant of this token ({t:?})"),
                ));
            }
        }
        Ok(())
    }
}

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
