//! The Raft log as raft-rs reads it: an in-memory copy of what is on disk, behind the
//! [`Durable`] trait that writes it.
//!
//! Every replica keeps its uncompacted log, hard state and latest snapshot in memory
//! ([`LogStore`], which implements `raft::Storage`), and writes each change through a
//! [`Durable`] backend before anything that depends on it leaves the replica. Snapshots
//! bound the memory: the log is compacted behind each one. Production uses raft-engine
//! ([`super::engine::EngineDisk`]); the deterministic harness uses [`MemDisk`], which can
//! lose a write the way a crash before fsync does.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use raft::eraftpb::{Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use thiserror::Error;

/// A failure of the durable store. The replica stops: Raft's safety depends on every write
/// it acknowledged being on disk.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The harness simulated a crash during this write; nothing of it was kept.
    #[error("simulated crash during a write")]
    Crashed,
    /// An I/O or engine error.
    #[error("log store: {0}")]
    Io(String),
    /// What was read back is not what berth writes.
    #[error("log store is corrupt: {0}")]
    Corrupt(String),
}

/// What a replica recovers at start.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Latest snapshot (index 0 when none).
    pub snapshot: Snapshot,
    /// Hard state.
    pub hard_state: HardState,
    /// Uncompacted entries, contiguous.
    pub entries: Vec<Entry>,
    /// Index and term of the last compacted entry.
    pub compacted: (u64, u64),
}

/// One durable write: what a Ready asks to persist. Applied atomically and synced before
/// `write` returns.
#[derive(Debug, Default)]
pub struct WriteBatch<'a> {
    /// A snapshot received from the leader: it replaces the whole log.
    pub snapshot: Option<&'a Snapshot>,
    /// Entries to append; an entry at an existing index truncates the log from there.
    pub entries: &'a [Entry],
    /// New hard state.
    pub hard_state: Option<&'a HardState>,
}

/// Durable storage of the Raft log, hard state and snapshots.
pub trait Durable {
    /// Loads what is stored; `None` for an empty store.
    fn load(&mut self) -> Result<Option<Recovered>, StoreError>;
    /// Persists a Ready's changes, synced.
    fn write(&mut self, batch: &WriteBatch<'_>) -> Result<(), StoreError>;
    /// Stores a snapshot taken locally, then drops entries up to `compact_to` (inclusive).
    fn save_snapshot(
        &mut self,
        snapshot: &Snapshot,
        compact_to: (u64, u64),
    ) -> Result<(), StoreError>;
}

/// The log as raft-rs sees it.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    compacted: (u64, u64),
    /// Set when a follower needed a newer snapshot than the one held.
    snapshot_wanted: Cell<bool>,
}

impl LogStore {
    /// A store holding what was recovered.
    pub fn from_recovered(r: Recovered) -> LogStore {
        LogStore {
            hard_state: r.hard_state,
            snapshot: r.snapshot,
            entries: r.entries,
            compacted: r.compacted,
            snapshot_wanted: Cell::new(false),
        }
    }

