//! The Raft thread: one OS thread owns the [`Replica`], ticks it, steps peer messages,
//! batches creates, handles every Ready (its disk writes block, so it is not a tokio task)
//! and answers waiting clients once their entries apply.
//!
//! Everything reaches it through bounded queues: creates through one sized by
//! `batching.max_queued_creates` (full → `ResourceExhausted`), everything else through a
//! control queue. Raft traffic that finds the control queue full is dropped, which Raft
//! tolerates. Clients hold a [`ReplicaHandle`].

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, select};
use raft::eraftpb::Message;
use tokio::sync::{oneshot, watch};
use tonic::Status;
use tonic::metadata::MetadataValue;

use berth_proto::pb::v1 as pb;

use super::convert;
use super::metrics::Metrics;
use super::transport::Transport;
use crate::invariants;
use crate::model::NodeStatus;
use crate::replication::log_store::Durable;
use crate::replication::{
    Applied, CreateItem, MembershipChange, ProposalId, ProposeError, RaftStatus, Replica,
};
use crate::state::{Command, ItemOutcome, Rejection, State};

/// Control-queue capacity (Raft traffic, commands, reads).
const CONTROL_QUEUE: usize = 16_384;
/// How long a client waits for its entry to commit and apply.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leader re-runs placement for pending sandboxes.
const PENDING_PASS: Duration = Duration::from_millis(100);
/// How often the invariant catalog is checked against the applied state.
const INVARIANT_CHECK: Duration = Duration::from_secs(30);
/// A Raft-thread step this long is logged.
const SLOW_STEP: Duration = Duration::from_millis(20);
/// How often the pool gauges (a pass over the nodes) are refreshed.
const POOL_GAUGES: Duration = Duration::from_secs(1);

/// Metadata key carrying the leader's address on a redirect.
pub const LEADER_METADATA: &str = "berth-leader";
/// Metadata key a client sets to `local` to read a follower's applied state (may be stale).
pub const READ_MODE_METADATA: &str = "berth-read";

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

type ReadFn = Box<dyn FnOnce(Result<&ReadView<'_>, Status>) + Send>;
type CommandReply = oneshot::Sender<Result<CommandResult, Status>>;

/// The result of a command: per-item outcomes, and a view built on the Raft thread.
pub struct CommandResult {
    /// Outcomes.
    pub outcomes: Vec<ItemOutcome>,
    /// Revision after the command.
    pub revision: u64,
}

/// One create waiting for the batcher.
pub struct CreateRequest {
    item: CreateItem,
    arrived: Instant,
    reply: oneshot::Sender<Result<pb::CreateSandboxResponse, Status>>,
}

/// One delete waiting for the batcher.
pub struct DeleteRequest {
    id: crate::model::SandboxId,
    reply: oneshot::Sender<Result<bool, Status>>,
}

/// A write the leader batches: creates become one `SubmitSandboxes` entry, deletes one
/// `DeleteSandboxes` entry.
pub enum Write {
    /// A create.
    Create(Box<CreateRequest>),
    /// A delete.
    Delete(DeleteRequest),
}

enum Input {
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
        reply: oneshot::Sender<Result<(), Status>>,
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
    leader: AtomicU64,
    is_leader: AtomicBool,
    peers: RwLock<BTreeMap<u64, String>>,
    fatal: Mutex<Option<String>>,
}

/// A cloneable handle to the Raft thread.
#[derive(Clone)]
pub struct ReplicaHandle {
    id: u64,
    creates: Sender<Write>,
    control: Sender<Input>,
    published: Arc<Published>,
    revisions: watch::Receiver<u64>,
    metrics: Metrics,
    max_queued_creates: usize,
}

/// The Status a follower answers with: FAILED_PRECONDITION, and the leader's address in
/// `berth-leader` metadata. The metadata is always there (empty while no leader is known),
/// which is what tells this answer apart from a FAILED_PRECONDITION refusal
/// ([`is_not_leader`]).
pub fn not_leader_status(leader: u64, address: &str) -> Status {
    let msg = if leader == 0 {
        "this replica is not the leader and no leader is known yet; retry shortly".to_owned()
    } else {
        format!("this replica is not the leader; the leader is replica {leader} at {address}")
    };
    let mut status = Status::failed_precondition(msg);
    let hint = address
        .parse()
        .unwrap_or_else(|_| MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_METADATA, hint);
    status
}

/// Whether a Status is a follower's "not the leader" answer (worth sending to the leader),
/// as opposed to a refusal that would be the same anywhere.
pub fn is_not_leader(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status.metadata().get(LEADER_METADATA).is_some()
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader, address } => not_leader_status(leader, &address),
        ProposeError::Dropped(why) => Status::unavailable(format!(
            "the proposal was dropped ({why}); retry (creates with the same request_id)"
        )),
        ProposeError::Membership(why) => Status::failed_precondition(why),
    }
}

