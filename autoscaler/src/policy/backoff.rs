//! How long a node group backs off after a failed scale-up: `initial_s` doubling per
//! consecutive failure up to `max_s`; a permanent error waits the whole `max_s`.

use crate::config::BackoffConfig;

/// The wait, in ms, after the `failures`-th consecutive failure (1 = the first).
pub fn backoff_ms(cfg: &BackoffConfig, failures: u32, permanent: bool) -> u64 {
    let initial = cfg.initial_s.saturating_mul(1000);
    let max = cfg.max_s.saturating_mul(1000);
    if permanent {
        return max;
    }
    let doublings = failures.saturating_sub(1).min(20);
    initial.saturating_mul(1u64 << doublings).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling() {
        let cfg = BackoffConfig {
            initial_s: 30,
            max_s: 100,
        };
        let waits: Vec<u64> = (1..=4).map(|f| backoff_ms(&cfg, f, false)).collect();
        assert_eq!(waits, [30_000, 60_000, 100_000, 100_000]);
        assert_eq!(backoff_ms(&cfg, 1, true), 100_000);
        assert_eq!(backoff_ms(&cfg, u32::MAX, false), 100_000);
    }
}
