//! The standby tier's clock: the leader pauses to disk (a checkpoint, which frees the
//! memory a frozen sandbox still holds) every sandbox on standby for
//! `[scheduler.sessions] standby_pause_after_ms`. The state machine keeps when each was
//! frozen (the entry's clock), so a new leader carries on where the old one was.

use std::time::Duration;

use super::driver::now_ms;
use super::store::Store;
use crate::state::{Command, ItemOutcome};

/// Most sandboxes one pause entry carries; more wait for the next round.
const MAX_PER_ENTRY: usize = 1_024;
/// How often the leader looks.
const ROUND: Duration = Duration::from_millis(500);

/// Runs on every replica until it stops; acts only while it leads. `after_ms` 0: never.
pub async fn run_pauser<S: Store>(handle: S, after_ms: u64, gpu_filesystem_only: bool) {
    if after_ms == 0 {
        return;
    }
    let mut rounds = super::leader_rounds::LeaderRounds::every(ROUND);
    while rounds.next(&handle).await {
        let now = now_ms();
        let Ok(items) = handle
            .read(false, move |v| {
                v.state.standby_over(now, after_ms, MAX_PER_ENTRY)
            })
            .await
        else {
            continue;
        };
        if items.is_empty() {
            continue;
        }
        let command = Command::PauseSandboxes {
            items,
            gpu_filesystem_only,
        };
        match handle.command(command).await {
            Ok(result) => {
                for outcome in result.outcomes {
                    // No CPU free to thaw it for the checkpoint, or a GPU sandbox that
                    // cannot be paused: it stays on standby, and is tried again next round.
                    if let ItemOutcome::Rejected(r) = outcome {
                        tracing::debug!(rejection = %r, "standby not paused to disk yet");
                    }
                }
            }
            Err(status) => tracing::warn!(%status, "could not pause standby sandboxes"),
        }
    }
}
