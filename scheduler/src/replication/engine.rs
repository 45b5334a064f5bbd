//! The production durable store: raft-engine (TiKV's Raft log engine: checksummed,
//! append-only, fsync'd) for entries and hard state, and one snapshot file written
//! atomically beside it.
//!
//! Layout of `data_dir`:
//! - `raft-log/`: raft-engine's files. Region 1 holds the log; keys `hard_state` and
//!   `compacted` (index and term of the last compacted entry) live beside it.
//! - `snapshot`: the latest snapshot (protobuf `eraftpb::Snapshot`), replaced by
//!   write-to-temporary, fsync, rename, fsync of the directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot};
use raft_engine::{Command, Config, Engine, LogBatch, MessageExt, ReadableSize};

use super::log_store::{Durable, Recovered, StoreError, WriteBatch};

const REGION: u64 = 1;
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_COMPACTED: &[u8] = b"compacted";

#[derive(Clone)]
struct EntryCodec;

impl MessageExt for EntryCodec {
    type Entry = Entry;
    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// raft-engine plus a snapshot file.
pub struct EngineDisk {
    engine: Engine,
    dir: PathBuf,
}

fn io(context: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{context}: {e}"))
}

fn engine_err(e: raft_engine::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

impl EngineDisk {
    /// Opens (creating if missing) the store under `dir`.
    pub fn open(dir: &Path) -> Result<EngineDisk, StoreError> {
        fs::create_dir_all(dir).map_err(io(&format!("creating {}", dir.display())))?;
        let log_dir = dir.join("raft-log");
        let cfg = Config {
            dir: log_dir.to_string_lossy().into_owned(),
            target_file_size: ReadableSize::mb(64),
            purge_threshold: ReadableSize::mb(512),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(engine_err)?;
        Ok(EngineDisk {
            engine,
            dir: dir.to_path_buf(),
        })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot")
    }

    fn write_snapshot_file(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let bytes = snapshot
            .write_to_bytes()
            .map_err(|e| StoreError::Io(format!("encoding snapshot: {e}")))?;
        let tmp = self.dir.join("snapshot.tmp");
        let mut file = fs::File::create(&tmp).map_err(io("creating snapshot.tmp"))?;
        file.write_all(&bytes).map_err(io("writing snapshot.tmp"))?;
        file.sync_all().map_err(io("syncing snapshot.tmp"))?;
        fs::rename(&tmp, self.snapshot_path()).map_err(io("renaming snapshot.tmp"))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing the data directory"))?;
        Ok(())
    }

    fn put_compacted(batch: &mut LogBatch, (index, term): (u64, u64)) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&index.to_be_bytes());
        value.extend_from_slice(&term.to_be_bytes());
        batch
            .put(REGION, KEY_COMPACTED.to_vec(), value)
            .map_err(engine_err)
    }

    fn commit(&self, batch: &mut LogBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.engine.write(batch, true).map_err(engine_err)?;
        Ok(())
    }
}

impl Durable for EngineDisk {
    fn load(&mut self) -> Result<Option<Recovered>, StoreError> {
        let snapshot = match fs::read(self.snapshot_path()) {
            Ok(bytes) => Some(Snapshot::parse_from_bytes(&bytes).map_err(|e| {
                StoreError::Corrupt(format!("{}: {e}", self.snapshot_path().display()))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading the snapshot")(e)),
        };
        let hard_state: Option<HardState> = self
            .engine
            .get_message(REGION, KEY_HARD_STATE)
            .map_err(engine_err)?;
        if snapshot.is_none() && hard_state.is_none() {
            return Ok(None);
        }
        let compacted = match self.engine.get(REGION, KEY_COMPACTED) {
            Some(v) if v.len() == 16 => {
                let (i, t) = v.split_at(8);
                let index = u64::from_be_bytes(i.try_into().unwrap_or_default());
                let term = u64::from_be_bytes(t.try_into().unwrap_or_default());
                (index, term)
            }
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "compacted marker is {} bytes, not 16",
                    v.len()
                )));
            }
            None => (0, 0),
        };
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (
            self.engine.first_index(REGION),
            self.engine.last_index(REGION),
        ) {
            let first = first.max(compacted.0 + 1);
            if first <= last {
                self.engine
                    .fetch_entries_to::<EntryCodec>(REGION, first, last + 1, None, &mut entries)
                    .map_err(engine_err)?;
            }
        }
        if let Some(first) = entries.first() {
            if first.index != compacted.0 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "log starts at {} but the last compacted entry is {}",
                    first.index, compacted.0
                )));
            }
        }
        Ok(Some(Recovered {
            snapshot: snapshot.unwrap_or_default(),
            hard_state: hard_state.unwrap_or_default(),
            entries,
            compacted,
        }))
    }

    fn write(&mut self, w: &WriteBatch<'_>) -> Result<(), StoreError> {
        let mut batch = LogBatch::default();
        if let Some(snapshot) = w.snapshot {
            // The snapshot is on disk before the log forgets what it replaces.
            self.write_snapshot_file(snapshot)?;
            let meta = snapshot.get_metadata();
            batch.add_command(REGION, Command::Clean);
            Self::put_compacted(&mut batch, (meta.index, meta.term))?;
            // Clean dropped the hard state too; the Ready that carries a snapshot always
            // carries a hard state, but keep one in any case.
            if w.hard_state.is_none() {
                if let Some(hs) = self
                    .engine
                    .get_message::<HardState>(REGION, KEY_HARD_STATE)
                    .map_err(engine_err)?
                {
                    let mut hs = hs;
                    hs.commit = hs.commit.max(meta.index);
                    hs.term = hs.term.max(meta.term);
                    batch
                        .put_message(REGION, KEY_HARD_STATE.to_vec(), &hs)
                        .map_err(engine_err)?;
                }
            }
        }
        if !w.entries.is_empty() {
            batch
                .add_entries::<EntryCodec>(REGION, w.entries)
                .map_err(engine_err)?;
        }
        if let Some(hs) = w.hard_state {
            batch
                .put_message(REGION, KEY_HARD_STATE.to_vec(), hs)
                .map_err(engine_err)?;
        }
        self.commit(&mut batch)
    }

    fn save_snapshot(
        &mut self,
        snapshot: &Snapshot,
        compact_to: (u64, u64),
    ) -> Result<(), StoreError> {
        self.write_snapshot_file(snapshot)?;
        if compact_to.0 > 0 {
            let mut batch = LogBatch::default();
            Self::put_compacted(&mut batch, compact_to)?;
            batch.add_command(
                REGION,
                Command::Compact {
                    index: compact_to.0 + 1,
                },
            );
            self.commit(&mut batch)?;
            // Reclaim files whose entries are all compacted; raft-engine rewrites what is
            // still live out of old files.
            self.engine.purge_expired_files().map_err(engine_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn entries_hard_state_and_snapshots_survive_reopening() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(io("tempdir"))?;
        {
            let mut disk = EngineDisk::open(dir.path())?;
            assert!(disk.load()?.is_none(), "a fresh store is empty");
            let hs = HardState {
                term: 3,
                commit: 2,
                ..Default::default()
            };
            let entries: Vec<Entry> = (1..=5).map(|i| entry(i, 3, b"x")).collect();
            disk.write(&WriteBatch {
                snapshot: None,
                entries: &entries,
                hard_state: Some(&hs),
            })?;
            // A conflicting suffix from a new leader replaces entries 4 and 5.
            disk.write(&WriteBatch {
                snapshot: None,
                entries: &[entry(4, 4, b"y")],
                hard_state: None,
            })?;
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 3;
            snap.mut_metadata().term = 3;
            snap.set_data(b"state".to_vec().into());
            disk.save_snapshot(&snap, (2, 3))?;
        }
        let mut disk = EngineDisk::open(dir.path())?;
        let r = disk
            .load()?
            .ok_or(StoreError::Io("empty after reopen".into()))?;
        assert_eq!(r.hard_state.term, 3);
        assert_eq!(r.compacted, (2, 3));
        assert_eq!(r.snapshot.get_data(), b"state");
        let got: Vec<(u64, u64)> = r.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(3, 3), (4, 4)]);

        // A snapshot from the leader replaces the whole log.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 5;
        let hs = HardState {
            term: 5,
            commit: 10,
            ..Default::default()
        };
        disk.write(&WriteBatch {
            snapshot: Some(&snap),
            entries: &[],
            hard_state: Some(&hs),
        })?;
        disk.write(&WriteBatch {
            snapshot: None,
            entries: &[entry(11, 5, b"z")],
            hard_state: None,
        })?;
        drop(disk);
        let mut disk = EngineDisk::open(dir.path())?;
        let r = disk
            .load()?
            .ok_or(StoreError::Io("empty after reopen".into()))?;
        assert_eq!(r.compacted, (10, 5));
        assert_eq!(r.hard_state.commit, 10);
        let got: Vec<u64> = r.entries.iter().map(|e| e.index).collect();
        assert_eq!(got, vec![11]);
        Ok(())
    }

    #[test]
    fn a_corrupt_snapshot_file_is_refused_with_its_path() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(io("tempdir"))?;
        {
            let mut disk = EngineDisk::open(dir.path())?;
            disk.write(&WriteBatch {
                snapshot: None,
                entries: &[],
                hard_state: Some(&HardState::default()),
            })?;
        }
        fs::write(dir.path().join("snapshot"), b"\xff\xff\xff garbage").map_err(io("write"))?;
        let mut disk = EngineDisk::open(dir.path())?;
        let err = disk.load().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("snapshot"), "{err}");
        Ok(())
    }
}