/// The Status for a rejected item.
pub fn rejection_status(r: &Rejection) -> Status {
    match r {
        Rejection::InvalidSpec(_) => Status::invalid_argument(r.to_string()),
        Rejection::BatchTooLarge(_) => Status::resource_exhausted(r.to_string()),
        Rejection::ConcurrencyQuota { .. } | Rejection::GpuQuota { .. } => {
            Status::resource_exhausted(r.to_string())
        }
        Rejection::UnknownNode(_) | Rejection::UnknownSandbox(_) => {
            Status::not_found(r.to_string())
        }
        _ => Status::failed_precondition(r.to_string()),
    }
}

fn lost_leadership() -> Status {
    Status::unavailable(
        "leadership changed before the request committed; retry with the same request_id \
         (retries are idempotent)",
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ReplicaHandle {
    /// Raft id.
    pub fn id(&self) -> u64 {
        self.id
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
    pub fn require_leader(&self) -> Result<(), Status> {
        if self.is_leader() {
            return Ok(());
        }
        let (id, address) = self.leader();
        Err(not_leader_status(id, &address))
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

    fn send_control(&self, input: Input) -> Result<(), Status> {
        self.control.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => Status::resource_exhausted(
                "the replica's control queue is full; retry with backoff",
            ),
            TrySendError::Disconnected(_) => Status::unavailable(
                self.fatal()
                    .unwrap_or_else(|| "the replica is shutting down".to_owned()),
            ),
        })
    }

    async fn wait<T>(rx: oneshot::Receiver<Result<T, Status>>) -> Result<T, Status> {
        match tokio::time::timeout(COMMIT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Status::unavailable(
                "the replica stopped before answering; retry with the same request_id",
            )),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "not committed within {} s (no quorum?); retry with the same request_id",
                COMMIT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Creates one sandbox through the leader's batcher. Answered after commit and apply.
    pub async fn create(&self, item: CreateItem) -> Result<pb::CreateSandboxResponse, Status> {
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
                return Err(Status::resource_exhausted(format!(
                    "the leader has {} creates queued (batching.max_queued_creates); retry \
                     with backoff and the same request_id",
                    self.max_queued_creates
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Status::unavailable("the replica is shutting down"));
            }
        }
        Self::wait(rx).await
    }

    /// Deletes a sandbox through the leader's batcher; `false` when it did not exist.
    pub async fn delete(&self, id: crate::model::SandboxId) -> Result<bool, Status> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        match self
            .creates
            .try_send(Write::Delete(DeleteRequest { id, reply }))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Status::resource_exhausted(format!(
                    "the leader has {} writes queued (batching.max_queued_creates); retry \
                     with backoff",
                    self.max_queued_creates
                )));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Status::unavailable("the replica is shutting down"));
            }
        }
        Self::wait(rx).await
    }

    /// Proposes a command and waits until it applies.
    pub async fn command(&self, command: Command) -> Result<CommandResult, Status> {
        self.require_leader()?;
        let (reply, rx) = oneshot::channel();
        self.send_control(Input::Command {
            command: Box::new(command),
            reply,
        })?;
        Self::wait(rx).await
    }

    /// Changes membership and waits until the change applies.
    pub async fn membership(&self, change: MembershipChange) -> Result<(), Status> {
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
    ) -> Result<T, Status> {
        if linearizable {
            self.require_leader()?;
        }
        let (tx, rx) = oneshot::channel();
        let f: ReadFn = Box::new(move |view| {
            let _ = tx.send(view.map(f));
        });
        self.send_control(Input::Read { linearizable, f })?;
        Self::wait(rx).await
    }

    /// Hands Raft messages from a peer to the thread; dropped when the queue is full.
    pub fn step(&self, messages: Vec<Message>) -> Result<(), Status> {
        self.send_control(Input::Raft(messages))
    }

    pub(super) fn unreachable(&self, peer: u64) {
        let _ = self.control.try_send(Input::Unreachable(peer));
    }

    pub(super) fn snapshot_status(&self, to: u64, ok: bool) {
        let _ = self.control.try_send(Input::SnapshotStatus { to, ok });
    }

    /// Stops the Raft thread (after the current round).
    pub fn shutdown(&self) {
        let _ = self
            .control
            .send_timeout(Input::Shutdown, std::time::Duration::from_secs(1));
    }

    /// Asks this replica to campaign (operators, tests).
    pub fn campaign(&self) -> Result<(), Status> {
        self.send_control(Input::Campaign)
    }
}

