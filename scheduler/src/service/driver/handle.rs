//! The handle every other part of a replica holds to reach the Raft thread: the bounded
//! queues into it, what it publishes for handlers that must not wait on it, and the waits
//! for an answer (at most [`COMMIT_TIMEOUT`](super::COMMIT_TIMEOUT)).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use crossbeam_channel::{Sender, TrySendError};
use raft::eraftpb::Message;
use tokio::sync::{oneshot, watch};

use berth_proto::pb::v1 as pb;

use super::COMMIT_TIMEOUT;
use crate::replication::{MembershipChange, RaftStatus};
use crate::service::ServiceError;
use crate::service::feed::ChangeFeed;
use crate::service::metrics::Metrics;
use crate::service::transport::PeerFeedback;
use crate::state::{Command, ItemOutcome, State, Submission};

/// What a read sees.
pub struct ReadView<'a> {
    /// The applied state.
    pub state: &'a State,
    /// Raft status of this replica.
    pub raft: RaftStatus,
    /// Member addresses.
    pub peers: &'a BTreeMap<u64, String>,
    /// Invariant violations found since start.
    pub invariant_violations: u64,
}

pub(super) type ReadFn = Box<dyn FnOnce(Result<&ReadView<'_>, ServiceError>) + Send>;
pub(super) type CommandReply = oneshot::Sender<Result<CommandResult, ServiceError>>;

/// The result of a command: per-item outcomes, and a view built on the Raft thread.
pub struct CommandResult {
    /// Outcomes.
    pub outcomes: Vec<ItemOutcome>,
    /// Revision after the command.
    pub revision: u64,
}

/// One create waiting for the batcher.
pub struct CreateRequest {
    pub(super) item: Submission,
    pub(super) arrived: Instant,
    pub(super) reply: oneshot::Sender<Result<pb::CreateSandboxResponse, ServiceError>>,
}

/// One delete waiting for the batcher.
pub struct DeleteRequest {
    pub(super) id: crate::model::SandboxId,
    pub(super) reply: oneshot::Sender<Result<bool, ServiceError>>,
}

/// A write the leader batches: creates become one `SubmitSandboxes` entry, deletes one
/// `DeleteSandboxes` entry.
pub enum Write {
    /// A create.
    Create(Box<CreateRequest>),
    /// A delete.
    Delete(DeleteRequest),
}

pub(super) enum Input {
    Raft(Vec<Message>),
    Unreachable(u64),
    SnapshotStatus {
        to: u64,
        ok: bool,
    },
    Command {
        // Boxed: a command (a node's whole inventory) is far larger than the other inputs.
        command: Box<Command>,
        reply: CommandReply,
    },
    Membership {
        change: MembershipChange,
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
    Read {
        linearizable: bool,
        f: ReadFn,
    },
    Campaign,
    Shutdown,
}

/// What the Raft thread publishes for handlers that must not wait on it.
#[derive(Default)]
pub struct Published {
    pub(super) leader: AtomicU64,
    pub(super) is_leader: AtomicBool,
    pub(super) peers: RwLock<BTreeMap<u64, String>>,
    pub(super) fatal: Mutex<Option<String>>,
    /// The applied state as of the last published batch, for reads off the Raft thread.
    pub(super) applied: ArcSwap<AppliedCopy>,
    /// What applied entries changed, fanned out to agents' streams and watches.
    pub(super) feed: ChangeFeed,
}

/// A copy of what a read sees, taken on the Raft thread after a batch of entries applies
/// (cheap: the state's big maps are persistent) and read anywhere.
#[derive(Default)]
pub(crate) struct AppliedCopy {
    pub(super) state: State,
    pub(super) raft: Option<RaftStatus>,
    pub(super) peers: BTreeMap<u64, String>,
    pub(super) invariant_violations: u64,
}

impl AppliedCopy {
    fn view(&self, id: u64) -> ReadView<'_> {
        ReadView {
            state: &self.state,
            raft: self.raft.clone().unwrap_or(RaftStatus {
                id,
                ..RaftStatus::default()
            }),
            peers: &self.peers,
            invariant_violations: self.invariant_violations,
        }
    }
}

/// A cloneable handle to the Raft thread.
#[derive(Clone)]
pub struct ReplicaHandle {
    pub(super) id: u64,
    pub(super) creates: Sender<Write>,
    pub(super) control: Sender<Input>,
    pub(super) published: Arc<Published>,
    pub(super) revisions: watch::Receiver<u64>,
    pub(super) metrics: Metrics,
    pub(super) max_queued_creates: usize,
}

impl ReplicaHandle {
    /// Raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What applied entries changed, per node and per sandbox.
    pub fn feed(&self) -> &ChangeFeed {
        &self.published.feed
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The leader as last published: (id, address); id 0 when unknown.
    pub fn leader(&self) -> (u64, String) {
        let id = self.published.leader.load(Ordering::Relaxed);
        let address = self
            .published
            .peers
            .read()
            .ok()
            .and_then(|p| p.get(&id).cloned())
            .unwrap_or_default();
        (id, address)
    }

    /// Whether this replica leads (as last published).
    pub fn is_leader(&self) -> bool {
        self.published.is_leader.load(Ordering::Relaxed)
    }

    /// The redirect Status unless this replica leads.
    pub fn require_leader(&self) -> Result<(), ServiceError> {
        if self.is_leader() {
            return Ok(());
        }
        let (leader, address) = self.leader();
        Err(ServiceError::NotLeader { leader, address })
    }

    /// Why the Raft thread stopped, if it did.
    pub fn fatal(&self) -> Option<String> {
        self.published.fatal.lock().ok().and_then(|f| f.clone())
    }

    /// A receiver that changes whenever the applied revision does.
    pub fn revisions(&self) -> watch::Receiver<u64> {
        self.revisions.clone()
    }

    /// Member addresses as last published.
    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.published
            .peers
            .read()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    fn send_control(&self, input: Input) -> Result<(), ServiceError> {
        self.control.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => ServiceError::Exhausted(
                "the replica's control queue is full; retry with backoff".into(),
            ),
            TrySendError::Disconnected(_) => ServiceError::Unavailable(
                self.fatal()
                    .unwrap_or_else(|| "the replica is shutting down".to_owned()),
            ),
        })
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T, ServiceError>>) -> Result<T, ServiceError> {
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServiceError::Unavailable(
                "the replica stopped before answering; retry with the same request_id".into(),
            )),
            Err(_) => Err(ServiceError::Timeout(format!(
                "not committed within {} s (no quorum?); retry with the same request_id",
                COMMIT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Creates one sandbox through the leader's batcher. Answered after commit and apply.
    pub async fn create(
        &self,
        item: Submission,
    ) -> Result<pb::CreateSandboxResponse, ServiceError> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        let request = CreateRequest {
            item,
            arrived: Instant::now(),
            reply,
        };
        match self.creates.try_send(Write::Create(Box::new(request))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.metrics
                    .creates_refused
                    .with_label_values(&["queue_full"])
                    .inc();
                return Err(ServiceError::Exhausted(format!(
                    "the leader has {} creates queued (batching.max_queued_creates); retry \
                     with backoff and the same request_id",
                    self.max_queued_creates
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ServiceError::Unavailable(
                    "the replica is shutting down".into(),
                ));
            }
        }
        Self::wait(rx).await
    }

    /// Deletes a sandbox through the leader's batcher; `false` when it did not exist.
    pub async fn delete(&self, id: crate::model::SandboxId) -> Result<bool, ServiceError> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        match self
            .creates
            .try_send(Write::Delete(DeleteRequest { id, reply }))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ServiceError::Exhausted(format!(
                    "the leader has {} writes queued (batching.max_queued_creates); retry \
                     with backoff",
                    self.max_queued_creates
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ServiceError::Unavailable(
                    "the replica is shutting down".into(),
                ));
            }
        }
        Self::wait(rx).await
    }

    /// Proposes a command and waits until it applies.
    pub async fn command(&self, command: Command) -> Result<CommandResult, ServiceError> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send_control(Input::Command {
            command: Box::new(command),
            reply,
        })?;
        Self::wait(rx).await
    }

    /// Changes membership and waits until the change applies.
    pub async fn membership(&self, change: MembershipChange) -> Result<(), ServiceError> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send_control(Input::Membership { change, reply })?;
        Self::wait(rx).await
    }

    /// Runs `f` on the Raft thread against the applied state: after a ReadIndex round when
    /// `linearizable` (leader only), or at once against this replica's state otherwise.
    pub async fn read<T: Send + 'static>(
        &self,
        linearizable: bool,
        f: impl FnOnce(&ReadView<'_>) -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        if !linearizable {
            // Served here from the last published copy: the Raft thread is not involved.
            let copy = self.published.applied.load();
            return Ok(f(&copy.view(self.id)));
        }
        self.require_leader()?;
        let (tx, rx) = oneshot::channel();
        let f: ReadFn = Box::new(move |view| {
            let _ = tx.send(view.map(f));
        });
        self.send_control(Input::Read { linearizable, f })?;
        Self::wait(rx).await
    }

    /// Hands Raft messages from a peer to the thread; dropped when the queue is full.
    pub fn step(&self, messages: Vec<Message>) -> Result<(), ServiceError> {
        self.send_control(Input::Raft(messages))
    }

    /// Stops the Raft thread (after the current round).
    pub fn shutdown(&self) {
        let _ = self
            .control
            .send_timeout(Input::Shutdown, std::time::Duration::from_secs(1));
    }

    /// Asks this replica to campaign (operators, tests).
    pub fn campaign(&self) -> Result<(), ServiceError> {
        self.send_control(Input::Campaign)
    }
}

impl PeerFeedback for ReplicaHandle {
    fn unreachable(&self, peer: u64) {
        let _ = self.control.try_send(Input::Unreachable(peer));
    }

    fn snapshot_status(&self, to: u64, ok: bool) {
        let _ = self.control.try_send(Input::SnapshotStatus { to, ok });
    }
}
