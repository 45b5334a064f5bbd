//! One scheduler replica without I/O: raft-rs's `RawNode` over the [`LogStore`], the state
//! machine, and the leader's batched placement. The tokio driver and the deterministic
//! harness both run exactly this code; they differ only in the [`Durable`] backend, the
//! clock and the network they feed it.
//!
//! The Ready handling follows the order raft-rs documents: send messages, install a
//! snapshot, apply committed entries, persist entries and hard state (one synced write),
//! send persisted messages, advance, apply what the light ready commits, advance apply.

use std::collections::{BTreeMap, BTreeSet};

use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    Message, Snapshot,
};
use raft::{RawNode, StateRole};
use raft_proto::ConfChangeI as _;
use thiserror::Error;

use super::codec::{Envelope, MembershipContext, ProposalId, SnapshotPayload};
use super::log_store::{Durable, LogStore, Recovered, StoreError, WriteBatch};
use crate::model::{Placement, SandboxId, SandboxSpec, SandboxState};
use crate::placement::fragmentation::TypicalWorkload;
use crate::placement::view::ClusterView;
use crate::placement::{Placer, PlacerConfig};
use crate::state::{Command, ItemOutcome, State, Submission};

/// Index of the bootstrap snapshot every founding replica writes identically. A non-zero
/// first index means a replica added later always catches up from a snapshot, which carries
/// the founding membership (TiKV does the same).
pub const BOOTSTRAP_INDEX: u64 = 1;

/// Replica settings.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Raft id, non-zero.
    pub id: u64,
    /// Election timeout in ticks (randomised in `[election, 2 × election)`).
    pub election_tick: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_tick: usize,
    /// Pins the election timeout to exactly this many ticks. The harness draws it from its
    /// seed so runs replay exactly (raft-rs otherwise draws from the thread RNG).
    pub fixed_election_timeout: Option<usize>,
    /// Most in-flight appends per follower.
    pub max_inflight_msgs: usize,
    /// Largest append message.
    pub max_size_per_msg: u64,
    /// Snapshot and compact every this many applied entries.
    pub snapshot_every_entries: u64,
    /// ... or once the in-memory log holds this many bytes of entry data.
    pub snapshot_every_bytes: usize,
    /// Entries kept behind a snapshot so a briefly lagging follower needs no snapshot.
    pub keep_entries_after_snapshot: u64,
    /// Placement engine settings.
    pub placer: PlacerConfig,
    /// Seed of placement tie-breaking.
    pub placement_seed: u64,
    /// Most pending sandboxes the leader tries to place per pass (passes run every 100 ms;
    /// an unplaceable sandbox can cost a scan of the pool, so a pass stays small).
    pub pending_pass_limit: usize,
}

impl ReplicaConfig {
    /// Defaults for a replica id.
    pub fn new(id: u64) -> ReplicaConfig {
        ReplicaConfig {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            fixed_election_timeout: None,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            snapshot_every_entries: 50_000,
            snapshot_every_bytes: 64 << 20,
            keep_entries_after_snapshot: 5_000,
            placer: PlacerConfig::default(),
            placement_seed: 0,
            pending_pass_limit: 32,
        }
    }
}

/// Why a proposal was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProposeError {
    /// Only the leader proposes. `leader` is 0 when unknown.
    #[error("this replica is not the leader (leader: {leader})")]
    NotLeader {
        /// Leader id, 0 when unknown.
        leader: u64,
        /// Its address, empty when unknown.
        address: String,
    },
    /// raft-rs dropped the proposal (a leader transfer, or a membership change already in
    /// progress).
    #[error("proposal dropped: {0}")]
    Dropped(String),
    /// The membership change is not valid.
    #[error("membership change refused: {0}")]
    Membership(String),
}

/// What one of this replica's proposals came to once applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A state-machine command: one outcome per item, and the revision after it.
    Items {
        /// Per item.
        outcomes: Vec<ItemOutcome>,
        /// State revision after the command.
        revision: u64,
    },
    /// A membership change.
    Membership(Result<(), String>),
}