    /// Hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Latest snapshot.
    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Number of entries held in memory.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of entry data held in memory.
    pub fn data_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.data.len()).sum()
    }

    /// Whether a follower asked for a snapshot newer than the one held (cleared on read).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    fn first(&self) -> u64 {
        self.compacted.0 + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(
            self.compacted.0.max(self.snapshot.get_metadata().index),
            |e| e.index,
        )
    }

    /// Appends entries, truncating any conflicting suffix first.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first_new) = entries.first().map(|e| e.index) else {
            return;
        };
        let keep = first_new.saturating_sub(self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Sets the hard state.
    pub fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        self.compacted = (meta.index, meta.term);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.entries.clear();
        self.snapshot = snapshot;
    }

    /// Installs a snapshot taken locally and drops entries up to `compact_to`.
    pub fn install_local_snapshot(&mut self, snapshot: Snapshot, compact_to: (u64, u64)) {
        self.snapshot = snapshot;
        if compact_to.0 > self.compacted.0 {
            let drop = (compact_to.0 - self.compacted.0) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
            self.compacted = compact_to;
        }
    }

    /// Term of an entry held, or of the snapshot / compaction point.
    pub fn term_of(&self, idx: u64) -> Option<u64> {
        if idx == self.compacted.0 {
            return Some(self.compacted.1);
        }
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Some(meta.term);
        }
        if idx < self.first() {
            return None;
        }
        self.entries
            .get((idx - self.first()) as usize)
            .map(|e| e.term)
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(hi - lo);
        let mut size = 0u64;
        for e in &self.entries[lo..hi] {
            size += u64::from(protobuf::Message::compute_size(e));
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if let Some(term) = self.term_of(idx) {
            return Ok(term);
        }
        if idx < self.first() {
            Err(raft::Error::Store(StorageError::Compacted))
        } else {
            Err(raft::Error::Store(StorageError::Unavailable))
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let conf = self.snapshot.get_metadata().get_conf_state();
        // A replica added after the snapshot was taken would refuse it (it is not in the
        // snapshot's membership): take a newer one first.
        let knows_peer = conf.voters.contains(&to) || conf.learners.contains(&to);
        if self.snapshot.get_metadata().index < request_index || !knows_peer {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

/// What a [`MemDisk`] holds: the synced image of one replica's disk.
#[derive(Debug, Clone, Default)]
pub struct DiskImage {
    recovered: Option<Recovered>,
    /// Writes refused since the last restart (crash injection).
    pub lost_writes: u64,
}

/// A durable store in memory for the deterministic harness. A write is applied whole or,
/// when the harness arms a crash, not at all, which is exactly what a crash before fsync
/// leaves of it.
#[derive(Debug, Clone)]
pub struct MemDisk {
    image: Rc<RefCell<DiskImage>>,
    crash_next_write: Rc<Cell<bool>>,
}

impl MemDisk {
    /// A disk over a shared image (the harness keeps it across restarts).
    pub fn new(image: Rc<RefCell<DiskImage>>, crash_next_write: Rc<Cell<bool>>) -> MemDisk {
        MemDisk {
            image,
            crash_next_write,
        }
    }

    fn crash(&self) -> bool {
        if self.crash_next_write.replace(false) {
            self.image.borrow_mut().lost_writes += 1;
            return true;
        }
        false
    }
}

impl Durable for MemDisk {
    fn load(&mut self) -> Result<Option<Recovered>, StoreError> {
        Ok(self.image.borrow().recovered.clone())
    }

    fn write(&mut self, batch: &WriteBatch<'_>) -> Result<(), StoreError> {
        if self.crash() {
            return Err(StoreError::Crashed);
        }
        let mut image = self.image.borrow_mut();
        let r = image.recovered.get_or_insert_with(Recovered::default);
        if let Some(snapshot) = batch.snapshot {
            let meta = snapshot.get_metadata();
            r.compacted = (meta.index, meta.term);
            r.entries.clear();
            r.snapshot = snapshot.clone();
        }
        if let Some(first_new) = batch.entries.first().map(|e| e.index) {
            let keep = first_new.saturating_sub(r.compacted.0 + 1) as usize;
            r.entries.truncate(keep);
            r.entries.extend_from_slice(batch.entries);
        }
        if let Some(hs) = batch.hard_state {
            r.hard_state = hs.clone();
        }
        Ok(())
    }

    fn save_snapshot(
        &mut self,
        snapshot: &Snapshot,
        compact_to: (u64, u64),
    ) -> Result<(), StoreError> {
        if self.crash() {
            return Err(StoreError::Crashed);
        }
        let mut image = self.image.borrow_mut();
        let r = image.recovered.get_or_insert_with(Recovered::default);
        r.snapshot = snapshot.clone();
        if compact_to.0 > r.compacted.0 {
            let drop = (compact_to.0 - r.compacted.0) as usize;
            r.entries.drain(..drop.min(r.entries.len()));
            r.compacted = compact_to;
        }
        Ok(())
    }
}
