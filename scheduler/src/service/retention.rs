//! Snapshot retention's clock: the leader ends every paused sandbox whose snapshot is
//! older than its tenant's `[scheduler.sessions] snapshot_retention_ms` (a per-tenant
//! override, or the cluster's). The retention is this replica's config, so each entry
//! carries the retention used per sandbox, and apply re-checks it against the entry's
//! clock: a sandbox resumed meanwhile is refused and stays. Ending one drops it from its
//! node's snapshot index, and the node's feed tells the agent to delete the snapshot.

use std::sync::Arc;
use std::time::Duration;

use super::driver::now_ms;
use super::store::Store;
use crate::sessions::SessionsConfig;
use crate::state::{Command, ItemOutcome};

/// Most sandboxes one expiry entry carries; more wait for the next round.
const MAX_PER_ENTRY: usize = 1_024;
/// How often the leader looks.
const ROUND: Duration = Duration::from_secs(1);

/// Runs on every replica until it stops; acts only while it leads. It also ends paused
/// sandboxes past their own idle limit, so it runs even when no tenant has a retention
/// (a round costs nothing while no sandbox is paused).
pub async fn run_expirer<S: Store>(handle: S, sessions: SessionsConfig) {
    let sessions = Arc::new(sessions);
    let mut rounds = super::leader_rounds::LeaderRounds::every(ROUND);
    while rounds.next(&handle).await {
        let now = now_ms();
        let of = sessions.clone();
        let Ok(items) = handle
            .read(false, move |v| {
                v.state
                    .snapshots_older(now, |t| of.snapshot_retention_ms(t), MAX_PER_ENTRY)
            })
            .await
        else {
            continue;
        };
        if items.is_empty() {
            continue;
        }
        match handle.command(Command::ExpireSnapshots { items }).await {
            Ok(result) => {
                let mut expired = 0;
                for outcome in result.outcomes {
                    match outcome {
                        ItemOutcome::Applied => expired += 1,
                        // Resumed or deleted since the look: it stays as it is.
                        ItemOutcome::Rejected(r) => {
                            tracing::debug!(rejection = %r, "snapshot not expired");
                        }
                        _ => {}
                    }
                }
                if expired > 0 {
                    tracing::info!(
                        count = expired,
                        "paused sandboxes past their snapshot retention ended"
                    );
                }
            }
            Err(status) => tracing::warn!(%status, "could not expire snapshots"),
        }
    }
}
