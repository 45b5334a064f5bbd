//! The leader's clocks share one loop: a round every period while this replica leads,
//! until the store reports a fatal error. Missed ticks are delayed, not bunched, so a
//! slow round (a proposal waiting on a busy log) is not followed by a burst of them.

use std::time::Duration;

use super::store::Store;

/// Rounds every period, the ones in which this replica leads.
pub struct LeaderRounds(tokio::time::Interval);

impl LeaderRounds {
    /// Rounds every `period`.
    pub fn every(period: Duration) -> LeaderRounds {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LeaderRounds(ticker)
    }

    /// Waits for the next round in which `handle` leads; `false` once the store is fatal
    /// (the clock stops).
    pub async fn next<S: Store>(&mut self, handle: &S) -> bool {
        loop {
            self.0.tick().await;
            if handle.fatal().is_some() {
                return false;
            }
            if handle.is_leader() {
                return true;
            }
        }
    }
}