/// What the driver must do after [`Replica::handle_ready`].
#[derive(Debug, Default)]
pub struct Output {
    /// Send these to their `to`.
    pub messages: Vec<Message>,
    /// This replica's proposals that applied.
    pub applied: Vec<(ProposalId, Applied)>,
    /// This replica's proposals that can no longer apply (leadership changed); their
    /// clients may retry with the same request id.
    pub dropped: Vec<ProposalId>,
    /// Reads (by id) that may now be served from the state.
    pub reads_ready: Vec<u64>,
    /// Reads that failed because leadership changed.
    pub reads_failed: Vec<u64>,
    /// Entries applied.
    pub entries_applied: u64,
    /// Whether this replica became leader.
    pub became_leader: bool,
    /// Whether the leader changed (as seen here).
    pub leader_changed: bool,
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voter (or promote a learner).
    AddVoter {
        /// Id.
        id: u64,
        /// gRPC address.
        address: String,
    },
    /// Add a non-voting learner.
    AddLearner {
        /// Id.
        id: u64,
        /// gRPC address.
        address: String,
    },
    /// Remove a member.
    Remove {
        /// Id.
        id: u64,
    },
}

/// One create as the leader receives it.
#[derive(Debug, Clone)]
pub struct CreateItem {
    /// Idempotency key.
    pub request_id: String,
    /// Spec (validated by the caller).
    pub spec: SandboxSpec,
}

/// A replica's role and Raft position, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    /// Raft id.
    pub id: u64,
    /// Term.
    pub term: u64,
    /// Leader id, 0 when unknown.
    pub leader: u64,
    /// Role name: leader, follower, candidate, pre-candidate.
    pub role: &'static str,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Match index per member, when leader.
    pub matched: BTreeMap<u64, u64>,
}

/// One scheduler replica.
pub struct Replica<D: Durable> {
    cfg: ReplicaConfig,
    raw: RawNode<LogStore>,
    disk: D,
    state: State,
    applied: u64,
    applied_term: u64,
    conf_state: ConfState,
    peers: BTreeMap<u64, String>,
    incarnation: u64,
    next_seq: u64,
    /// Our proposals by log index.
    pending: BTreeMap<u64, ProposalId>,
    /// Placements proposed but not applied, by log index, with the item they belong to:
    /// the leader's view holds them.
    inflight: BTreeMap<u64, Vec<(usize, SandboxSpec, Placement)>>,
    /// Pending sandboxes with a bind in flight.
    binding: BTreeMap<u64, Vec<SandboxId>>,
    view: Option<(u64, ClusterView)>,
    placer: Placer,
    typical_revision: u64,
    pending_pass_revision: u64,
    pending_cursor: Option<SandboxId>,
    outstanding_reads: BTreeSet<u64>,
    ready_reads: Vec<(u64, u64)>,
    role: StateRole,
    leader: u64,
    snapshot_index: u64,
    leader_changes: u64,
}

