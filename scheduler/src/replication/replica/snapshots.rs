//! Snapshots: taking one every `snapshot_every_entries` applied entries (or when the log in
//! memory passes `snapshot_every_bytes`, or a follower needs one) and compacting the log
//! behind it; installing one from the leader; the bootstrap snapshot every founding replica
//! writes identically.

use std::collections::BTreeMap;

use raft::eraftpb::{HardState, Snapshot};

use super::{BOOTSTRAP_INDEX, Replica};
use crate::replication::codec::SnapshotPayload;
use crate::replication::log_store::{Durable, Recovered, StoreError, WriteBatch};
use crate::state::State;

impl<D: Durable> Replica<D> {
    pub(super) fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
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
        self.planner.reset();
        let dropped: Vec<u64> = self.pending.range(..=meta.index).map(|(i, _)| *i).collect();
        for i in dropped {
            self.pending.remove(&i);
        }
        self.raw.mut_store().apply_snapshot(snapshot);
        Ok(())
    }

    pub(super) fn maybe_snapshot(&mut self) -> Result<(), StoreError> {
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
}

pub(super) fn bootstrap_state(peers: &BTreeMap<u64, String>) -> Recovered {
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

pub(super) fn decode_snapshot(
    snapshot: &Snapshot,
) -> Result<(State, BTreeMap<u64, String>), StoreError> {
    let payload = SnapshotPayload::decode(snapshot.get_data())
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let state = State::restore(&payload.state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((state, payload.peers))
}
