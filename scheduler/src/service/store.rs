//! The seam between the gRPC services and the replicated state: propose, read, watch.
//!
//! `SandboxService`, `AdminService` and `NodeService`, the sandbox watches and the node
//! liveness checker reach the state only through [`Store`], so a second backend (etcd, as
//! a replicated log and leader lock) plugs in by implementing it, without touching them.
//! The Raft backend is [`ReplicaHandle`], the handle to the Raft thread. `Peer` (Raft
//! traffic) is the one service that is backend-specific and holds the handle itself.
//!
//! The rules every backend keeps: a write is answered after it commits and applies
//! locally; creates are idempotent on (tenant, request id); a follower answers
//! [`ServiceError::NotLeader`]; retryable conditions are `UNAVAILABLE`.

use std::future::Future;

use tokio::sync::watch;

use berth_proto::pb::v1 as pb;

use super::ServiceError;
use super::driver::{CommandResult, ReadView, ReplicaHandle};
use super::feed::ChangeFeed;
use super::metrics::Metrics;
use crate::model::SandboxId;
use crate::replication::MembershipChange;
use crate::state::{Command, Submission};

/// What the services need from the replicated state.
pub trait Store: Clone + Send + Sync + 'static {
    /// This replica's id.
    fn id(&self) -> u64;

    /// The leader as last known: (id, client address); id 0 when unknown.
    fn leader(&self) -> (u64, String);

    /// Whether this replica leads (proposals go through it).
    fn is_leader(&self) -> bool;

    /// `NotLeader` unless this replica leads.
    fn require_leader(&self) -> Result<(), ServiceError> {
        if self.is_leader() {
            return Ok(());
        }
        let (leader, address) = self.leader();
        Err(ServiceError::NotLeader { leader, address })
    }

    /// Why the backend stopped, if it did.
    fn fatal(&self) -> Option<String>;

    /// A receiver that changes whenever the applied revision does.
    fn revisions(&self) -> watch::Receiver<u64>;

    /// The replica's metrics.
    fn metrics(&self) -> &Metrics;

    /// What applied entries changed: a wake-up per node and the recent sandbox history.
    /// A backend publishes into it after applying, before answering.
    fn feed(&self) -> &ChangeFeed;

    /// Creates one sandbox (batched by the leader); answered after commit and apply.
    fn create(
        &self,
        item: Submission,
    ) -> impl Future<Output = Result<pb::CreateSandboxResponse, ServiceError>> + Send;

    /// Deletes a sandbox; `false` when it did not exist.
    fn delete(&self, id: SandboxId) -> impl Future<Output = Result<bool, ServiceError>> + Send;

    /// Proposes a command and waits until it applies.
    fn command(
        &self,
        command: Command,
    ) -> impl Future<Output = Result<CommandResult, ServiceError>> + Send;

    /// Changes the replica set and waits until the change applies.
    fn membership(
        &self,
        change: MembershipChange,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send;

    /// Runs `f` against the applied state: linearizable (leader only, after confirming
    /// leadership, on the backend's own thread) or this replica's state as last published,
    /// on the caller's task, without waiting on the backend.
    fn read<T, F>(
        &self,
        linearizable: bool,
        f: F,
    ) -> impl Future<Output = Result<T, ServiceError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&ReadView<'_>) -> T + Send + 'static;
}

impl Store for ReplicaHandle {
    fn id(&self) -> u64 {
        ReplicaHandle::id(self)
    }

    fn leader(&self) -> (u64, String) {
        ReplicaHandle::leader(self)
    }

    fn is_leader(&self) -> bool {
        ReplicaHandle::is_leader(self)
    }

    fn fatal(&self) -> Option<String> {
        ReplicaHandle::fatal(self)
    }

    fn revisions(&self) -> watch::Receiver<u64> {
        ReplicaHandle::revisions(self)
    }

    fn metrics(&self) -> &Metrics {
        ReplicaHandle::metrics(self)
    }

    fn feed(&self) -> &ChangeFeed {
        ReplicaHandle::feed(self)
    }

    fn create(
        &self,
        item: Submission,
    ) -> impl Future<Output = Result<pb::CreateSandboxResponse, ServiceError>> + Send {
        ReplicaHandle::create(self, item)
    }

    fn delete(&self, id: SandboxId) -> impl Future<Output = Result<bool, ServiceError>> + Send {
        ReplicaHandle::delete(self, id)
    }

    fn command(
        &self,
        command: Command,
    ) -> impl Future<Output = Result<CommandResult, ServiceError>> + Send {
        ReplicaHandle::command(self, command)
    }

    fn membership(
        &self,
        change: MembershipChange,
    ) -> impl Future<Output = Result<(), ServiceError>> + Send {
        ReplicaHandle::membership(self, change)
    }

    fn read<T, F>(
        &self,
        linearizable: bool,
        f: F,
    ) -> impl Future<Output = Result<T, ServiceError>> + Send
    where
        T: Send + 'static,
        F: FnOnce(&ReadView<'_>) -> T + Send + 'static,
    {
        ReplicaHandle::read(self, linearizable, f)
    }
}
