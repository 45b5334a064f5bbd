//! What the agent tells the scheduler about its sandboxes: a sandbox's local state as a
//! status report, and the reports a session sends as states change (each state once per
//! session, a failed pause once per failure, nothing while a sandbox is still starting).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use berth_proto::pb::v1 as pb;
use tokio::sync::mpsc;

use crate::monitor::{Monitor, Snapshot};
use crate::runtime::{ExitRecord, LocalSandbox, LocalState, Outcome, PauseMode, unix_ms};

/// The session's stream to the scheduler closed.
#[derive(Debug)]
pub(crate) struct StreamClosed;

/// What a session reports of a sandbox: nothing while it is still starting.
pub(crate) fn reportable(s: &LocalSandbox) -> bool {
    s.started || s.state != LocalState::Running
}

pub(crate) fn message(m: pb::agent_message::Message) -> pb::AgentMessage {
    pb::AgentMessage { message: Some(m) }
}

/// A sandbox's local state as a status report.
pub(crate) fn report_of(id: &str, state: &LocalState) -> pb::SandboxStatusUpdate {
    let mut update = pb::SandboxStatusUpdate {
        sandbox_id: id.to_owned(),
        at_unix_ms: unix_ms(),
        ..Default::default()
    };
    let s = match state {
        LocalState::Running => pb::SandboxState::Running,
        LocalState::Standby => pb::SandboxState::Standby,
        LocalState::Paused(record) => {
            update.snapshot_bytes = record.bytes;
            update.snapshot_filesystem_only = record.mode == PauseMode::FilesystemOnly;
            pb::SandboxState::Paused
        }
        LocalState::Finished(ExitRecord {
            outcome: Outcome::Exited { code },
            ..
        }) => {
            update.exit_code = *code;
            pb::SandboxState::Exited
        }
        LocalState::Finished(ExitRecord {
            outcome: Outcome::Failed { reason },
            ..
        }) => {
            update.reason = reason.clone();
            pb::SandboxState::Failed
        }
    };
    update.state = s as i32;
    update
}

fn status_message(id: &str, state: &LocalState) -> pb::AgentMessage {
    message(pb::agent_message::Message::SandboxStatus(report_of(
        id, state,
    )))
}

/// The reports that outlive one session.
#[derive(Default)]
pub(crate) struct Reports {
    /// Sandboxes whose failed pause was reported (once per failure note).
    pause_failures: Mutex<BTreeSet<String>>,
}

impl Reports {
    /// Sends the status of every sandbox whose reportable state changed since `sent`.
    pub(crate) async fn send_changes(
        &self,
        monitor: &Monitor,
        tx: &mpsc::Sender<pb::AgentMessage>,
        snapshot: &Snapshot,
        sent: &mut BTreeMap<String, LocalState>,
    ) -> Result<(), StreamClosed> {
        for (id, s) in snapshot.iter() {
            if s.pause_failed.is_none() {
                self.pause_failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
            }
            if let Some(why) = s.pause_failed.as_ref().filter(|_| !monitor.is_doomed(id)) {
                // A failed pause: say it runs, so the scheduler takes it back from Pausing.
                if !self
                    .pause_failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(id.clone())
                {
                    continue;
                }
                tracing::warn!(sandbox = %id, reason = %why.trim(), "pause failed; the sandbox keeps running");
                let mut update = report_of(id, &s.state);
                update.reason = format!("pause failed: {}", why.trim());
                update.pause_failed = true;
                let m = message(pb::agent_message::Message::SandboxStatus(update));
                if tx.send(m).await.is_err() {
                    return Err(StreamClosed);
                }
            }
            if monitor.is_doomed(id) || !reportable(s) || sent.get(id) == Some(&s.state) {
                continue;
            }
            if let LocalState::Finished(record) = &s.state {
                tracing::info!(sandbox = %id, outcome = ?record.outcome, "sandbox ended");
            }
            if tx.send(status_message(id, &s.state)).await.is_err() {
                return Err(StreamClosed);
            }
            sent.insert(id.clone(), s.state.clone());
        }
        sent.retain(|id, _| snapshot.contains_key(id));
        Ok(())
    }
}
