//! What `berth fleet-emulator` counts and reports, one JSON line per interval, and how
//! `berth bench fleet` reads it back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Counters shared by every emulated agent.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Agents with a registered stream now.
    pub(crate) connected: AtomicU64,
    /// Registrations answered (first ones and re-registrations).
    pub(crate) registrations: AtomicU64,
    /// Sessions that ended (then reconnected).
    pub(crate) reconnects: AtomicU64,
    /// Assignments received.
    pub(crate) assignments: AtomicU64,
    /// Assignments of a sandbox bound to another node.
    pub(crate) misdelivered: AtomicU64,
    /// Terminations received.
    pub(crate) terminations: AtomicU64,
    /// Heartbeats sent.
    pub(crate) heartbeats: AtomicU64,
    /// Sandboxes reported Exited on their own.
    pub(crate) exits: AtomicU64,
}

/// Latencies in whole milliseconds, 0..=60,000 (longer ones count as 60,000).
#[derive(Debug)]
pub(crate) struct Histogram {
    total: Vec<AtomicU64>,
    window: Vec<AtomicU64>,
}

const BUCKETS: usize = 60_001;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            total: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            window: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    /// Records one latency.
    pub(crate) fn record(&self, ms: u64) {
        let i = (ms as usize).min(BUCKETS - 1);
        self.total[i].fetch_add(1, Ordering::Relaxed);
        self.window[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Percentiles of a set of bucket counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct Percentiles {
    /// Samples.
    pub(crate) count: u64,
    /// Median, ms.
    pub p50_ms: u64,
    /// 99th percentile, ms.
    pub p99_ms: u64,
    /// Largest, ms.
    pub(crate) max_ms: u64,
}

/// A span of report lines merged: the latencies of every line added.
#[derive(Debug, Default)]
pub(crate) struct Span(Vec<u64>);

impl Span {
    /// Adds one line's window.
    pub(crate) fn add(&mut self, r: &Report) {
        if self.0.is_empty() {
            self.0 = vec![0; BUCKETS];
        }
        for (ms, c) in &r.window_buckets {
            if let Some(b) = self.0.get_mut(*ms as usize) {
                *b += c;
            }
        }
    }

    /// The percentiles of the span.
    pub(crate) fn percentiles(&self) -> Percentiles {
        percentiles(&self.0)
    }
}

fn percentiles(counts: &[u64]) -> Percentiles {
    let count: u64 = counts.iter().sum();
    let at = |q: f64| -> u64 {
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return ms as u64;
            }
        }
        0
    };
    if count == 0 {
        return Percentiles::default();
    }
    Percentiles {
        count,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: counts.iter().rposition(|c| *c > 0).unwrap_or(0) as u64,
    }
}

/// One report line.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Report {
    /// Since the emulator started.
    pub(crate) elapsed_ms: u64,
    pub(crate) connected: u64,
    pub(crate) registrations: u64,
    pub(crate) reconnects: u64,
    pub(crate) assignments: u64,
    pub(crate) misdelivered: u64,
    pub(crate) terminations: u64,
    pub(crate) heartbeats: u64,
    pub(crate) exits: u64,
    /// Create → assignment at the agent, since the start.
    pub(crate) latency: Percentiles,
    /// The same over this line's interval only.
    pub(crate) window: Percentiles,
    /// This interval's latencies as (ms, count), so a reader can merge any span exactly.
    #[serde(default)]
    pub(crate) window_buckets: Vec<(u32, u64)>,
}

impl Report {
    /// Reads the counters, and takes (empties) the latency window.
    pub(crate) fn take(c: &Counters, h: &Histogram, elapsed: Duration) -> Report {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let total: Vec<u64> = h.total.iter().map(get).collect();
        let window: Vec<u64> = h
            .window
            .iter()
            .map(|a| a.swap(0, Ordering::Relaxed))
            .collect();
        Report {
            elapsed_ms: elapsed.as_millis() as u64,
            connected: get(&c.connected),
            registrations: get(&c.registrations),
            reconnects: get(&c.reconnects),
            assignments: get(&c.assignments),
            misdelivered: get(&c.misdelivered),
            terminations: get(&c.terminations),
            heartbeats: get(&c.heartbeats),
            exits: get(&c.exits),
            latency: percentiles(&total),
            window: percentiles(&window),
            window_buckets: window
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(ms, c)| (ms as u32, *c))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_buckets_and_the_window_empties() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(ms);
        }
        h.record(1_000_000);
        let r = Report::take(&Counters::default(), &h, Duration::ZERO);
        assert_eq!(r.latency.count, 101);
        assert_eq!(r.latency.p50_ms, 51);
        assert_eq!(r.latency.p99_ms, 100);
        assert_eq!(r.latency.max_ms, 60_000);
        assert_eq!(r.window, r.latency);
        let mut span = Span::default();
        span.add(&r);
        span.add(&r);
        assert_eq!(span.percentiles().count, 202);
        assert_eq!(span.percentiles().p99_ms, 100);
        let again = Report::take(&Counters::default(), &h, Duration::ZERO);
        assert_eq!(again.window.count, 0);
        assert_eq!(again.latency.count, 101);
    }
}