fn store_err(e: raft::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl<D: Durable> Replica<D> {
    /// Opens a replica from its disk. With `bootstrap`, a fresh disk is bootstrapped with
    /// `peers` as the founding voters (id → address, identical on every founding replica);
    /// without it, a fresh disk is a replica waiting to be added, which uses `peers` only as
    /// addresses and catches up from the leader's snapshot.
    /// `incarnation` must differ at every start (the driver uses the wall clock, the
    /// harness a counter).
    pub fn open(
        cfg: ReplicaConfig,
        mut disk: D,
        peers: &BTreeMap<u64, String>,
        bootstrap: bool,
        incarnation: u64,
        logger: &slog::Logger,
    ) -> Result<Replica<D>, StoreError> {
        let founders = bootstrap.then_some(peers);
        let recovered = match disk.load()? {
            Some(r) => r,
            None => match founders {
                Some(peers) => {
                    let r = bootstrap_state(peers);
                    disk.write(&WriteBatch {
                        snapshot: Some(&r.snapshot),
                        entries: &[],
                        hard_state: Some(&r.hard_state),
                    })?;
                    r
                }
                None => Recovered::default(),
            },
        };
        let snapshot = recovered.snapshot.clone();
        let meta = snapshot.get_metadata();
        // A replica waiting to be added knows the others only from its config, until the
        // leader's snapshot brings the membership.
        let (state, peers) = if meta.index > 0 {
            decode_snapshot(&snapshot)?
        } else {
            (State::new(), peers.clone())
        };
        let raft_cfg = raft_config(&cfg, meta.index);
        let store = LogStore::from_recovered(recovered);
        let raw = RawNode::new(&raft_cfg, store, logger).map_err(store_err)?;
        let placer = Placer::new(cfg.placer.clone(), TypicalWorkload::default());
        Ok(Replica {
            applied: meta.index,
            applied_term: meta.term,
            conf_state: meta.get_conf_state().clone(),
            snapshot_index: meta.index,
            cfg,
            raw,
            disk,
            state,
            peers,
            incarnation,
            next_seq: 0,
            pending: BTreeMap::new(),
            inflight: BTreeMap::new(),
            binding: BTreeMap::new(),
            view: None,
            placer,
            typical_revision: u64::MAX,
            pending_pass_revision: u64::MAX,
            pending_cursor: None,
            outstanding_reads: BTreeSet::new(),
            ready_reads: Vec::new(),
            role: StateRole::Follower,
            leader: 0,
            leader_changes: 0,
        })
    }

    /// Raft id.
    pub fn id(&self) -> u64 {
        self.cfg.id
    }

    /// The applied state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Leader id as known here (0 when unknown).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Addresses of the members.
    pub fn peers(&self) -> &BTreeMap<u64, String> {
        &self.peers
    }

    /// Leader changes seen since start.
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes
    }

    /// Applied index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Role and positions.
    pub fn status(&self) -> RaftStatus {
        let r = &self.raw.raft;
        let role = match r.state {
            StateRole::Leader => "leader",
            StateRole::Follower => "follower",
            StateRole::Candidate => "candidate",
            StateRole::PreCandidate => "pre-candidate",
        };
        let mut matched = BTreeMap::new();
        if r.state == StateRole::Leader {
            for (id, pr) in r.prs().iter() {
                matched.insert(*id, pr.matched);
            }
        }
        RaftStatus {
            id: self.cfg.id,
            term: r.term,
            leader: r.leader_id,
            role,
            commit: r.raft_log.committed,
            applied: self.applied,
            last_index: r.raft_log.last_index(),
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            matched,
        }
    }

    /// Advances the logical clock one tick.
    pub fn tick(&mut self) {
        self.raw.tick();
    }

    /// Steps a message from a peer. Messages for another replica or from a non-member of a
    /// later configuration are dropped by raft-rs itself.
    pub fn step(&mut self, msg: Message) {
        if msg.to != self.cfg.id {
            return;
        }
        // A step error means a stale or unexpected message; Raft tolerates dropping it.
        let _ = self.raw.step(msg);
    }

    /// Tells Raft a peer could not be reached (its messages were dropped).
    pub fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    /// Tells Raft how sending a snapshot to a peer went.
    pub fn report_snapshot(&mut self, id: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(id, status);
    }

    /// Asks to campaign now (tests; a single-replica cluster elects itself on ticks anyway).
    pub fn campaign(&mut self) {
        let _ = self.raw.campaign();
    }

    fn not_leader(&self) -> ProposeError {
        let leader = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader,
            address: self.peers.get(&leader).cloned().unwrap_or_default(),
        }
    }

    fn next_proposal(&mut self) -> ProposalId {
        self.next_seq += 1;
        ProposalId {
            replica: self.cfg.id,
            incarnation: self.incarnation,
            seq: self.next_seq,
        }
    }

    fn propose_envelope(
        &mut self,
        command: Command,
        now_ms: u64,
    ) -> Result<(ProposalId, u64), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let proposal = self.next_proposal();
        let data = Envelope {
            proposal,
            now_ms,
            command,
        }
        .encode();
        self.raw
            .propose(Vec::new(), data)
            .map_err(|e| ProposeError::Dropped(e.to_string()))?;
        let index = self.raw.raft.raft_log.last_index();
        self.pending.insert(index, proposal);
        Ok((proposal, index))
    }

    /// Proposes a command as is.
    pub fn propose(&mut self, command: Command, now_ms: u64) -> Result<ProposalId, ProposeError> {
        self.propose_envelope(command, now_ms).map(|(p, _)| p)
    }

    /// The leader's hot path: places a batch of creates in one pass against the applied
    /// state plus every placement still in flight, and proposes them as ONE entry.
    pub fn propose_creates(
        &mut self,
        items: Vec<CreateItem>,
        now_ms: u64,
    ) -> Result<ProposalId, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.refresh_typical();
        let seed = self.cfg.placement_seed ^ self.state.revision() ^ (self.next_seq << 32);
        let fresh: Vec<usize> = (0..items.len())
            .filter(|&i| {
                self.state
                    .by_request_id(&items[i].spec.tenant, &items[i].request_id)
                    .is_none()
            })
            .collect();
        let batch: Vec<(SandboxId, &SandboxSpec)> = fresh
            .iter()
            .map(|&i| (SandboxId(i as u64), &items[i].spec))
            .collect();
        self.ensure_view();
        let decisions = match self.view.as_mut() {
            Some((_, view)) => self.placer.place_batch(view, &batch, seed),
            None => Vec::new(),
        };
        let mut placements: Vec<Option<Placement>> = vec![None; items.len()];
        for (id, decision) in decisions {
            placements[id.0 as usize] = decision.placement;
        }
        let mut reserved = Vec::new();
        let submissions: Vec<Submission> = items
            .into_iter()
            .zip(placements)
            .enumerate()
            .map(|(i, (item, placement))| {
                if let Some(p) = &placement {
                    reserved.push((i, item.spec.clone(), p.clone()));
                }
                Submission {
                    request_id: item.request_id,
                    spec: item.spec,
                    placement,
                }
            })
            .collect();
        match self.propose_envelope(Command::SubmitSandboxes { items: submissions }, now_ms) {
            Ok((proposal, index)) => {
                if !reserved.is_empty() {
                    self.inflight.insert(index, reserved);
                }
                Ok(proposal)
            }
            Err(e) => {
                // The view holds reservations that will never apply.
                self.view = None;
                Err(e)
            }
        }
    }

    /// The leader's background pass: binds pending sandboxes that now fit, and records why
    /// the others do not. Does nothing unless the state changed since the last pass.
    /// Returns the proposals made.
    pub fn schedule_pending(&mut self, now_ms: u64) -> Vec<ProposalId> {
        let mut out = Vec::new();
        if !self.is_leader() || self.state.revision() == self.pending_pass_revision {
            return out;
        }
        self.pending_pass_revision = self.state.revision();
        let in_flight: BTreeSet<SandboxId> = self.binding.values().flatten().copied().collect();
        // A bounded slice per pass, resuming after the last sandbox tried, so a large
        // unplaceable backlog costs a fixed amount per pass and every sandbox is retried in
        // turn (highest priority, then oldest, first).
        let all: Vec<&crate::model::Sandbox> = self
            .state
            .pending()
            .into_iter()
            .filter(|s| !in_flight.contains(&s.id))
            .collect();
        let start = all
            .iter()
            .position(|s| self.pending_cursor.is_some_and(|c| s.id == c))
            .map_or(0, |i| i + 1);
        let pending: Vec<(SandboxId, SandboxSpec, Option<String>)> = all
            .iter()
            .cycle()
            .skip(start % all.len().max(1))
            .take(self.cfg.pending_pass_limit.min(all.len()))
            .map(|s| (s.id, s.spec.clone(), s.pending_reason.clone()))
            .collect();
        self.pending_cursor = pending.last().map(|(id, _, _)| *id);
        if pending.is_empty() {
            return out;
        }
        self.refresh_typical();
        let seed = self.cfg.placement_seed ^ self.state.revision();
        let batch: Vec<(SandboxId, &SandboxSpec)> =
            pending.iter().map(|(id, spec, _)| (*id, spec)).collect();
        self.ensure_view();
        let decisions = match self.view.as_mut() {
            Some((_, view)) => self.placer.place_batch(view, &batch, seed),
            None => Vec::new(),
        };
        let mut binds = Vec::new();
        let mut reserved = Vec::new();
        let mut reasons = Vec::new();
        for ((id, decision), (_, spec, old_reason)) in decisions.into_iter().zip(&pending) {
            match decision.placement {
                Some(p) => {
                    reserved.push((binds.len(), spec.clone(), p.clone()));
                    binds.push((id, p));
                }
                None => {
                    let reason = decision.explanation.summary();
                    if old_reason.as_deref() != Some(reason.as_str()) {
                        reasons.push((id, reason));
                    }
                }
            }
        }
        if !binds.is_empty() {
            let ids: Vec<SandboxId> = binds.iter().map(|(id, _)| *id).collect();
            match self.propose_envelope(Command::BindSandboxes { items: binds }, now_ms) {
                Ok((p, index)) => {
                    self.inflight.insert(index, reserved);
                    self.binding.insert(index, ids);
                    out.push(p);
                }
                Err(_) => self.view = None,
            }
        }
        if !reasons.is_empty() {
            if let Ok(p) = self.propose(Command::SetPendingReasons { items: reasons }, now_ms) {
                out.push(p);
            }
        }
        out
    }

    fn refresh_typical(&mut self) {
        // The typical workload follows the live mix; recomputing it is linear in the
        // sandboxes, so it is refreshed when the state has moved on by a margin.
        let revision = self.state.revision();
        if self.typical_revision != u64::MAX && revision < self.typical_revision + 1_000 {
            return;
        }
        self.typical_revision = revision;
        let live = self
            .state
            .sandboxes()
            .values()
            .filter(|s| !s.state.is_terminal())
            .map(|s| &s.spec);
        self.placer.set_typical(TypicalWorkload::from_specs(live));
    }

    /// Builds the leader's view (applied state plus in-flight placements) unless the one
    /// held is current: placements reserve into it as they are made.
    fn ensure_view(&mut self) {
        let revision = self.state.revision();
        if self.view.as_ref().is_some_and(|(r, _)| *r == revision) {
            return;
        }
        let mut view = ClusterView::from_state(&self.state, self.cfg.placement_seed);
        for reservations in self.inflight.values() {
            for (_, spec, placement) in reservations {
                view.reserve(spec, placement);
            }
        }
        self.view = Some((revision, view));
    }

    /// Proposes a membership change (one at a time, no joint configuration).
    pub fn propose_membership(
        &mut self,
        change: MembershipChange,
    ) -> Result<ProposalId, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let proposal = self.next_proposal();
        let mut ctx = MembershipContext {
            proposal: Some(proposal),
            ..Default::default()
        };
        let mut single = ConfChangeSingle::default();
        match &change {
            MembershipChange::AddVoter { id, address } => {
                single.set_change_type(ConfChangeType::AddNode);
                single.node_id = *id;
                ctx.addresses.insert(*id, address.clone());
            }
            MembershipChange::AddLearner { id, address } => {
                single.set_change_type(ConfChangeType::AddLearnerNode);
                single.node_id = *id;
                ctx.addresses.insert(*id, address.clone());
            }
            MembershipChange::Remove { id } => {
                if !self.conf_state.voters.contains(id) && !self.conf_state.learners.contains(id) {
                    return Err(ProposeError::Membership(format!(
                        "replica {id} is not a member"
                    )));
                }
                if self.conf_state.voters == [*id] {
                    return Err(ProposeError::Membership(format!(
                        "replica {id} is the only voter"
                    )));
                }
                single.set_change_type(ConfChangeType::RemoveNode);
                single.node_id = *id;
            }
        }
        if single.node_id == 0 {
            return Err(ProposeError::Membership("peer_id must be non-zero".into()));
        }
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.set_context(ctx.encode().into());
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| match e {
                // Another change is still being applied (or a new leader has not applied its
                // first entry yet): transient, so retryable.
                raft::Error::ProposalDropped => ProposeError::Dropped(e.to_string()),
                e => ProposeError::Membership(e.to_string()),
            })?;
        let index = self.raw.raft.raft_log.last_index();
        self.pending.insert(index, proposal);
        Ok(proposal)
    }

    /// Starts a linearizable read; its id comes back in [`Output::reads_ready`] once the
    /// applied state is at least as new as the commit index the leader confirmed.
    pub fn read_index(&mut self, read_id: u64) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.outstanding_reads.insert(read_id);
        self.raw.read_index(read_id.to_be_bytes().to_vec());
        Ok(())
    }

    /// Handles everything Raft has ready. An error means the disk failed (or the harness
    /// crashed it): the replica must stop.
    pub fn handle_ready(&mut self) -> Result<Output, StoreError> {
        let mut out = Output::default();
        if self.raw.has_ready() {
            let mut rd = self.raw.ready();
            out.messages.extend(rd.take_messages());
            if !rd.snapshot().is_empty() {
                let snapshot = rd.snapshot().clone();
                self.install_snapshot(snapshot)?;
            }
            let committed = rd.take_committed_entries();
            self.apply_entries(committed, &mut out)?;
            let entries = rd.take_entries();
            let hard_state: Option<HardState> = rd.hs().cloned();
            if !entries.is_empty() || hard_state.is_some() {
                self.disk.write(&WriteBatch {
                    snapshot: None,
                    entries: &entries,
                    hard_state: hard_state.as_ref(),
                })?;
                let store = self.raw.mut_store();
                store.append(&entries);
                if let Some(hs) = hard_state {
                    store.set_hard_state(hs);
                }
            }
            out.messages.extend(rd.take_persisted_messages());
            for rs in rd.take_read_states() {
                self.queue_read(rs.request_ctx.as_slice(), rs.index);
            }
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                let mut hs = self.raw.store().hard_state().clone();
                hs.commit = commit;
                self.raw.mut_store().set_hard_state(hs);
            }
            out.messages.extend(light.take_messages());
            let committed = light.take_committed_entries();
            self.apply_entries(committed, &mut out)?;
            self.raw.advance_apply();
        }
        self.track_role(&mut out);
        self.serve_reads(&mut out);
        self.maybe_snapshot()?;
        Ok(out)
    }

    fn queue_read(&mut self, ctx: &[u8], index: u64) {
        let Ok(bytes) = <[u8; 8]>::try_from(ctx) else {
            return;
        };
        let id = u64::from_be_bytes(bytes);
        if self.outstanding_reads.contains(&id) {
            self.ready_reads.push((id, index));
        }
    }

    fn serve_reads(&mut self, out: &mut Output) {
        let applied = self.applied;
        let outstanding = &mut self.outstanding_reads;
        self.ready_reads.retain(|(id, index)| {
            if *index <= applied {
                outstanding.remove(id);
                out.reads_ready.push(*id);
                false
            } else {
                true
            }
        });
    }

    fn track_role(&mut self, out: &mut Output) {
        let role = self.raw.raft.state;
        let leader = self.raw.raft.leader_id;
        if leader != self.leader {
            self.leader = leader;
            if leader != 0 {
                self.leader_changes += 1;
                out.leader_changed = true;
            }
        }
        if role == self.role {
            return;
        }
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        if role == StateRole::Leader {
            out.became_leader = true;
            self.pending_pass_revision = u64::MAX;
            self.typical_revision = u64::MAX;
        }
        if was_leader {
            // Proposals may still commit under the next leader; their clients are told to
            // retry with the same request id, which deduplicates.
            out.dropped
                .extend(std::mem::take(&mut self.pending).into_values());
            self.inflight.clear();
            self.binding.clear();
            self.view = None;
            out.reads_failed
                .extend(std::mem::take(&mut self.outstanding_reads));
            self.ready_reads.clear();
        }
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let (state, peers) = decode_snapshot(&snapshot)?;
        self.disk.write(&WriteBatch {
            snapshot: Some(&snapshot),
            entries: &[],
            hard_state: None,
        })?;
        let meta = snapshot.get_metadata();
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.snapshot_index = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        self.state = state;
        self.peers = peers;
        self.view = None;
        self.inflight.clear();
        self.binding.clear();
        let dropped: Vec<u64> = self.pending.range(..=meta.index).map(|(i, _)| *i).collect();
        for i in dropped {
            self.pending.remove(&i);
        }
        self.raw.mut_store().apply_snapshot(snapshot);
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<(), StoreError> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            let ours = self.pending.remove(&entry.index);
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => None,
                EntryType::EntryNormal => {
                    let envelope = Envelope::decode(&entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("entry {}: {e}", entry.index)))?;
                    let mine = ours == Some(envelope.proposal);
                    let plan = self.view_plan(&envelope.command, mine);
                    let outcomes = self.state.apply(&envelope.command, envelope.now_ms);
                    self.view_after(plan, &outcomes, entry.index);
                    Some((
                        envelope.proposal,
                        Applied::Items {
                            outcomes,
                            revision: self.state.revision(),
                        },
                    ))
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("entry {}: {e}", entry.index)))?;
                    self.apply_membership(&cc)
                }
                EntryType::EntryConfChange => {
                    let cc = raft::eraftpb::ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|e| StoreError::Corrupt(format!("entry {}: {e}", entry.index)))?;
                    self.apply_membership(&cc.into_v2())
                }
            };
            self.applied = entry.index;
            self.applied_term = entry.term;
            self.inflight.remove(&entry.index);
            self.binding.remove(&entry.index);
            out.entries_applied += 1;
            match (ours, result) {
                (Some(mine), Some((proposal, applied))) if mine == proposal => {
                    out.applied.push((proposal, applied));
                }
                (Some(mine), _) => out.dropped.push(mine),
                _ => {}
            }
        }
        Ok(())
    }

    /// What an entry about to apply does to the leader's view. The view is kept in step
    /// incrementally: rebuilding it (a pass over every node) per batch would dominate the
    /// hot path.
    fn view_plan(&self, command: &Command, mine: bool) -> ViewPlan {
        if self.view.is_none() {
            return ViewPlan::Nothing;
        }
        let holding = |id: &SandboxId| {
            let s = self.state.sandbox(*id)?;
            let binding = s.binding.as_ref()?;
            s.state
                .holds_resources()
                .then(|| (*id, s.spec.clone(), binding.placement.clone()))
        };
        match command {
            Command::SubmitSandboxes { .. } | Command::BindSandboxes { .. } if mine => {
                ViewPlan::Ours
            }
            Command::SetPendingReasons { .. } | Command::ExpireTerminal { .. } => ViewPlan::Nothing,
            Command::DeleteSandboxes { items } => {
                ViewPlan::Release(items.iter().filter_map(holding).collect())
            }
            Command::UpdateSandboxes { items } => ViewPlan::Release(
                items
                    .iter()
                    .filter(|u| !matches!(u.change, crate::state::StatusChange::Running))
                    .filter_map(|u| holding(&u.sandbox))
                    .collect(),
            ),
            _ => ViewPlan::Invalidate,
        }
    }

    fn view_after(&mut self, plan: ViewPlan, outcomes: &[ItemOutcome], index: u64) {
        let Some((revision, view)) = self.view.as_mut() else {
            return;
        };
        match plan {
            ViewPlan::Nothing => {}
            ViewPlan::Invalidate => {
                self.view = None;
                return;
            }
            ViewPlan::Release(list) => {
                for (id, spec, placement) in list {
                    let still_holds = self
                        .state
                        .sandbox(id)
                        .is_some_and(|s| s.state.holds_resources());
                    if !still_holds {
                        view.release(&spec, &placement);
                    }
                }
            }
            ViewPlan::Ours => {
                for (item, spec, placement) in self.inflight.get(&index).into_iter().flatten() {
                    let kept = matches!(
                        outcomes.get(*item),
                        Some(ItemOutcome::Created { bound: true, .. } | ItemOutcome::Applied)
                    );
                    if !kept {
                        view.release(spec, placement);
                    }
                }
            }
        }
        *revision = self.state.revision();
    }

    /// Whether the leader's incrementally kept view agrees with one rebuilt from the state
    /// and the in-flight placements (tests; `None` when no view is held).
    pub fn view_is_consistent(&self) -> Option<bool> {
        let (revision, view) = self.view.as_ref()?;
        if *revision != self.state.revision() {
            return Some(true);
        }
        let mut fresh = ClusterView::from_state(&self.state, self.cfg.placement_seed);
        for reservations in self.inflight.values() {
            for (_, spec, placement) in reservations {
                fresh.reserve(spec, placement);
            }
        }
        let free = |v: &ClusterView| -> Vec<(String, u64, u64, Vec<u32>)> {
            let mut out: Vec<_> = v
                .nodes()
                .iter()
                .map(|n| {
                    (
                        n.spec.id.clone(),
                        n.cpu_milli_free,
                        n.memory_mib_free,
                        n.gpu_milli_free.clone(),
                    )
                })
                .collect();
            out.sort();
            out
        };
        Some(free(view) == free(&fresh))
    }

    fn apply_membership(&mut self, cc: &ConfChangeV2) -> Option<(ProposalId, Applied)> {
        let ctx = MembershipContext::decode(cc.get_context()).unwrap_or_default();
        let result = match self.raw.apply_conf_change(cc) {
            Ok(cs) => {
                self.conf_state = cs;
                for (id, address) in &ctx.addresses {
                    self.peers.insert(*id, address.clone());
                }
                let members: BTreeSet<u64> = self
                    .conf_state
                    .voters
                    .iter()
                    .chain(&self.conf_state.learners)
                    .copied()
                    .collect();
                self.peers.retain(|id, _| members.contains(id));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        ctx.proposal.map(|p| (p, Applied::Membership(result)))
    }

    fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
        let due_entries = self.applied >= self.snapshot_index + self.cfg.snapshot_every_entries;
        let due_bytes = self.raw.store().data_bytes() >= self.cfg.snapshot_every_bytes;
        let wanted = self.raw.store().take_snapshot_wanted();
        if !(due_entries || due_bytes || wanted) || self.applied <= self.snapshot_index {
            return Ok(());
        }
        let mut snapshot = Snapshot::default();
        snapshot.set_data(
            SnapshotPayload {
                state: self.state.snapshot(),
                peers: self.peers.clone(),
            }
            .encode()
            .into(),
        );
        let meta = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf_state.clone());
        let keep = if due_bytes {
            0
        } else {
            self.cfg.keep_entries_after_snapshot
        };
        let compact_index = self.applied.saturating_sub(keep);
        let compact_to = match self.raw.store().term_of(compact_index) {
            Some(term) => (compact_index, term),
            None => (0, 0),
        };
        self.disk.save_snapshot(&snapshot, compact_to)?;
        self.raw
            .mut_store()
            .install_local_snapshot(snapshot, compact_to);
        self.snapshot_index = self.applied;
        Ok(())
    }

    /// Whether any sandbox is pending (the driver runs [`Replica::schedule_pending`] then).
    pub fn has_pending(&self) -> bool {
        self.state
            .sandboxes_by_state()
            .get(SandboxState::Pending.name())
            .is_some_and(|n| *n > 0)
    }

    /// Uncompacted log entries held in memory (metrics).
    pub fn log_len(&self) -> usize {
        self.raw.store().len()
    }

    /// Placements in flight (metrics).
    pub fn inflight_entries(&self) -> usize {
        self.inflight.len()
    }
}

