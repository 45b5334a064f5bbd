//! Sandbox CPU and memory use: every `[agent] usage_interval_ms`, one task reads each
//! running sandbox's cgroup counters (two file reads per sandbox, on a blocking thread, so
//! the session loop and its heartbeats never wait on them), turns CPU time into a rate over
//! the interval, sets the node totals on `/metrics`, and hands the per-sandbox figures to
//! the session loop, which sends them to the leader as one `UsageReport`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use berth_proto::pb::v1 as pb;

use crate::cgroups::{self, Hierarchy};
use crate::metrics::AgentMetrics;
use crate::monitor::Monitor;
use crate::runtime::{LocalState, Runtime, unix_ms};

/// CPU rates from successive cumulative readings.
#[derive(Debug, Default)]
pub struct Rates {
    last: HashMap<String, (u64, Instant)>,
}

impl Rates {
    /// Milli-cores since the previous reading of `id` (0 for its first), and remembers this
    /// one. Readings of sandboxes not in `seen` are forgotten by [`Rates::retain`].
    pub fn rate(&mut self, id: &str, cpu_ns: u64, at: Instant) -> u64 {
        let previous = self.last.insert(id.to_owned(), (cpu_ns, at));
        let Some((ns, then)) = previous else {
            return 0;
        };
        let wall = at.saturating_duration_since(then).as_nanos() as u64;
        if wall == 0 {
            return 0;
        }
        (u128::from(cpu_ns.saturating_sub(ns)) * 1_000 / u128::from(wall)) as u64
    }

    /// Forgets sandboxes that are gone.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.last.retain(|id, _| keep(id));
    }
}

/// Starts the sampling task; the receiver sees each interval's figures.
pub fn spawn(
    runtime: Runtime,
    monitor: &Monitor,
    metrics: Arc<AgentMetrics>,
    every: Duration,
) -> watch::Receiver<Vec<pb::SandboxUsage>> {
    let (tx, rx) = watch::channel(Vec::new());
    let Ok(hierarchy) = cgroups::detect() else {
        // Said once at start (limits are not enforced either); nothing to read. The sender
        // stays alive, so the session loop simply never hears of usage.
        tokio::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        return rx;
    };
    let snapshots = monitor.subscribe();
    tokio::spawn(async move {
        let mut rates = Rates::default();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let running: Vec<(String, String)> = snapshots
                .borrow()
                .iter()
                .filter(|(_, s)| s.started && s.state == LocalState::Running)
                .map(|(id, s)| {
                    let name = crate::shim_command::container_id(&runtime.dir(id), &s.launch);
                    (id.clone(), name)
                })
                .collect();
            let h = hierarchy.clone();
            let Ok(readings) = tokio::task::spawn_blocking(move || read_all(&h, running)).await
            else {
                continue;
            };
            let at = Instant::now();
            let sampled_unix_ms = unix_ms();
            rates.retain(|id| readings.iter().any(|(r, _, _)| r == id));
            let usage: Vec<pb::SandboxUsage> = readings
                .into_iter()
                .map(|(id, cpu_ns, memory_bytes)| pb::SandboxUsage {
                    cpu_milli: rates.rate(&id, cpu_ns, at),
                    sandbox_id: id,
                    memory_bytes,
                    sampled_unix_ms,
                })
                .collect();
            let sum = |f: fn(&pb::SandboxUsage) -> u64| usage.iter().map(f).sum::<u64>();
            metrics
                .sandbox_cpu_milli
                .set(i64::try_from(sum(|u| u.cpu_milli)).unwrap_or(i64::MAX));
            metrics
                .sandbox_memory_bytes
                .set(i64::try_from(sum(|u| u.memory_bytes)).unwrap_or(i64::MAX));
            metrics.sandboxes_sampled.set(usage.len() as i64);
            if tx.send(usage).is_err() {
                return;
            }
        }
    });
    rx
}

/// `(id, cpu ns, memory bytes)` of every sandbox whose groups can be read.
fn read_all(h: &Hierarchy, running: Vec<(String, String)>) -> Vec<(String, u64, u64)> {
    running
        .into_iter()
        .filter_map(|(id, name)| cgroups::read_usage(h, &name).map(|(c, m)| (id, c, m)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_cpu_time_over_wall_time() {
        let mut r = Rates::default();
        let t0 = Instant::now();
        assert_eq!(
            r.rate("a", 5_000_000_000, t0),
            0,
            "no rate from one reading"
        );
        // One core busy for 2 s.
        assert_eq!(
            r.rate("a", 7_000_000_000, t0 + Duration::from_secs(2)),
            1_000
        );
        // Half a core.
        assert_eq!(r.rate("a", 8_000_000_000, t0 + Duration::from_secs(4)), 500);
        // A counter that went backwards (a new group of the same name) reads as idle.
        assert_eq!(r.rate("a", 1, t0 + Duration::from_secs(6)), 0);
        r.retain(|id| id != "a");
        assert_eq!(r.rate("a", 9, t0 + Duration::from_secs(8)), 0, "forgotten");
    }
}
