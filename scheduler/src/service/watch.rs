//! `WatchSandboxes`: a stream of changes to the sandboxes matching a filter.
//!
//! Level-triggered: the watcher keeps the last version of each matching sandbox it sent,
//! and after every batch of applied entries (coalesced over 20 ms) it reads the sandboxes
//! the change feed says were written since its last look, from this replica's applied-state
//! copy (off the Raft thread), and sends those that changed (`UPSERTED`) or were removed
//! (`DELETED`). A stream starts with the current state of every match, or, given
//! `after_revision`, with what was written after it (see [`start`]); so a client that
//! reconnects never misses a final state. Watches are served by any replica from its own
//! applied state; revisions are the same on every replica.
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

use super::feed::TooOld;
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

impl WatchFilter {
    fn admits(&self, id: SandboxId, tenant: &str) -> bool {
        (self.tenant.is_empty() || self.tenant == tenant)
            && (self.ids.is_empty() || self.ids.contains(&id))
    }
}

/// What one look found: matches that are there (`Some`, with their `revision` zeroed so
/// versions compare by content) or gone (`None`), and the revision looked at.
struct Look {
    found: BTreeMap<String, Option<pb::Sandbox>>,
    revision: u64,
    /// Every match is in `found`: what was sent and is not there is gone.
    complete: bool,
}

fn to_pb(s: &crate::model::Sandbox, state: &crate::state::State) -> pb::Sandbox {
    let mut pb = convert::sandbox_to_pb_in(s, state);
    pb.revision = 0;
    pb
}

/// Reads every current match. Error when the watch matches too many.
async fn everything<S: Store>(handle: &S, filter: &WatchFilter) -> Result<Look, Status> {
    let filter = filter.clone();
    handle
        .read(false, move |v| {
            let mut found = BTreeMap::new();
            let mut add = |s: &crate::model::Sandbox| {
                if filter.admits(s.id, &s.spec.tenant) {
                    found.insert(s.id.to_string(), Some(to_pb(s, v.state)));
                }
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
            if found.len() > MAX_WATCHED {
                return Err(Status::resource_exhausted(format!(
                    "tenant: the watch matches {} sandboxes; at most {MAX_WATCHED} (narrow it with \
                     sandbox_ids or tenant)",
                    found.len()
                )));
            }
            Ok(Look {
                found,
                revision: v.state.revision(),
                complete: true,
            })
        })
        .await?
}

/// Reads the matches written after `after`, from the change feed's history; [`TooOld`]
/// when the history no longer reaches back that far.
async fn since<S: Store>(
    handle: &S,
    filter: &WatchFilter,
    after: u64,
) -> Result<Result<Look, TooOld>, Status> {
    let filter = filter.clone();
    let feed = handle.clone();
    Ok(handle
        .read(false, move |v| {
            let revision = v.state.revision();
            let changed = feed.feed().changed_since(after, revision)?;
            let mut found = BTreeMap::new();
            for (id, removed) in changed {
                match (removed, v.state.sandbox(id)) {
                    (None, Some(s)) if filter.admits(id, &s.spec.tenant) => {
                        found.insert(id.to_string(), Some(to_pb(s, v.state)));
                    }
                    (Some(tenant), None) if filter.admits(id, &tenant) => {
                        found.insert(id.to_string(), None);
                    }
                    _ => {}
                }
            }
            Ok(Look {
                found,
                revision,
                complete: false,
            })
        })
        .await?)
}

/// The answer to an `after_revision` older than this replica's history.
fn too_old(after: u64, old: TooOld) -> Status {
    let mut status = Status::out_of_range(format!(
        "after_revision: {after} is older than the oldest change this replica keeps; resume \
         from {} or later, or start a new watch without after_revision (it begins with the \
         current state)",
        old.floor
    ));
    if let Ok(v) = old.floor.to_string().parse() {
        status.metadata_mut().insert(OLDEST_REVISION_METADATA, v);
    }
    status
}

/// Metadata on an OUT_OF_RANGE answer: the oldest `after_revision` the replica resumes from.
pub const OLDEST_REVISION_METADATA: &str = "berth-oldest-revision";

/// Starts a watch: the first read happens now (so a bad filter, or an `after_revision`
/// older than the history, fails the call), the rest on a task feeding `tx`.
///
/// `after_revision` 0 starts with the current state of every match; otherwise the stream
/// starts with each match written after that revision, once, at its current version (a
/// removed one as `DELETED`), which is what a client that saw everything up to it lacks.
/// Then every look reads only what the change feed says was written since the last one.
pub async fn start<S: Store>(
    handle: S,
    slots: &WatchSlots,
    filter: WatchFilter,
    after_revision: u64,
    tx: Events,
) -> Result<(), Status> {
    let slot = slots.take()?;
    let first = if after_revision == 0 {
        everything(&handle, &filter).await?
    } else {
        since(&handle, &filter, after_revision)
            .await?
            .map_err(|old| too_old(after_revision, old))?
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut revisions = handle.revisions();
        let mut sent: BTreeMap<String, pb::Sandbox> = BTreeMap::new();
        let mut look = first;
        loop {
            let revision = look.revision;
            if !send_changes(&tx, &mut sent, look).await {
                return;
            }
            if sent.len() > MAX_WATCHED {
                let _ = tx
                    .send(Err(Status::resource_exhausted(format!(
                        "tenant: the watch matches more than {MAX_WATCHED} sandboxes (narrow it \
                         with sandbox_ids or tenant)"
                    ))))
                    .await;
                return;
            }
            loop {
                tokio::select! {
                    changed = revisions.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
                tokio::time::sleep(COALESCE).await;
                if *revisions.borrow_and_update() > revision {
                    break;
                }
            }
            // Fell behind the history (or the state was replaced): look at everything.
            let next = match since(&handle, &filter, revision).await {
                Ok(Ok(l)) => Ok(l),
                Ok(Err(_)) => everything(&handle, &filter).await,
                Err(status) => Err(status),
            };
            match next {
                Ok(l) => look = l,
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
async fn send_changes(tx: &Events, sent: &mut BTreeMap<String, pb::Sandbox>, look: Look) -> bool {
    let revision = look.revision;
    let event = |kind: pb::sandbox_event::Kind, mut sandbox: pb::Sandbox| {
        sandbox.revision = revision;
        Ok(pb::SandboxEvent {
            kind: kind as i32,
            sandbox: Some(sandbox),
            revision,
        })
    };
    let mut gone: Vec<(String, pb::Sandbox)> = Vec::new();
    if look.complete {
        let missing: Vec<String> = sent
            .keys()
            .filter(|id| !look.found.contains_key(*id))
            .cloned()
            .collect();
        for id in missing {
            if let Some(last) = sent.remove(&id) {
                gone.push((id, last));
            }
        }
    }
    let mut upserted = Vec::new();
    for (id, now) in look.found {
        match now {
            Some(sandbox) => upserted.push((id, sandbox)),
            None => {
                let last = sent.remove(&id).unwrap_or_else(|| pb::Sandbox {
                    id: id.clone(),
                    ..Default::default()
                });
                gone.push((id, last));
            }
        }
    }
    for (_, last) in gone {
        if tx
            .send(event(pb::sandbox_event::Kind::Deleted, last))
            .await
            .is_err()
        {
            return false;
        }
    }
    for (id, sandbox) in upserted {
        if sent.get(&id) == Some(&sandbox) {
            continue;
        }
        if tx
            .send(event(pb::sandbox_event::Kind::Upserted, sandbox.clone()))
            .await
            .is_err()
        {
            return false;
        }
        sent.insert(id, sandbox);
    }
    true
}