/// What applying one entry does to the leader's view.
enum ViewPlan {
    /// Nothing it tracks changes.
    Nothing,
    /// Rebuild it before the next placement.
    Invalidate,
    /// Give back what these sandboxes held if they no longer hold it after the entry.
    Release(Vec<(SandboxId, SandboxSpec, Placement)>),
    /// The leader's own creates or binds: keep reservations that were accepted.
    Ours,
}

fn raft_config(cfg: &ReplicaConfig, applied: u64) -> raft::Config {
    let (min, max) = match cfg.fixed_election_timeout {
        Some(t) => (t, t + 1),
        None => (cfg.election_tick, 2 * cfg.election_tick),
    };
    raft::Config {
        id: cfg.id,
        election_tick: cfg.election_tick,
        heartbeat_tick: cfg.heartbeat_tick,
        applied,
        max_size_per_msg: cfg.max_size_per_msg,
        max_inflight_msgs: cfg.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        min_election_tick: min,
        max_election_tick: max,
        ..Default::default()
    }
}

fn bootstrap_state(peers: &BTreeMap<u64, String>) -> Recovered {
    let mut snapshot = Snapshot::default();
    snapshot.set_data(
        SnapshotPayload {
            state: State::new().snapshot(),
            peers: peers.clone(),
        }
        .encode()
        .into(),
    );
    let meta = snapshot.mut_metadata();
    meta.index = BOOTSTRAP_INDEX;
    meta.term = 1;
    meta.mut_conf_state().voters = peers.keys().copied().collect();
    let hard_state = HardState {
        term: 1,
        commit: BOOTSTRAP_INDEX,
        ..Default::default()
    };
    Recovered {
        snapshot,
        hard_state,
        entries: Vec::new(),
        compacted: (BOOTSTRAP_INDEX, 1),
    }
}

fn decode_snapshot(snapshot: &Snapshot) -> Result<(State, BTreeMap<u64, String>), StoreError> {
    let payload = SnapshotPayload::decode(snapshot.get_data())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let state = State::restore(&payload.state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((state, payload.peers))
}
