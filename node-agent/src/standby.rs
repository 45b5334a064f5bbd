//! The agent's standby worker: freezes and thaws ([`crate::freezer`]) run on one thread,
//! off the session loop and in the order the scheduler asked for them, so a resume right
//! after a standby never thaws a sandbox before its freeze is done (and leaves it frozen).
//! After each, the monitor is nudged to look at once, so the new state is reported without
//! waiting for its next round. A freeze that fails is noted like a failed pause, and the
//! scheduler takes the sandbox back.

use std::sync::Arc;
use std::sync::mpsc;

use crate::runtime::Runtime;

/// Where the session loop sends freezes and thaws.
pub struct StandbyWorker {
    tx: mpsc::Sender<(String, bool)>,
}

impl StandbyWorker {
    /// Starts the worker thread; it ends when the worker is dropped.
    pub fn spawn(runtime: Runtime, nudge: Arc<tokio::sync::Notify>) -> StandbyWorker {
        let (tx, rx) = mpsc::channel::<(String, bool)>();
        std::thread::Builder::new()
            .name("berth-standby".into())
            .spawn(move || {
                for (id, freeze) in rx {
                    let result = if freeze {
                        runtime.standby(&id)
                    } else {
                        runtime.thaw(&id)
                    };
                    match result {
                        Ok(()) => tracing::info!(sandbox = %id, freeze, "standby changed"),
                        Err(e) if freeze => {
                            tracing::warn!(sandbox = %id, error = %e, "could not freeze the sandbox");
                            runtime.standby_failed(&id, &format!("standby: {e}"));
                        }
                        Err(e) => {
                            tracing::warn!(sandbox = %id, error = %e, "could not thaw the sandbox");
                        }
                    }
                    nudge.notify_one();
                }
            })
            .map_or_else(
                |e| {
                    tracing::error!(error = %e, "no standby worker thread; standby is refused");
                },
                |_| (),
            );
        StandbyWorker { tx }
    }

    /// Freezes (`freeze`) or thaws sandbox `id`, after whatever was asked before.
    pub fn request(&self, id: &str, freeze: bool) {
        if self.tx.send((id.to_owned(), freeze)).is_err() {
            tracing::warn!(sandbox = %id, "the standby worker is gone; not carried out");
        }
    }
}
