//! `WatchSandboxes`: a stream of changes to the sandboxes matching a filter.
//!
//! Level-triggered: the watcher keeps the last version of each matching sandbox it sent,
//! and after every batch of applied entries (coalesced over 20 ms) it reads the
//! matching sandboxes from this replica's applied state and sends those that changed
//! (`UPSERTED`) or disappeared (`DELETED`). A stream therefore starts with the current
//! state of every match; a client that reconnects gets that again, so it never misses a
//! final state. Watches are served by any replica from its own applied state.
//!
//! Bounded: at most [`MAX_WATCHES`] streams per replica, and a watch may match at most
//! [`MAX_WATCHED`] sandboxes (narrow it with `sandbox_ids` or `tenant`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use berth_proto::pb::v1 as pb;

use super::store::Store;
use crate::convert;
use crate::model::SandboxId;

/// Most concurrent watch streams per replica.
pub const MAX_WATCHES: usize = 1_024;
/// Most sandboxes one watch may match.
pub const MAX_WATCHED: usize = 10_000;
/// Most ids in `sandbox_ids`.
pub const MAX_WATCH_IDS: usize = 1_000;
/// Applied entries within this window are looked at together.
const COALESCE: Duration = Duration::from_millis(20);

/// What a watch matches.
#[derive(Debug, Clone)]
pub struct WatchFilter {
    ids: BTreeSet<SandboxId>,
    tenant: String,
}

impl WatchFilter {
    /// Validates a request (INVALID_ARGUMENT naming the field).
    pub fn from_request(req: &pb::WatchSandboxesRequest) -> Result<WatchFilter, Status> {
        if req.sandbox_ids.len() > MAX_WATCH_IDS {
            return Err(Status::invalid_argument(format!(
                "sandbox_ids: {} ids; a watch takes at most {MAX_WATCH_IDS}",
                req.sandbox_ids.len()
            )));
        }
        let mut ids = BTreeSet::new();
        for (i, id) in req.sandbox_ids.iter().enumerate() {
            ids.insert(id.parse::<SandboxId>().map_err(|_| {
                Status::invalid_argument(format!(
                    "sandbox_ids[{i}]: {id:?} is not a sandbox id (sbx-NNNNNNNNNN)"
                ))
            })?);
        }
        if req.tenant.len() > 128 {
            return Err(Status::invalid_argument("tenant: at most 128 bytes"));
        }
        Ok(WatchFilter {
            ids,
            tenant: req.tenant.clone(),
        })
    }
}

/// Counts open watches; a slot is given back when its stream ends.
#[derive(Clone, Default)]
pub struct WatchSlots(Arc<AtomicUsize>);

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WatchSlots {
    fn take(&self) -> Result<Slot, Status> {
        let before = self.0.fetch_add(1, Ordering::Relaxed);
        if before >= MAX_WATCHES {
            self.0.fetch_sub(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "this replica serves at most {MAX_WATCHES} watches; close some or use another replica"
            )));
        }
        Ok(Slot(self.0.clone()))
    }
}

type Events = mpsc::Sender<Result<pb::SandboxEvent, Status>>;

/// Reads the current matches: id → sandbox (with its `revision` zeroed, so versions compare
/// by content), and the state's revision. Error when the watch matches too many.
async fn matches<S: Store>(
    handle: &S,
    filter: &WatchFilter,
) -> Result<(BTreeMap<String, pb::Sandbox>, u64), Status> {
    let filter = filter.clone();
    handle
        .read(false, move |v| {
            let mut out = BTreeMap::new();
            let mut add = |s: &crate::model::Sandbox| {
                if !filter.tenant.is_empty() && s.spec.tenant != filter.tenant {
                    return;
                }
                let mut pb = convert::sandbox_to_pb_in(s, v.state);
                pb.revision = 0;
                out.insert(pb.id.clone(), pb);
            };
            if filter.ids.is_empty() {
                for s in v.state.sandboxes().values() {
                    add(s);
                }
            } else {
                for id in &filter.ids {
                    if let Some(s) = v.state.sandbox(*id) {
                        add(s);
                    }
                }
            }
            if out.len() > MAX_WATCHED {
                return Err(Status::resource_exhausted(format!(
                    "tenant: the watch matches {} sandboxes; at most {MAX_WATCHED} (narrow it with \
                     sandbox_ids or tenant)",
                    out.len()
                )));
            }
            Ok((out, v.state.revision()))
        })
        .await?
}

/// Starts a watch: the first read happens now (so a bad filter fails the call), the rest
/// on a task feeding `tx`.
pub async fn start<S: Store>(
    handle: S,
    slots: &WatchSlots,
    filter: WatchFilter,
    tx: Events,
) -> Result<(), Status> {
    let slot = slots.take()?;
    let (first, revision) = matches(&handle, &filter).await?;
    tokio::spawn(async move {
        let _slot = slot;
        let mut revisions = handle.revisions();
        let mut sent: BTreeMap<String, pb::Sandbox> = BTreeMap::new();
        let mut current = first;
        let mut revision = revision;
        loop {
            if !send_changes(&tx, &mut sent, current, revision).await {
                return;
            }
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
            tokio::time::sleep(COALESCE).await;
            match matches(&handle, &filter).await {
                Ok((now, r)) => {
                    current = now;
                    revision = r;
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Sends what changed since `sent`; false when the client is gone.
async fn send_changes(
    tx: &Events,
    sent: &mut BTreeMap<String, pb::Sandbox>,
    current: BTreeMap<String, pb::Sandbox>,
    revision: u64,
) -> bool {
    let gone: Vec<String> = sent
        .keys()
        .filter(|id| !current.contains_key(*id))
        .cloned()
        .collect();
    let event = |kind: pb::sandbox_event::Kind, mut sandbox: pb::Sandbox| {
        sandbox.revision = revision;
        Ok(pb::SandboxEvent {
            kind: kind as i32,
            sandbox: Some(sandbox),
            revision,
        })
    };
    for id in gone {
        if let Some(last) = sent.remove(&id) {
            if tx
                .send(event(pb::sandbox_event::Kind::Deleted, last))
                .await
                .is_err()
            {
                return false;
            }
        }
    }
    for (id, sandbox) in current {
        if sent.get(&id) == Some(&sandbox) {
            continue;
        }
        let upserted = event(pb::sandbox_event::Kind::Upserted, sandbox.clone());
        if tx.send(upserted).await.is_err() {
            return false;
        }
        sent.insert(id, sandbox);
    }
    true
}
