//! The tonic services of a scheduler replica, one file per service:
//! [`sandbox`] (`SandboxService`), [`admin`] (`AdminService`), [`node`] (`NodeService`, the
//! scheduler's side of the agent stream) and [`peer`] (`Peer`, Raft traffic). They share
//! one [`Shared`] and the request checks below. Beside them: `access` (a caller resolved to
//! what it may touch: certificate role, API token), `sandbox_batch`, `sandbox_calls`,
//! `sandbox_pause` and `sandbox_snapshot` (`SandboxService`'s batch creates and deletes, its
//! calls into sandboxes, pause and resume, and filesystem snapshots), `tokens` (`AdminService`'s token calls)
//! and `join` (`NodeService.Join` and `RenewCertificate`, node certificates signed with the
//! cluster CA). Which kind of caller reaches each service at all is
//! [`crate::service::auth`].
//!
//! Writes go to the leader; a follower answers FAILED_PRECONDITION with the leader's address
//! in the `berth-leader` metadata. Reads are linearizable (ReadIndex on the leader) unless
//! the client sends `berth-read: local`, which reads this replica's applied state. Errors
//! are [`ServiceError`]s, turned into a `Status` at the edge.

mod access;
mod admin;
mod join;
mod node;
mod node_snapshot;
mod peer;
mod pools;
mod sandbox;
mod sandbox_batch;
mod sandbox_calls;
mod sandbox_pause;
mod sandbox_snapshot;
mod sandbox_target;
mod tokens;

use tonic::Request;

use berth_net::{ChannelPool, NetConfig};
use berth_proto::pb::v1 as pb;

use super::ServiceError;
use super::driver::{READ_MODE_METADATA, ReplicaHandle};
use super::liveness::Liveness;
use super::store::Store;
use super::watch::WatchSlots;
use crate::model::SandboxId;
use crate::state::ItemOutcome;

/// Largest page of a list.
pub const PAGE_MAX: u32 = 1_000;
/// Most sandboxes an agent may report in its registration.
pub const MAX_OBSERVED: usize = 10_000;
/// Largest snapshot a replica accepts from a leader.
pub const SNAPSHOT_MAX_BYTES: usize = 4 << 30;

/// What every service of a replica holds: the Raft thread's handle, the cluster id, the
/// agents' liveness, the watch slots and the channels to node agents (reused, one per
/// agent address).
#[derive(Clone)]
pub struct Shared<S: Store = ReplicaHandle> {
    handle: S,
    cluster_id: String,
    liveness: Liveness,
    watches: WatchSlots,
    agents: ChannelPool,
    sessions: std::sync::Arc<crate::sessions::SessionsConfig>,
    usage: super::usage::UsageBook,
    security: std::sync::Arc<super::auth::Security>,
}

/// The four services of one Raft replica, sharing one [`Shared`]. (`SandboxApi`,
/// `AdminApi` and `NodeApi` work over any [`Store`]; `PeerApi` carries Raft traffic and so
/// needs the Raft thread's handle.)
#[derive(Clone)]
pub struct Services {
    /// `SandboxService`.
    pub sandbox: SandboxApi,
    /// `AdminService`.
    pub admin: AdminApi,
    /// `NodeService` (the agents' streams).
    pub node: NodeApi,
    /// `Peer` (Raft traffic).
    pub peer: PeerApi,
}

impl<S: Store> Shared<S> {
    /// What the services share, over `handle`; `liveness` records the agents' heartbeats.
    pub fn new(handle: S, cluster_id: String, liveness: Liveness) -> Shared<S> {
        Shared {
            handle,
            cluster_id,
            liveness,
            watches: WatchSlots::default(),
            agents: ChannelPool::new(NetConfig::peer()),
            sessions: Default::default(),
            usage: Default::default(),
            security: Default::default(),
        }
    }

    /// The same, dialling agents with `tls` and issuing with `security`.
    pub fn with_security(
        mut self,
        tls: Option<&berth_net::Tls>,
        security: super::auth::Security,
    ) -> Shared<S> {
        self.agents =
            ChannelPool::new(NetConfig::peer().with_tls(tls, berth_net::Expect::AnyReplica));
        self.security = std::sync::Arc::new(security);
        self
    }

    /// The same, applying `sessions` to creates.
    pub fn with_sessions(mut self, sessions: crate::sessions::SessionsConfig) -> Shared<S> {
        self.sessions = std::sync::Arc::new(sessions);
        self
    }
}

impl Services {
    /// Services over a Raft replica; `liveness` records the agents' heartbeats.
    pub fn new(
        handle: ReplicaHandle,
        cluster_id: String,
        liveness: Liveness,
        sessions: crate::sessions::SessionsConfig,
        tls: Option<&berth_net::Tls>,
        security: super::auth::Security,
    ) -> Services {
        let shared = Shared::new(handle, cluster_id, liveness)
            .with_sessions(sessions)
            .with_security(tls, security);
        Services {
            sandbox: SandboxApi(shared.clone()),
            admin: AdminApi(shared.clone()),
            node: NodeApi(shared.clone()),
            peer: PeerApi(shared),
        }
    }
}

macro_rules! service {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name<S: Store = ReplicaHandle>(Shared<S>);

        impl<S: Store> $name<S> {
            /// The service over `shared`.
            pub fn new(shared: Shared<S>) -> $name<S> {
                $name(shared)
            }
        }

        impl<S: Store> std::ops::Deref for $name<S> {
            type Target = Shared<S>;
            fn deref(&self) -> &Shared<S> {
                &self.0
            }
        }
    };
}

service!(
    /// `SandboxService`: create, get, list, delete (one or a batch), watch, logs.
    SandboxApi
);
service!(
    /// `AdminService`: cluster status, nodes, quotas, membership, the autoscaler's calls.
    AdminApi
);
service!(
    /// `NodeService`: the scheduler's side of each agent's stream.
    NodeApi
);
service!(
    /// `Peer`: Raft messages and snapshots from other replicas.
    PeerApi
);

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
fn check_create_size(req: &pb::CreateSandboxRequest) -> Result<(), ServiceError> {
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
    Err(ServiceError::Exhausted(format!(
        "{field}: the request is {size} bytes; a create may be at most {MAX_CREATE_BYTES} bytes"
    )))
}

fn parse_sandbox_id(field: &str, value: &str) -> Result<SandboxId, ServiceError> {
    value.parse::<SandboxId>().map_err(|_| {
        ServiceError::invalid(
            field,
            format!("{value:?} is not a sandbox id (sbx-NNNNNNNNNN)"),
        )
    })
}

fn check_node_id(field: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() || value.len() > 63 {
        return Err(ServiceError::invalid(field, "must be 1..=63 characters"));
    }
    Ok(())
}

fn only_outcome(outcomes: Vec<ItemOutcome>) -> Result<ItemOutcome, ServiceError> {
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| ServiceError::Internal("a command produced no outcome".into()))
}
