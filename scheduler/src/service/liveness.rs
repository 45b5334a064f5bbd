//! Node liveness: the leader marks a node Down when its agent stops heartbeating, and
//! loses its sandboxes when the disconnect grace ends without the node coming back.
//!
//! Heartbeats are not replicated (they would put one log entry per node per second into
//! Raft); each replica remembers when it last heard from each node's agent, and only the
//! leader acts on it. Agents talk only to the leader, so a new leader knows nothing yet:
//! for `leader_grace` after every leader change it marks nothing Down and loses nothing,
//! and it counts every node as heard from at the moment it became leader.
//!
//! A silent node gets `NodeDisconnected`: it is Down and its sandboxes are Unknown, holding
//! their resources, for `disconnect_grace` (Nomad's `max_client_disconnect`). Its agent
//! comes back by registering again (the leader closes a Down node's stream, so an agent
//! that was only stopped or starved reconnects too), and what it reports then stands.
//! When the grace has ended the checker proposes `ExpireDisconnected` for the sandboxes
//! still Unknown; the state machine re-checks each against the entry's clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::store::Store;
use crate::model::NodeStatus;
use crate::state::{Command, ItemOutcome};

/// Liveness settings, from `[scheduler.liveness]`.
#[derive(Debug, Clone, Copy)]
pub struct LivenessSettings {
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is marked Down.
    pub node_ttl: Duration,
    /// No node is marked Down this long after a leader change.
    pub leader_grace: Duration,
    /// How long a Down node's sandboxes stay Unknown before they are Lost.
    pub disconnect_grace: Duration,
    /// Heartbeats per second the leader handles at most (0: no limit).
    pub max_heartbeats_per_second: u64,
}

impl LivenessSettings {
    /// The heartbeat interval for a cluster of `nodes`: the configured one, or longer so
    /// that `nodes` agents send at most `max_heartbeats_per_second` together.
    pub fn interval_for(&self, nodes: usize) -> Duration {
        if self.max_heartbeats_per_second == 0 {
            return self.heartbeat_interval;
        }
        let spread = Duration::from_secs_f64(nodes as f64 / self.max_heartbeats_per_second as f64);
        self.heartbeat_interval.max(spread)
    }

    /// The TTL that goes with an interval: the configured TTL, scaled as the interval was.
    pub fn ttl_for(&self, interval: Duration) -> Duration {
        let factor = interval.as_secs_f64() / self.heartbeat_interval.as_secs_f64().max(1e-3);
        self.node_ttl.mul_f64(factor.max(1.0))
    }
}

/// Most sandboxes one `ExpireDisconnected` entry loses; more wait for the next tick (one
/// entry stays small however many nodes vanish at once).
const MAX_EXPIRED_PER_ENTRY: usize = 4_096;

/// When each node's agent was last heard from, on this replica.
#[derive(Clone)]
pub struct Liveness {
    settings: LivenessSettings,
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    /// The longest heartbeat interval handed out (ms): the TTL follows it, so an agent
    /// told to heartbeat rarely is never judged by a shorter TTL.
    longest_interval_ms: Arc<AtomicU64>,
    /// The interval for the fleet's size now; agents' streams pass changes on.
    interval: Arc<tokio::sync::watch::Sender<Duration>>,
    /// The longest silence between two signs of life from one node, in ms.
    max_gap_ms: Arc<AtomicU64>,
}

impl Liveness {
    /// An empty tracker.
    pub fn new(settings: LivenessSettings) -> Liveness {
        Liveness {
            settings,
            seen: Arc::default(),
            longest_interval_ms: Arc::new(AtomicU64::new(
                settings.heartbeat_interval.as_millis() as u64
            )),
            interval: Arc::new(tokio::sync::watch::channel(settings.heartbeat_interval).0),
            max_gap_ms: Arc::default(),
        }
    }

    /// The interval to hand a registering agent, for a cluster of `nodes` (and remembers
    /// it, so the TTL covers it).
    pub fn interval_for(&self, nodes: usize) -> Duration {
        let interval = self.settings.interval_for(nodes);
        self.longest_interval_ms
            .fetch_max(interval.as_millis() as u64, Ordering::Relaxed);
        self.interval.send_if_modified(|now| {
            let changed = *now != interval;
            *now = interval;
            changed
        });
        interval
    }

