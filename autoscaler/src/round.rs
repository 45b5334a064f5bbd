//! The part of an autoscaler round that the controller and the simulator share: decide,
//! carry out the scale-ups, and after a refused one back the group off and decide again,
//! so demand fails over within the round.
//!
//! The scale-up call is passed in: the controller's goes to a provider over the network,
//! the simulator's to a simulated cloud that answers at once.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Instant;

use crate::config::{AutoscalerConfig, NodeGroupConfig};
use crate::policy::backoff::backoff_ms;
use crate::policy::decide::{
    Cause, Decision, ExistingNode, GroupStatus, Input, PendingSandbox, Policy,
};
use crate::provider::ProviderError;

#[derive(Debug, Clone)]
struct Backoff {
    until_ms: u64,
    failures: u32,
    error: String,
}

/// What the autoscaler remembers between rounds: group backoffs, recent requests (the
/// per-minute cap) and the placer's seed.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    backoff: BTreeMap<String, Backoff>,
    requested: VecDeque<(u64, u32)>,
    seed: u64,
}

/// One scale-up the round tried.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// The provider took it.
    Granted {
        /// Group.
        group: String,
        /// Nodes asked for.
        nodes: u32,
        /// The policy's reason.
        reason: String,
        /// Nodes per cause.
        causes: BTreeMap<Cause, u32>,
    },
    /// The provider refused; the group backs off until `until_ms`.
    Refused {
        /// Group.
        group: String,
        /// Nodes asked for.
        nodes: u32,
        /// Why.
        error: ProviderError,
        /// End of the backoff.
        until_ms: u64,
    },
}

impl Memory {
    /// Nothing remembered.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Nothing remembered; the placer's tie-breaks start from `seed`.
    pub fn with_seed(seed: u64) -> Memory {
        Memory {
            seed,
            ..Memory::default()
        }
    }

    /// Backs `group` off after `error` at `now_ms`; returns until when.
    pub fn back_off(
        &mut self,
        cfg: &AutoscalerConfig,
        group: &str,
        error: &ProviderError,
        now_ms: u64,
    ) -> u64 {
        let entry = self.backoff.entry(group.to_owned()).or_insert(Backoff {
            until_ms: 0,
            failures: 0,
            error: String::new(),
        });
        entry.failures = entry.failures.saturating_add(1);
        let wait = backoff_ms(
            &cfg.backoff,
            entry.failures,
            matches!(error, ProviderError::Permanent(_)),
        );
        entry.until_ms = now_ms.saturating_add(wait);
        entry.error = error.to_string();
        entry.until_ms
    }

    /// Fills each group's backoff into `status`.
    pub fn apply_backoffs(&self, status: &mut BTreeMap<String, GroupStatus>) {
        for (group, b) in &self.backoff {
            if let Some(s) = status.get_mut(group) {
                s.backoff_until_ms = s.backoff_until_ms.max(b.until_ms);
                s.last_error = Some(b.error.clone());
            }
        }
    }

    /// Groups backing off at `now_ms`.
    pub fn backing_off(&self, now_ms: u64) -> usize {
        self.backoff
            .values()
            .filter(|b| b.until_ms > now_ms)
            .count()
    }

    /// Decides, carries out the scale-ups with `scale_up`, and after a refusal backs the
    /// group off and decides again (at most once per group, plus one). `status` must hold
    /// every group, with in-flight counts; it is updated as nodes are asked for. Returns
    /// the last decision, every attempt in order, and the last decision's time in ms.
    #[allow(clippy::too_many_arguments)]
    pub async fn decide_and_scale<F, Fut>(
        &mut self,
        policy: &Policy,
        now_ms: u64,
        pending: &[PendingSandbox],
        nodes: &[ExistingNode],
        status: &mut BTreeMap<String, GroupStatus>,
        mut scale_up: F,
    ) -> (Decision, Vec<Attempt>, f64)
    where
        F: FnMut(NodeGroupConfig, u32) -> Fut,
        Fut: Future<Output = Result<(), ProviderError>>,
    {
        let cfg = policy.config();
        self.apply_backoffs(status);
        let mut attempts = Vec::new();
        let mut decision = Decision::default();
        let mut decide_ms = 0.0;
        for _ in 0..=cfg.node_groups.len() {
            self.requested
                .retain(|(t, _)| now_ms.saturating_sub(*t) < 60_000);
            self.seed = self.seed.wrapping_add(1);
            let started = Instant::now();
            decision = policy.decide(&Input {
                now_ms,
                seed: self.seed,
                pending,
                nodes,
                groups: status,
                requested_last_minute: self.requested.iter().map(|(_, n)| *n).sum(),
            });
            decide_ms = started.elapsed().as_secs_f64() * 1000.0;
            let mut refused = false;
            for up in &decision.scale_up {
                let Some(group) = cfg.node_groups.iter().find(|g| g.name == up.group) else {
                    continue;
                };
                match scale_up(group.clone(), up.nodes).await {
                    Ok(()) => {
                        self.backoff.remove(&group.name);
                        self.requested.push_back((now_ms, up.nodes));
                        if let Some(s) = status.get_mut(&group.name) {
                            s.in_flight += up.nodes;
                        }
                        attempts.push(Attempt::Granted {
                            group: group.name.clone(),
                            nodes: up.nodes,
                            reason: up.reason.clone(),
                            causes: up.causes.clone(),
                        });
                    }
                    Err(error) => {
                        let until_ms = self.back_off(cfg, &group.name, &error, now_ms);
                        if let Some(s) = status.get_mut(&group.name) {
                            s.backoff_until_ms = until_ms;
                            s.last_error = Some(error.to_string());
                        }
                        attempts.push(Attempt::Refused {
                            group: group.name.clone(),
                            nodes: up.nodes,
                            error,
                            until_ms,
                        });
                        refused = true;
                        break;
                    }
                }
            }
            if !refused {
                break;
            }
        }
        (decision, attempts, decide_ms)
    }
}

/// Runs a future that completes without waiting (the simulator's clouds answer at once).
/// Returns `None` if it would wait.
pub fn now_or_never<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}
