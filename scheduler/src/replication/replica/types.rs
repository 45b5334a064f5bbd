//! The replica's public vocabulary: its settings, what a proposal can fail with, what an
//! applied proposal came to, what the driver must do after a Ready, membership changes and
//! the Raft status shown to operators.

use std::collections::BTreeMap;

use raft::eraftpb::Message;
use thiserror::Error;

use super::super::codec::ProposalId;
use crate::placement::PlacerConfig;
use crate::state::ItemOutcome;

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
    /// What each applied entry wrote, in order (services feed agents and watches from it).
    pub changes: Vec<crate::state::Changes>,
    /// The state was replaced by a snapshot: anything may have changed.
    pub state_replaced: bool,
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

/// A replica's role and Raft position, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
