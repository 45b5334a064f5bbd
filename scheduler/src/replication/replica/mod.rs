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
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, HardState, Message};
use raft::{RawNode, StateRole};
use raft_proto::ConfChangeI as _;

mod membership;
mod snapshots;
mod types;

use snapshots::{bootstrap_state, decode_snapshot};
pub use types::{
    Applied, BOOTSTRAP_INDEX, MembershipChange, Output, ProposeError, RaftStatus, ReplicaConfig,
};

use super::codec::{Envelope, ProposalId};
use super::log_store::{Durable, LogStore, Recovered, StoreError, WriteBatch};
use crate::leader::Planner;
use crate::model::{SandboxId, SandboxState};
use crate::placement::Placer;
use crate::placement::fragmentation::TypicalWorkload;
use crate::state::{Command, State, Submission};

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
    /// The leader's placement planning (view, in-flight reservations, pending pass).
    planner: Planner,
    /// Resumes placed on their snapshot's node, and elsewhere (metrics).
    snapshot_affinity: (u64, u64),
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
        let planner = Planner::new(placer, cfg.placement_seed, cfg.pending_pass_limit);
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
            planner,
            snapshot_affinity: (0, 0),
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

    /// The leader's hot path: the planner places a whole batch of creates in one pass
    /// against the applied state plus every placement still in flight, and they are
    /// proposed as ONE entry.
    pub fn propose_creates(
        &mut self,
        items: Vec<Submission>,
        now_ms: u64,
    ) -> Result<ProposalId, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let (submissions, reserved) =
            self.planner
                .plan_creates(&self.state, items, self.next_seq << 32);
        match self.propose_envelope(Command::SubmitSandboxes { items: submissions }, now_ms) {
            Ok((proposal, index)) => {
                self.planner.proposed(index, reserved, Vec::new());
                Ok(proposal)
            }
            Err(e) => {
                self.planner.proposal_failed();
                Err(e)
            }
        }
    }

    /// The leader's background pass: binds pending sandboxes that now fit, and records why
    /// the others do not (see [`Planner::plan_pending`]). Does nothing unless the state
    /// changed since the last pass. Returns the proposals made.
    pub fn schedule_pending(&mut self, now_ms: u64) -> Vec<ProposalId> {
        let mut out = Vec::new();
        if !self.is_leader() {
            return out;
        }
        let Some(plan) = self.planner.plan_pending(&self.state) else {
            return out;
        };
        self.snapshot_affinity.0 += plan.affinity_hits;
        self.snapshot_affinity.1 += plan.affinity_misses;
        if !plan.binds.is_empty() {
            let ids: Vec<SandboxId> = plan.binds.iter().map(|(id, _)| *id).collect();
            let command = Command::BindSandboxes { items: plan.binds };
            match self.propose_envelope(command, now_ms) {
                Ok((p, index)) => {
                    self.planner.proposed(index, plan.reserved, ids);
                    out.push(p);
                }
                Err(_) => self.planner.proposal_failed(),
            }
        }
        if !plan.reasons.is_empty() {
            let command = Command::SetPendingReasons {
                items: plan.reasons,
            };
            if let Ok(p) = self.propose(command, now_ms) {
                out.push(p);
            }
        }
        out
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
                out.state_replaced = true;
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
            self.planner.became_leader();
        }
        if was_leader {
            // Proposals may still commit under the next leader; their clients are told to
            // retry with the same request id, which deduplicates.
            out.dropped
                .extend(std::mem::take(&mut self.pending).into_values());
            self.planner.reset();
            out.reads_failed
                .extend(std::mem::take(&mut self.outstanding_reads));
            self.ready_reads.clear();
        }
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
                    let plan = self
                        .planner
                        .before_apply(&self.state, &envelope.command, mine);
                    let outcomes = self.state.apply(&envelope.command, envelope.now_ms);
                    let changes = self.state.take_changes();
                    if !changes.sandboxes.is_empty() || !changes.nodes.is_empty() {
                        out.changes.push(changes);
                    }
                    self.planner
                        .after_apply(&self.state, plan, &outcomes, entry.index);
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
            self.planner.applied(entry.index);
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

    /// Whether the leader's incrementally kept view agrees with one rebuilt from the state
    /// and the in-flight placements (tests; `None` when no view is held).
    pub fn view_is_consistent(&self) -> Option<bool> {
        self.planner.view_is_consistent(&self.state)
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
        self.planner.inflight_entries()
    }

    /// Resumes this replica placed as leader on the node holding their snapshot, and
    /// elsewhere (metrics).
    pub fn snapshot_affinity(&self) -> (u64, u64) {
        self.snapshot_affinity
    }
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
