//! The warm pools' keeper: the leader makes new members of every pool short of its size
//! (`RefillWarmPools`), one batch per pool at a time. The state machine caps a refill at
//! the pool's size, so a keeper that proposes twice (or two leaders in turn) never
//! overfills a pool. A pool whose members keep ending before they are ready (an image that
//! cannot be pulled, a quota) is refilled with a doubling pause, up to a minute, so it
//! cannot churn sandboxes through the log.

use std::collections::BTreeMap;
use std::time::Duration;

use super::store::Store;
use crate::state::{Command, ItemOutcome};

/// How often the leader looks.
const ROUND: Duration = Duration::from_millis(250);
/// Longest pause between refills of a pool whose members keep failing, in rounds (60 s).
const BACKOFF_MAX_ROUNDS: u32 = 240;

/// A pool's refill history, kept by the leader only.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Refill {
    /// Rounds to wait before the next refill.
    wait: u32,
    /// Rounds the next failure waits (doubles).
    backoff: u32,
    /// Whether the last look refilled it.
    refilled: bool,
}

/// The keeper's decision for one round: which pools to refill and by how many, given each
/// short pool's (name, missing, warming). A pool with members still warming waits for
/// them; one found short again with nothing warming right after a refill (its members
/// ended before they were ready) backs off. Pools not listed are full: their history is
/// forgotten.
pub fn decide(
    history: &mut BTreeMap<String, Refill>,
    short: &[(String, u32, u32)],
) -> Vec<(String, u32)> {
    history.retain(|name, _| short.iter().any(|(n, ..)| n == name));
    let mut out = Vec::new();
    for (name, missing, warming) in short {
        let h = history.entry(name.clone()).or_default();
        if *warming > 0 {
            h.refilled = false;
            continue;
        }
        if h.refilled {
            // Refilled last time, nothing warming now, still short: they failed.
            h.backoff = (h.backoff.max(1) * 2).min(BACKOFF_MAX_ROUNDS);
            h.wait = h.backoff;
            h.refilled = false;
        }
        if h.wait > 0 {
            h.wait -= 1;
            continue;
        }
        h.refilled = true;
        out.push((name.clone(), *missing));
    }
    out
}

/// Runs on every replica until it stops; acts only while it leads.
pub async fn run_keeper<S: Store>(handle: S) {
    let mut rounds = super::leader_rounds::LeaderRounds::every(ROUND);
    let mut history = BTreeMap::new();
    while rounds.next(&handle).await {
        let Ok(short) = handle.read(false, |v| v.state.pools_short()).await else {
            continue;
        };
        let items = decide(&mut history, &short);
        if items.is_empty() {
            continue;
        }
        match handle.command(Command::RefillWarmPools { items }).await {
            Ok(result) => {
                for outcome in result.outcomes {
                    if let ItemOutcome::Rejected(r) = outcome {
                        tracing::info!(rejection = %r, "warm pool not refilled");
                    }
                }
            }
            Err(status) => tracing::warn!(%status, "could not refill warm pools"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(name: &str, missing: u32, warming: u32) -> (String, u32, u32) {
        (name.into(), missing, warming)
    }

    #[test]
    fn refills_what_is_missing_and_waits_for_warming_members() {
        let mut h = BTreeMap::new();
        assert_eq!(
            decide(&mut h, &[short("a", 3, 0)]),
            vec![("a".to_string(), 3)]
        );
        // Its members warm: nothing more until they are ready.
        assert!(decide(&mut h, &[short("a", 3, 3)]).is_empty());
        // Two were claimed later: refilled at once.
        assert_eq!(
            decide(&mut h, &[short("a", 2, 0)]),
            vec![("a".to_string(), 2)]
        );
        // Full: forgotten.
        assert!(decide(&mut h, &[]).is_empty());
        assert!(h.is_empty());
    }

    #[test]
    fn members_that_keep_failing_back_off_doubling() {
        let mut h = BTreeMap::new();
        let mut refills = Vec::new();
        for round in 0..40 {
            if !decide(&mut h, &[short("bad", 5, 0)]).is_empty() {
                refills.push(round);
            }
        }
        // Refill, wait 2, refill, wait 4, refill, wait 8, refill, wait 16 …
        assert_eq!(refills, vec![0, 3, 8, 17, 34]);
        // Once members warm and the pool fills, the history goes.
        assert!(decide(&mut h, &[short("bad", 5, 5)]).is_empty());
        assert!(decide(&mut h, &[]).is_empty());
        assert_eq!(
            decide(&mut h, &[short("bad", 1, 0)]),
            vec![("bad".to_string(), 1)]
        );
    }
}