/// Settings of the Raft thread.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Tick length.
    pub tick: Duration,
    /// Most creates in one batch.
    pub max_batch: usize,
    /// Longest a create waits for its batch to fill.
    pub max_batch_wait: Duration,
    /// Create queue capacity.
    pub max_queued_creates: usize,
    /// Cluster id (peers refuse other clusters).
    pub cluster_id: String,
}

enum Waiter {
    Creates { replies: Vec<CreateRequest> },
    Deletes { replies: Vec<DeleteRequest> },
    Command(CommandReply),
    Membership(oneshot::Sender<Result<(), Status>>),
}

struct Driver<D: Durable> {
    replica: Replica<D>,
    cfg: DriverConfig,
    control: Receiver<Input>,
    creates: Receiver<Write>,
    handle: ReplicaHandle,
    published: Arc<Published>,
    revisions: watch::Sender<u64>,
    transport: Transport,
    metrics: Metrics,
    waiters: HashMap<ProposalId, Waiter>,
    reads: HashMap<u64, ReadFn>,
    next_read: u64,
    batch: Vec<CreateRequest>,
    deletes: Vec<DeleteRequest>,
    batch_started: Option<Instant>,
    invariant_violations: u64,
    peers_seen: BTreeMap<u64, String>,
    stopping: bool,
}

