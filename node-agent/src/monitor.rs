//! Watching the node's sandboxes off the session loop.
//!
//! A task scans the state directory every [`MONITOR_EVERY`] on the blocking pool (a scan
//! reads a few files per live sandbox) and publishes the result; sessions diff what they
//! last sent against it. The same task removes the directories of sandboxes the scheduler
//! no longer has once they ended, keeps finished output for a while, and keeps the image
//! cache's pins in step with what runs (also after an agent restart, for re-adopted
//! sandboxes).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::image::ImageStore;
use crate::runtime::{LocalSandbox, LocalState, Runtime, unix_ms};

/// How often the agent looks at its sandboxes.
pub const MONITOR_EVERY: Duration = Duration::from_millis(100);
/// Finished sandboxes whose output is kept (for `berth sandbox logs`), newest first.
const MAX_FINISHED_KEPT: usize = 1_000;
/// How long a finished sandbox's output is kept.
const FINISHED_RETENTION: Duration = Duration::from_secs(3_600);

/// Every sandbox on the node and where it stands.
pub type Snapshot = Arc<BTreeMap<String, LocalSandbox>>;

/// The monitor's handle (cheap to clone).
#[derive(Clone)]
pub struct Monitor {
    snapshot: watch::Receiver<Snapshot>,
    doomed: Arc<Mutex<BTreeSet<String>>>,
    /// Wakes the scan early (a start or resume just settled).
    nudge: Arc<tokio::sync::Notify>,
}

impl Monitor {
    /// Scans once (so the first session registers what is here), then keeps scanning.
    pub async fn start(runtime: Runtime, images: ImageStore) -> Monitor {
        let doomed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        let first = {
            let runtime = runtime.clone();
            tokio::task::spawn_blocking(move || runtime.scan())
                .await
                .unwrap_or_default()
        };
        for (id, s) in &first {
            let live = s.state.runs() || matches!(s.state, LocalState::Paused(_));
            if live && !s.launch.image_digest.is_empty() {
                images.pin(id, &s.launch.image_digest);
            }
        }
        let (tx, rx) = watch::channel(Arc::new(first));
        let nudge = Arc::new(tokio::sync::Notify::new());
        let monitor = Monitor {
            snapshot: rx,
            doomed: doomed.clone(),
            nudge: nudge.clone(),
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MONITOR_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = nudge.notified() => {}
                }
                let last = tx.borrow().clone();
                let runtime = runtime.clone();
                let doomed = doomed.clone();
                let images = images.clone();
                let next =
                    tokio::task::spawn_blocking(move || look(&runtime, &last, &doomed, &images))
                        .await;
                let Ok(next) = next else { continue };
                if tx.is_closed() {
                    return;
                }
                tx.send_if_modified(|current| {
                    if **current == next {
                        false
                    } else {
                        *current = Arc::new(next);
                        true
                    }
                });
            }
        });
        monitor
    }

    /// A handle that makes the next scan happen now rather than at the next tick.
    pub fn nudger(&self) -> Arc<tokio::sync::Notify> {
        self.nudge.clone()
    }

    /// The latest look.
    pub fn current(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.clone()
    }

    /// The scheduler no longer has this sandbox: its directory goes once it ended.
    pub fn doom(&self, id: &str) {
        self.doomed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned());
    }

    /// Whether the scheduler no longer has it.
    pub fn is_doomed(&self, id: &str) -> bool {
        self.doomed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }
}

/// One look: scan, clean up what is doomed or old, keep image pins in step.
fn look(
    runtime: &Runtime,
    last: &BTreeMap<String, LocalSandbox>,
    doomed: &Mutex<BTreeSet<String>>,
    images: &ImageStore,
) -> BTreeMap<String, LocalSandbox> {
    let mut local = runtime.scan_cached(last);
    let mut finished: Vec<(u64, String)> = Vec::new();
    let mut gone: Vec<String> = Vec::new();
    {
        let mut doomed = doomed.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, s) in &local {
            let LocalState::Finished(record) = &s.state else {
                continue;
            };
            if last.get(id).is_none_or(|l| l.state != s.state) {
                images.unpin(id);
            }
            if doomed.contains(id) {
                gone.push(id.clone());
            } else {
                finished.push((record.finished_unix_ms, id.clone()));
            }
        }
        doomed.retain(|id| local.contains_key(id) && !gone.contains(id));
    }
    // Keep the newest finished sandboxes' output for a while.
    finished.sort_unstable_by(|a, b| b.cmp(a));
    let now = unix_ms();
    for (i, (at, id)) in finished.into_iter().enumerate() {
        let old = now.saturating_sub(at) > FINISHED_RETENTION.as_millis() as u64;
        if i >= MAX_FINISHED_KEPT || old {
            gone.push(id);
        }
    }
    for id in gone {
        if let Err(e) = runtime.remove(&id) {
            tracing::warn!(sandbox = %id, error = %e, "could not remove sandbox directory");
        }
        local.remove(&id);
    }
    local
}