    /// Changes of the interval for the fleet's size (the agents' streams send them on).
    pub fn interval_changes(&self) -> tokio::sync::watch::Receiver<Duration> {
        self.interval.subscribe()
    }

    /// The TTL in force: the configured one, scaled by the longest interval handed out.
    pub fn ttl(&self) -> Duration {
        let longest = Duration::from_millis(self.longest_interval_ms.load(Ordering::Relaxed));
        self.settings.ttl_for(longest)
    }

    /// The settings.
    pub fn settings(&self) -> LivenessSettings {
        self.settings
    }

    /// Records a sign of life (a registration or a heartbeat) from a node's agent.
    pub fn heard_from(&self, node: &str) {
        self.heard_at(node, Instant::now());
    }

    fn heard_at(&self, node: &str, when: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match seen.get_mut(node) {
            Some(at) => {
                let gap = when.saturating_duration_since(*at).as_millis() as u64;
                self.max_gap_ms.fetch_max(gap, Ordering::Relaxed);
                *at = when;
            }
            None => {
                seen.insert(node.to_owned(), when);
            }
        }
    }

    /// The longest gap between two signs of life from one node seen here, in ms (a leader
    /// change restarts every node's clock, so a reconnect after it does not count).
    pub fn max_gap_ms(&self) -> u64 {
        self.max_gap_ms.load(Ordering::Relaxed)
    }

