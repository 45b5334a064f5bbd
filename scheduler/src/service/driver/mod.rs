//! The Raft thread: one OS thread owns the [`Replica`], ticks it, steps peer messages,
//! batches creates, handles every Ready (its disk writes block, so it is not a tokio task)
//! and answers waiting clients once their entries apply.
//!
//! Everything reaches it through bounded queues: creates through one sized by
//! `batching.max_queued_creates` (full → `ResourceExhausted`), everything else through a
//! control queue. Raft traffic that finds the control queue full is dropped, which Raft
//! tolerates. Clients hold a [`ReplicaHandle`].

mod handle;
mod waiters;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, bounded, select};
use tokio::sync::watch;

use berth_proto::pb::v1 as pb;

use super::metrics::Metrics;
use super::transport::Transport;
use super::{ServiceError, StartError};
use crate::convert;
use crate::invariants;
use crate::replication::log_store::Durable;
use crate::replication::{Applied, ProposalId, Replica};
use crate::state::{Command, ItemOutcome, Rejection, Submission};

use handle::{AppliedCopy, Input, ReadFn};
pub use handle::{
    CommandResult, CreateRequest, DeleteRequest, Published, ReadView, ReplicaHandle, Write,
};
use waiters::{Waiter, fail};

/// Control-queue capacity (Raft traffic, commands, reads).
const CONTROL_QUEUE: usize = 16_384;
/// How long a client waits for its entry to commit and apply.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leader re-runs placement for pending sandboxes.
const PENDING_PASS: Duration = Duration::from_millis(100);
/// The pending pass's cadence for a moment after a resume is asked for.
const RESUME_PASS: Duration = Duration::from_millis(5);
/// How long that moment is.
const RESUME_WINDOW: Duration = Duration::from_millis(500);
/// How often the invariant catalog is checked against the applied state.
const INVARIANT_CHECK: Duration = Duration::from_secs(30);
/// A Raft-thread step this long is logged.
const SLOW_STEP: Duration = Duration::from_millis(20);

pub use berth_net::leader::{LEADER_METADATA, READ_MODE_METADATA};

/// Milliseconds since the Unix epoch on this replica's clock (proposals' times; token
/// expiry checks).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
    /// TLS of the channels to peers (`None`: insecure).
    pub tls: Option<berth_net::Tls>,
}

struct Driver<D: Durable> {
    replica: Replica<D>,
    cfg: DriverConfig,
    control: Receiver<Input>,
    creates: Receiver<Write>,
    handle: ReplicaHandle,
    published: Arc<Published>,
    revisions: watch::Sender<u64>,
    transport: Transport<ReplicaHandle>,
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
    /// Until then the pending pass runs every [`RESUME_PASS`] (a resume was asked for).
    resume_until: Option<Instant>,
}

/// Starts the Raft thread for `replica`. The transport sends its messages on `runtime`.
pub fn spawn<D: Durable + Send + 'static>(
    open: impl FnOnce() -> Result<Replica<D>, StartError> + Send + 'static,
    id: u64,
    cfg: DriverConfig,
    metrics: Metrics,
    runtime: tokio::runtime::Handle,
) -> Result<(ReplicaHandle, std::thread::JoinHandle<()>), StartError> {
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
                cfg.tls.clone(),
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
                resume_until: None,
            };
            driver.run();
        })
        .map_err(|e| StartError::Replica(format!("starting the Raft thread: {e}")))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((handle, join)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StartError::Replica(
            "the Raft thread stopped while opening the replica".into(),
        )),
    }
}

