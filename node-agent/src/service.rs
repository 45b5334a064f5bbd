//! `AgentService`, which the agent serves to the scheduler replicas: captured output
//! ([`crate::logs`]), exec and file calls into its sandboxes ([`crate::calls`]), and the
//! snapshots of sandboxes paused here ([`crate::transfer`]), and filesystem snapshots pushed
//! as images ([`crate::snapshot`]).

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::agent_service_server::AgentService;

use crate::calls::{self, Answers};
use crate::logs::{LogStream, Logs};
use crate::runtime::Runtime;
use crate::snapshot::Snapshots;

/// The service over this node's sandbox directories.
#[derive(Clone)]
pub struct AgentApi {
    runtime: Runtime,
    logs: Logs,
    snapshots: Snapshots,
}

impl AgentApi {
    /// Serves the sandboxes of `runtime`, taking filesystem snapshots with `snapshots`.
    pub fn new(runtime: Runtime, snapshots: Snapshots) -> AgentApi {
        AgentApi {
            logs: Logs::new(runtime.clone()),
            runtime,
            snapshots,
        }
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ReadLogsStream = LogStream;

    async fn read_logs(
        &self,
        request: Request<pb::ReadLogsRequest>,
    ) -> Result<Response<LogStream>, Status> {
        self.logs.read_logs(request).await
    }

    type ExecStream = Answers<pb::ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        calls::exec(&self.runtime, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        calls::write_file(&self.runtime, request.into_inner())
            .await
            .map(Response::new)
    }

    type ReadFileStream = Answers<pb::ReadFileResponse>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadFileStream>, Status> {
        calls::read_file(&self.runtime, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_dir(
        &self,
        request: Request<pb::ListDirRequest>,
    ) -> Result<Response<pb::ListDirResponse>, Status> {
        calls::list_dir(&self.runtime, request.into_inner())
            .await
            .map(Response::new)
    }

    type ReadSnapshotStream = ReceiverStream<Result<pb::SnapshotData, Status>>;

    async fn read_snapshot(
        &self,
        request: Request<pb::ReadSnapshotRequest>,
    ) -> Result<Response<Self::ReadSnapshotStream>, Status> {
        crate::transfer::read_snapshot(&self.runtime, request.into_inner()).await
    }

    type SnapshotSandboxStream = crate::snapshot::Progress;

    async fn snapshot_sandbox(
        &self,
        request: Request<pb::AgentSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotSandboxStream>, Status> {
        self.snapshots
            .snapshot(request.into_inner())
            .await
            .map(Response::new)
    }
}