/// Starts the Raft thread for `replica`. The transport sends its messages on `runtime`.
pub fn spawn<D: Durable + Send + 'static>(
    open: impl FnOnce() -> Result<Replica<D>, String> + Send + 'static,
    id: u64,
    cfg: DriverConfig,
    metrics: Metrics,
    runtime: tokio::runtime::Handle,
) -> Result<(ReplicaHandle, std::thread::JoinHandle<()>), String> {
    let (control_tx, control_rx) = bounded(CONTROL_QUEUE);
    let (creates_tx, creates_rx) = bounded(cfg.max_queued_creates.max(1));
    let published = Arc::new(Published::default());
    let (rev_tx, rev_rx) = watch::channel(0);
    let handle = ReplicaHandle {
        id,
        creates: creates_tx,
        control: control_tx,
        published: published.clone(),
        revisions: rev_rx,
        metrics: metrics.clone(),
        max_queued_creates: cfg.max_queued_creates,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread_handle = handle.clone();
    let join = std::thread::Builder::new()
        .name(format!("raft-{id}"))
        .spawn(move || {
            let replica = match open() {
                Ok(r) => {
                    let _ = ready_tx.send(Ok(()));
                    r
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let transport = Transport::new(
                id,
                cfg.cluster_id.clone(),
                runtime,
                thread_handle.clone(),
                metrics.clone(),
            );
            let mut driver = Driver {
                replica,
                cfg,
                control: control_rx,
                creates: creates_rx,
                handle: thread_handle,
                published,
                revisions: rev_tx,
                transport,
                metrics,
                waiters: HashMap::new(),
                reads: HashMap::new(),
                next_read: 0,
                batch: Vec::new(),
                deletes: Vec::new(),
                batch_started: None,
                invariant_violations: 0,
                peers_seen: BTreeMap::new(),
                stopping: false,
            };
            driver.run();
        })
        .map_err(|e| format!("starting the Raft thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, join)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the Raft thread stopped while opening the replica".into()),
    }
}

impl<D: Durable> Driver<D> {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let mut next_pending = Instant::now() + PENDING_PASS;
        let mut next_check = Instant::now() + INVARIANT_CHECK;
        let mut next_pool = Instant::now();
        self.publish();
        loop {
            let now = Instant::now();
            let mut deadline = next_tick;
            if let Some(started) = self.batch_started {
                deadline = deadline.min(started + self.cfg.max_batch_wait);
            }
            let timeout = deadline.saturating_duration_since(now);
            let creates_open = self.batch_len() < self.cfg.max_batch;
            let never = crossbeam_channel::never();
            let creates = if creates_open { &self.creates } else { &never };
            select! {
                recv(self.control) -> input => match input {
                    Ok(input) => self.on_input(input),
                    Err(_) => return,
                },
                recv(creates) -> c => if let Ok(c) = c { self.push_create(c) },
                default(timeout) => {}
            }
            // Drain what else is queued without blocking, bounded per round.
            for _ in 0..4_096 {
                match self.control.try_recv() {
                    Ok(input) => self.on_input(input),
                    Err(_) => break,
                }
            }
            while self.batch_len() < self.cfg.max_batch {
                match self.creates.try_recv() {
                    Ok(c) => self.push_create(c),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.replica.tick();
                next_tick = now + self.cfg.tick;
            }
            let batch_due = self.batch_len() >= self.cfg.max_batch
                || self
                    .batch_started
                    .is_some_and(|s| now >= s + self.cfg.max_batch_wait);
            if batch_due {
                let t = Instant::now();
                self.propose_batch();
                slow("placing and proposing a create batch", t);
            }
            if now >= next_pending {
                next_pending = now + PENDING_PASS;
                if self.replica.has_pending() {
                    let t = Instant::now();
                    let n = self.replica.schedule_pending(now_ms()).len();
                    slow("the pending-sandbox pass", t);
                    if n > 0 {
                        self.metrics
                            .proposals
                            .with_label_values(&["bind"])
                            .inc_by(n as u64);
                    }
                }
            }
            if now >= next_pool {
                next_pool = now + POOL_GAUGES;
                let t = Instant::now();
                publish_pool(&self.metrics, self.replica.state());
                slow("refreshing pool gauges", t);
                self.metrics
                    .log_entries_in_memory
                    .set(self.replica.log_len() as i64);
            }
            if now >= next_check {
                next_check = now + INVARIANT_CHECK;
                let found = invariants::check(self.replica.state());
                if !found.is_empty() {
                    tracing::error!(
                        violations = found.len(),
                        first = %found[0],
                        "state invariant violated"
                    );
                    self.invariant_violations += found.len() as u64;
                    self.metrics.invariant_violations.inc_by(found.len() as u64);
                }
            }
            if self.stopping {
                self.fail_batch(Status::unavailable("the replica is shutting down"));
                for (_, w) in self.waiters.drain() {
                    fail(w, Status::unavailable("the replica is shutting down"));
                }
                return;
            }
            let t = Instant::now();
            let result = self.ready();
            slow("handling a Raft ready (apply, persist, send)", t);
            if let Err(e) = result {
                let msg = format!("replica {} stopped: {e}", self.replica.id());
                tracing::error!("{msg}");
                if let Ok(mut f) = self.published.fatal.lock() {
                    *f = Some(msg);
                }
                return;
            }
        }
    }

    fn batch_len(&self) -> usize {
        self.batch.len() + self.deletes.len()
    }

    fn push_create(&mut self, w: Write) {
        if self.batch_len() == 0 {
            self.batch_started = Some(Instant::now());
        }
        match w {
            Write::Create(c) => self.batch.push(*c),
            Write::Delete(d) => self.deletes.push(d),
        }
    }

    fn fail_batch(&mut self, status: Status) {
        for c in std::mem::take(&mut self.batch) {
            let _ = c.reply.send(Err(status.clone()));
        }
        for d in std::mem::take(&mut self.deletes) {
            let _ = d.reply.send(Err(status.clone()));
        }
        self.batch_started = None;
    }

    fn propose_deletes(&mut self) {
        let deletes = std::mem::take(&mut self.deletes);
        if deletes.is_empty() {
            return;
        }
        let items = deletes.iter().map(|d| d.id).collect();
        match self
            .replica
            .propose(Command::DeleteSandboxes { items }, now_ms())
        {
            Ok(p) => {
                self.metrics
                    .proposals
                    .with_label_values(&["delete_batch"])
                    .inc();
                self.waiters.insert(p, Waiter::Deletes { replies: deletes });
            }
            Err(e) => {
                let status = propose_status(e);
                for d in deletes {
                    let _ = d.reply.send(Err(status.clone()));
                }
            }
        }
    }

    fn propose_batch(&mut self) {
        self.batch_started = None;
        self.propose_deletes();
        let batch = std::mem::take(&mut self.batch);
        if batch.is_empty() {
            return;
        }
        let items: Vec<CreateItem> = batch.iter().map(|c| c.item.clone()).collect();
        let started = Instant::now();
        let n = items.len();
        match self.replica.propose_creates(items, now_ms()) {
            Ok(p) => {
                self.metrics
                    .placement_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.batch_size.observe(n as f64);
                self.metrics
                    .proposals
                    .with_label_values(&["create_batch"])
                    .inc();
                self.waiters.insert(p, Waiter::Creates { replies: batch });
            }
            Err(e) => {
                let status = propose_status(e);
                for c in batch {
                    let _ = c.reply.send(Err(status.clone()));
                }
            }
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Raft(messages) => {
                for m in messages {
                    self.replica.step(m);
                }
            }
            Input::Unreachable(peer) => self.replica.report_unreachable(peer),
            Input::SnapshotStatus { to, ok } => self.replica.report_snapshot(to, ok),
            Input::Command { command, reply } => match self.replica.propose(*command, now_ms()) {
                Ok(p) => {
                    self.metrics.proposals.with_label_values(&["command"]).inc();
                    self.waiters.insert(p, Waiter::Command(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(propose_status(e)));
                }
            },
            Input::Membership { change, reply } => match self.replica.propose_membership(change) {
                Ok(p) => {
                    self.metrics
                        .proposals
                        .with_label_values(&["membership"])
                        .inc();
                    self.waiters.insert(p, Waiter::Membership(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(propose_status(e)));
                }
            },
            Input::Read { linearizable, f } => {
                if !linearizable {
                    let view = self.view();
                    f(Ok(&view));
                    return;
                }
                self.next_read += 1;
                let id = self.next_read;
                match self.replica.read_index(id) {
                    Ok(()) => {
                        self.reads.insert(id, f);
                    }
                    Err(e) => f(Err(propose_status(e))),
                }
            }
            Input::Campaign => self.replica.campaign(),
            Input::Shutdown => self.stopping = true,
        }
    }

    fn view(&self) -> ReadView<'_> {
        ReadView {
            state: self.replica.state(),
            raft: self.replica.status(),
            peers: self.replica.peers(),
            invariant_violations: self.invariant_violations,
        }
    }

    fn ready(&mut self) -> Result<(), crate::replication::log_store::StoreError> {
        let started = Instant::now();
        let out = self.replica.handle_ready()?;
        if out.entries_applied > 0 {
            self.metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        if out.leader_changed {
            self.metrics.leader_changes.inc();
        }
        if self.replica.peers() != &self.peers_seen {
            self.peers_seen = self.replica.peers().clone();
            self.transport.set_peers(&self.peers_seen);
        }
        let unreachable = self.transport.send(out.messages);
        for peer in unreachable {
            self.replica.report_unreachable(peer);
        }
        for p in out.dropped {
            if let Some(w) = self.waiters.remove(&p) {
                fail(w, lost_leadership());
            }
        }
        for (p, applied) in out.applied {
            if let Some(w) = self.waiters.remove(&p) {
                self.answer(w, applied);
            }
        }
        for id in out.reads_failed {
            if let Some(f) = self.reads.remove(&id) {
                f(Err(lost_leadership()));
            }
        }
        if !out.reads_ready.is_empty() {
            let ready: Vec<ReadFn> = out
                .reads_ready
                .iter()
                .filter_map(|id| self.reads.remove(id))
                .collect();
            let view = self.view();
            for f in ready {
                f(Ok(&view));
            }
        }
        if !self.replica.is_leader() && self.batch_len() > 0 {
            // Writes queued on a replica that lost leadership.
            let (leader, address) = self.handle.leader();
            self.fail_batch(not_leader_status(leader, &address));
        }
        if out.entries_applied > 0 || out.leader_changed || out.became_leader {
            self.publish();
        } else {
            self.publish_raft();
        }
        Ok(())
    }

    fn answer(&mut self, waiter: Waiter, applied: Applied) {
        match (waiter, applied) {
            (Waiter::Creates { replies }, Applied::Items { outcomes, revision }) => {
                let state = self.replica.state();
                for (c, outcome) in replies.into_iter().zip(outcomes) {
                    let result = match outcome {
                        ItemOutcome::Created { id, .. } | ItemOutcome::Duplicate { id } => {
                            match state.sandbox(id) {
                                Some(s) => Ok(pb::CreateSandboxResponse {
                                    sandbox: Some({
                                        let mut out = convert::sandbox_to_pb_in(s, state);
                                        out.revision = revision;
                                        out
                                    }),
                                    deduplicated: matches!(outcome, ItemOutcome::Duplicate { .. }),
                                }),
                                None => Err(Status::not_found(format!(
                                    "sandbox {id} was deleted before this answer"
                                ))),
                            }
                        }
                        ItemOutcome::Rejected(r) => Err(rejection_status(&r)),
                        ItemOutcome::Applied => Err(Status::internal("unexpected outcome")),
                    };
                    self.metrics
                        .create_seconds
                        .observe(c.arrived.elapsed().as_secs_f64());
                    let _ = c.reply.send(result);
                }
            }
            (Waiter::Deletes { replies }, Applied::Items { outcomes, .. }) => {
                for (d, outcome) in replies.into_iter().zip(outcomes) {
                    let result = match outcome {
                        ItemOutcome::Applied => Ok(true),
                        ItemOutcome::Rejected(Rejection::UnknownSandbox(_)) => Ok(false),
                        ItemOutcome::Rejected(r) => Err(rejection_status(&r)),
                        other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
                    };
                    let _ = d.reply.send(result);
                }
            }
            (Waiter::Command(reply), Applied::Items { outcomes, revision }) => {
                let _ = reply.send(Ok(CommandResult { outcomes, revision }));
            }
            (Waiter::Membership(reply), Applied::Membership(result)) => {
                let _ = reply.send(result.map_err(Status::failed_precondition));
            }
            (w, _) => fail(w, Status::internal("proposal and result kinds differ")),
        }
    }

    fn publish_raft(&self) {
        let is_leader = self.replica.is_leader();
        self.published
            .leader
            .store(self.replica.leader(), Ordering::Relaxed);
        self.published.is_leader.store(is_leader, Ordering::Relaxed);
        self.metrics.is_leader.set(i64::from(is_leader));
        self.metrics.create_queue.set(self.creates.len() as i64);
    }

    fn publish(&mut self) {
        self.publish_raft();
        if let Ok(mut peers) = self.published.peers.write() {
            if *peers != *self.replica.peers() {
                *peers = self.replica.peers().clone();
            }
        }
        let status = self.replica.status();
        self.metrics.term.set(status.term as i64);
        self.metrics.commit_index.set(status.commit as i64);
        self.metrics.applied_index.set(status.applied as i64);
        let state = self.replica.state();
        let _ = self.revisions.send_replace(state.revision());
        for (name, count) in state.sandboxes_by_state() {
            self.metrics
                .sandboxes
                .with_label_values(&[name.as_str()])
                .set(*count as i64);
        }
    }
}

/// Sets the node and GPU gauges from a state (a pass over the nodes).
pub fn publish_pool(metrics: &Metrics, state: &State) {
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    let mut allocated: BTreeMap<String, u64> = BTreeMap::new();
    let mut nodes: BTreeMap<&'static str, i64> = BTreeMap::new();
    for record in state.nodes().values() {
        *nodes.entry(node_status_name(record.status)).or_default() += 1;
        for (i, gpu) in record.spec.gpus.iter().enumerate() {
            let model = gpu.model.to_string();
            *total.entry(model.clone()).or_default() += 1000;
            *allocated.entry(model).or_default() +=
                u64::from(record.gpu_milli_allocated.get(i).copied().unwrap_or(0));
        }
    }
    for (model, milli) in total {
        metrics
            .gpu_total_milli
            .with_label_values(&[model.as_str()])
            .set(milli as i64);
    }
    for (model, milli) in allocated {
        metrics
            .gpu_allocated_milli
            .with_label_values(&[model.as_str()])
            .set(milli as i64);
    }
    for (status, n) in nodes {
        metrics.nodes.with_label_values(&[status]).set(n);
    }
}

/// Logs a Raft-thread step that held the thread long enough to show in client latency.
fn slow(what: &str, started: Instant) {
    let took = started.elapsed();
    if took >= SLOW_STEP {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            "slow Raft-thread step: {what}"
        );
    }
}

fn node_status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Ready => "ready",
        NodeStatus::Cordoned => "cordoned",
        NodeStatus::Draining => "draining",
        NodeStatus::Down => "down",
    }
}

fn fail(waiter: Waiter, status: Status) {
    match waiter {
        Waiter::Creates { replies } => {
            for c in replies {
                let _ = c.reply.send(Err(status.clone()));
            }
        }
        Waiter::Deletes { replies } => {
            for d in replies {
                let _ = d.reply.send(Err(status.clone()));
            }
        }
        Waiter::Command(reply) => {
            let _ = reply.send(Err(status));
        }
        Waiter::Membership(reply) => {
            let _ = reply.send(Err(status));
        }
    }
}