impl<D: Durable> Driver<D> {
    fn run(&mut self) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let mut next_pending = Instant::now() + PENDING_PASS;
        let mut next_check = Instant::now() + INVARIANT_CHECK;
        // The history of changes starts here: a watch resuming from before the state this
        // replica started with is told it is too old.
        self.published
            .feed
            .replaced(self.replica.state().revision());
        self.publish();
        loop {
            let now = Instant::now();
            let mut deadline = next_tick;
            if let Some(started) = self.batch_started {
                deadline = deadline.min(started + self.cfg.max_batch_wait);
            }
            if self.resume_until.is_some() {
                deadline = deadline.min(next_pending);
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
            let resuming = self.resume_until.is_some_and(|t| now < t);
            if !resuming {
                self.resume_until = None;
            }
            if now >= next_pending || resuming {
                next_pending = now + if resuming { RESUME_PASS } else { PENDING_PASS };
                if self.replica.has_pending() {
                    let t = Instant::now();
                    let before = self.replica.snapshot_affinity();
                    let n = self.replica.schedule_pending(now_ms()).len();
                    slow("the pending-sandbox pass", t);
                    let after = self.replica.snapshot_affinity();
                    let affinity = &self.metrics.snapshot_affinity;
                    affinity
                        .with_label_values(&["hit"])
                        .inc_by(after.0 - before.0);
                    affinity
                        .with_label_values(&["miss"])
                        .inc_by(after.1 - before.1);
                    if n > 0 {
                        self.metrics
                            .proposals
                            .with_label_values(&["bind"])
                            .inc_by(n as u64);
                    }
                }
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
                self.fail_batch(ServiceError::Unavailable(
                    "the replica is shutting down".into(),
                ));
                for (_, w) in self.waiters.drain() {
                    fail(
                        w,
                        ServiceError::Unavailable("the replica is shutting down".into()),
                    );
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

    fn fail_batch(&mut self, error: ServiceError) {
        for c in std::mem::take(&mut self.batch) {
            let _ = c.reply.send(Err(error.clone()));
        }
        for d in std::mem::take(&mut self.deletes) {
            let _ = d.reply.send(Err(error.clone()));
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
                let error = ServiceError::from(e);
                for d in deletes {
                    let _ = d.reply.send(Err(error.clone()));
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
        let items: Vec<Submission> = batch.iter().map(|c| c.item.clone()).collect();
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
                let error = ServiceError::from(e);
                for c in batch {
                    let _ = c.reply.send(Err(error.clone()));
                }
            }
        }
    }

    fn propose_command(
        &mut self,
        command: Command,
        reply: tokio::sync::oneshot::Sender<Result<CommandResult, ServiceError>>,
    ) {
        match self.replica.propose(command, now_ms()) {
            Ok(p) => {
                self.metrics.proposals.with_label_values(&["command"]).inc();
                self.waiters.insert(p, Waiter::Command(reply));
            }
            Err(e) => {
                let _ = reply.send(Err(ServiceError::from(e)));
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
            Input::Command { command, reply } => {
                if matches!(*command, Command::ResumeSandboxes { .. }) {
                    // A resume waits on the pending pass: run it at a fine cadence for a
                    // moment, so the resume is placed as soon as it applies.
                    self.resume_until = Some(Instant::now() + RESUME_WINDOW);
                }
                self.propose_command(*command, reply);
            }
            Input::Membership { change, reply } => match self.replica.propose_membership(change) {
                Ok(p) => {
                    self.metrics
                        .proposals
                        .with_label_values(&["membership"])
                        .inc();
                    self.waiters.insert(p, Waiter::Membership(reply));
                }
                Err(e) => {
                    let _ = reply.send(Err(ServiceError::from(e)));
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
                    Err(e) => f(Err(ServiceError::from(e))),
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
        // Publish before answering, so a client that got its answer sees the revision and
        // the gauges of the state that answered it (a /metrics scrape right after a create
        // finds the sandbox counted).
        if out.state_replaced {
            self.published
                .feed
                .replaced(self.replica.state().revision());
        }
        self.published.feed.publish(&out.changes);
        if out.entries_applied > 0 || out.leader_changed || out.became_leader || out.state_replaced
        {
            self.publish();
        } else {
            self.publish_raft();
        }
        for p in out.dropped {
            if let Some(w) = self.waiters.remove(&p) {
                fail(w, ServiceError::LostLeadership);
            }
        }
        for (p, applied) in out.applied {
            if let Some(w) = self.waiters.remove(&p) {
                self.answer(w, applied);
            }
        }
        for id in out.reads_failed {
            if let Some(f) = self.reads.remove(&id) {
                f(Err(ServiceError::LostLeadership));
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
            self.fail_batch(ServiceError::NotLeader { leader, address });
        }
        Ok(())
    }

    fn answer(&mut self, waiter: Waiter, applied: Applied) {
        match (waiter, applied) {
            (Waiter::Creates { replies }, Applied::Items { outcomes, revision }) => {
                let state = self.replica.state();
                for (c, outcome) in replies.into_iter().zip(outcomes) {
                    let result = match outcome {
                        ItemOutcome::Created { id, .. }
                        | ItemOutcome::Duplicate { id }
                        | ItemOutcome::Claimed { id, .. } => match state.sandbox(id) {
                            Some(s) => Ok(pb::CreateSandboxResponse {
                                sandbox: Some({
                                    let mut out = convert::sandbox_to_pb_in(s, state);
                                    out.revision = revision;
                                    out
                                }),
                                deduplicated: matches!(outcome, ItemOutcome::Duplicate { .. }),
                                from_pool: match &outcome {
                                    ItemOutcome::Claimed { pool, .. } => pool.clone(),
                                    _ => String::new(),
                                },
                            }),
                            None => Err(ServiceError::NotFound(format!(
                                "sandbox {id} was deleted before this answer"
                            ))),
                        },
                        ItemOutcome::Rejected(r) => Err(ServiceError::Rejected(r)),
                        ItemOutcome::Applied => {
                            Err(ServiceError::Internal("unexpected outcome".into()))
                        }
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
                        ItemOutcome::Rejected(r) => Err(ServiceError::Rejected(r)),
                        other => Err(ServiceError::Internal(format!(
                            "unexpected outcome {other:?}"
                        ))),
                    };
                    let _ = d.reply.send(result);
                }
            }
            (Waiter::Command(reply), Applied::Items { outcomes, revision }) => {
                let _ = reply.send(Ok(CommandResult { outcomes, revision }));
            }
            (Waiter::Membership(reply), Applied::Membership(result)) => {
                let _ = reply.send(result.map_err(ServiceError::Precondition));
            }
            (w, _) => fail(
                w,
                ServiceError::Internal("proposal and result kinds differ".into()),
            ),
        }
    }

    fn publish_raft(&self) {
        let is_leader = self.replica.is_leader();
        self.published
            .leader
            .store(self.replica.leader(), Ordering::Relaxed);
        self.published.is_leader.store(is_leader, Ordering::Relaxed);
        self.published.feed.set_leading(is_leader);
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
        self.metrics
            .feed_nodes
            .set(self.published.feed.subscribed_nodes() as i64);
        let state = self.replica.state();
        self.published.applied.store(Arc::new(AppliedCopy {
            state: state.clone(),
            raft: Some(status),
            peers: self.replica.peers().clone(),
            invariant_violations: self.invariant_violations,
        }));
        let _ = self.revisions.send_replace(state.revision());
        for (name, count) in state.sandboxes_by_state() {
            self.metrics
                .sandboxes
                .with_label_values(&[name.as_str()])
                .set(*count as i64);
        }
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