    /// When the node was last heard from, as Unix milliseconds (0 when never, here).
    pub fn last_heard_unix_ms(&self, node: &str) -> u64 {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(at) = seen.get(node) else {
            return 0;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(at.elapsed()).as_millis() as u64
    }

    fn reset_all(&self, to: Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for at in seen.values_mut() {
            *at = to;
        }
    }

    /// Nodes (of `candidates`) silent for longer than the TTL at `now`, with how long. A
    /// node never heard from counts as heard from at `since` (when this replica became
    /// leader).
    fn expired(
        &self,
        candidates: &[String],
        since: Instant,
        now: Instant,
    ) -> Vec<(String, Duration)> {
        let ttl = self.ttl();
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        candidates
            .iter()
            .filter_map(|node| {
                let last = seen.get(node).copied().unwrap_or(since).max(since);
                let silent = now.saturating_duration_since(last);
                (silent > ttl).then(|| (node.clone(), silent))
            })
            .collect()
    }
}

/// Runs on every replica until the replica stops; acts only while it leads.
pub async fn run_checker<S: Store>(handle: S, liveness: Liveness) {
    let settings = liveness.settings();
    let period = (settings.node_ttl / 10).clamp(Duration::from_millis(50), Duration::from_secs(2));
    let mut leader_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if handle.fatal().is_some() {
            return;
        }
        handle
            .metrics()
            .heartbeat_gap_max_ms
            .set(liveness.max_gap_ms() as i64);
        if !handle.is_leader() {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(|| {
            let now = Instant::now();
            liveness.reset_all(now);
            tracing::info!(
                grace_ms = settings.leader_grace.as_millis() as u64,
                "leading: nodes are not marked down during the grace period"
            );
            now
        });
        let now = Instant::now();
        if now.saturating_duration_since(since) < settings.leader_grace {
            continue;
        }
        let Ok(candidates) = handle
            .read(false, |v| {
                v.state
                    .nodes()
                    .values()
                    .filter(|r| r.status != NodeStatus::Down)
                    .map(|r| r.spec.id.clone())
                    .collect::<Vec<String>>()
            })
            .await
        else {
            continue;
        };
        // The fleet may have grown or shrunk since the last registration.
        liveness.interval_for(candidates.len());
        for (node, silent) in liveness.expired(&candidates, since, now) {
            let reason = format!(
                "no heartbeat for {} ms (ttl {} ms)",
                silent.as_millis(),
                liveness.ttl().as_millis()
            );
            let grace_ms = settings.disconnect_grace.as_millis() as u64;
            tracing::warn!(node = %node, %reason, grace_ms, "marking node down");
            let command = Command::NodeDisconnected {
                node: node.clone(),
                reason,
                grace_ms,
            };
            match handle.command(command).await {
                Ok(_) => handle.metrics().nodes_marked_down.inc(),
                Err(status) => tracing::warn!(node = %node, %status, "could not mark node down"),
            }
        }
        expire_disconnected(&handle).await;
    }
}

/// Proposes `ExpireDisconnected` for the Unknown sandboxes whose grace has ended by this
/// leader's clock (the same clock that stamps the entry).
async fn expire_disconnected<S: Store>(handle: &S) {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let Ok(items) = handle
        .read(false, move |v| {
            v.state.disconnect_grace_over(now_ms, MAX_EXPIRED_PER_ENTRY)
        })
        .await
    else {
        return;
    };
    if items.is_empty() {
        return;
    }
    let count = items.len();
    match handle.command(Command::ExpireDisconnected { items }).await {
        Ok(result) => {
            let lost = result
                .outcomes
                .iter()
                .filter(|o| matches!(o, ItemOutcome::Applied))
                .count();
            tracing::warn!(
                lost,
                "sandboxes lost: their node did not come back within the disconnect grace"
            );
            handle
                .metrics()
                .sandboxes_lost_after_grace
                .inc_by(lost as u64);
        }
        Err(status) => {
            tracing::warn!(count, %status, "could not expire the disconnect grace");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Liveness {
        Liveness::new(LivenessSettings {
            heartbeat_interval: Duration::from_millis(100),
            node_ttl: Duration::from_millis(500),
            leader_grace: Duration::from_millis(500),
            disconnect_grace: Duration::from_millis(1_000),
            max_heartbeats_per_second: 1_000,
        })
    }

    #[test]
    fn a_large_fleet_heartbeats_less_often_and_the_ttl_follows_the_longest_interval() {
        let l = tracker();
        // 100 nodes at 100 ms is 1,000/s: the configured interval holds.
        assert_eq!(l.interval_for(100), Duration::from_millis(100));
        assert_eq!(l.ttl(), Duration::from_millis(500));
        // 10,000 nodes at 1,000/s: every node once per 10 s, and the TTL scales by 100.
        assert_eq!(l.interval_for(10_000), Duration::from_secs(10));
        assert_eq!(l.ttl(), Duration::from_secs(50));
        // The fleet shrinks: new agents heartbeat faster, but the TTL still covers the
        // agents told 10 s.
        assert_eq!(l.interval_for(10), Duration::from_millis(100));
        assert_eq!(l.ttl(), Duration::from_secs(50));
        let start = Instant::now();
        l.heard_at("slow", start);
        assert!(
            l.expired(&["slow".into()], start, start + Duration::from_secs(30))
                .is_empty()
        );
        // Streams hear of a change to pass it on to their agents.
        let mut changes = l.interval_changes();
        l.interval_for(20_000);
        assert!(changes.has_changed().expect("sender alive"));
        assert_eq!(*changes.borrow_and_update(), Duration::from_secs(20));
        // No limit: the configured interval whatever the size.
        let mut s = l.settings();
        s.max_heartbeats_per_second = 0;
        assert_eq!(s.interval_for(1_000_000), Duration::from_millis(100));
    }

    #[test]
    fn silence_past_the_ttl_expires_and_a_heartbeat_renews() {
        let l = tracker();
        let start = Instant::now();
        l.heard_from("a");
        let nodes = vec!["a".to_string(), "never".to_string()];
        assert!(l.expired(&nodes, start, start).is_empty());
        let later = start + Duration::from_millis(600);
        let expired: Vec<String> = l
            .expired(&nodes, start, later)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(expired, ["a", "never"]);
        // A heartbeat renews: heard 400 ms in, "a" is not silent long enough at 600 ms.
        l.heard_at("a", start + Duration::from_millis(400));
        assert!(l.max_gap_ms() >= 400 - 5, "{}", l.max_gap_ms());
        let expired = l.expired(&nodes, start, later);
        assert_eq!(expired.len(), 1, "{expired:?}");
        assert_eq!(expired[0].0, "never");
    }

    #[test]
    fn a_new_leader_counts_every_node_from_its_start() {
        let l = tracker();
        l.heard_from("a");
        let since = Instant::now() + Duration::from_secs(10);
        // Long silent before `since`, but the new leader only counts from `since`.
        assert!(
            l.expired(&["a".into()], since, since + Duration::from_millis(400))
                .is_empty()
        );
        assert_eq!(
            l.expired(&["a".into()], since, since + Duration::from_millis(600))
                .len(),
            1
        );
        assert!(l.last_heard_unix_ms("a") > 0);
        assert_eq!(l.last_heard_unix_ms("b"), 0);
    }
}
