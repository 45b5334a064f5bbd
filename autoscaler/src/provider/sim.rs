//! `sim`: a seeded simulated cloud in virtual time, for the simulator and for tests.
//!
//! The cloud keeps its nodes per group. A scale-up creates nodes that become Running after
//! a provisioning delay drawn uniformly from `delay_s_min..=delay_s_max`; it fails with a
//! stockout while a configured window covers the group's region (and instance type), and
//! with a quota error when the provider's live nodes would exceed `quota_nodes`. A spot
//! node draws an interruption time from an exponential distribution with
//! `spot_interruptions_per_hour`; it carries an interruption notice from 120 s before, and
//! is gone after. Prices are the node groups' own.
//!
//! Time is virtual: the owner moves the shared [`SimClock`]; nothing reads the wall clock.
//! The same seed and the same calls give the same cloud.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use berth_proto::node::CapacityType;

use super::{InstanceState, Provider, ProviderError, ProviderNode};
use crate::config::{NodeGroupConfig, SimCloudConfig};

/// Notice a spot node gets before it is taken back (AWS gives two minutes).
pub const INTERRUPTION_NOTICE_MS: u64 = 120_000;

/// Virtual time shared by a simulation and its clouds, in ms.
#[derive(Debug, Clone, Default)]
pub struct SimClock(Arc<AtomicU64>);

impl SimClock {
    /// A clock at 0.
    pub fn new() -> SimClock {
        SimClock::default()
    }

    /// Now.
    pub fn now_ms(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves time to `ms` (never backwards).
    pub fn set(&self, ms: u64) {
        self.0.fetch_max(ms, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
struct SimNode {
    id: String,
    ready_at_ms: u64,
    interrupt_at_ms: Option<u64>,
}

#[derive(Debug)]
struct Cloud {
    rng: ChaCha8Rng,
    next: u64,
    groups: BTreeMap<String, Vec<SimNode>>,
    interrupted: u64,
}

/// A simulated cloud.
#[derive(Debug)]
pub struct SimCloud {
    name: String,
    cfg: SimCloudConfig,
    clock: SimClock,
    cloud: Mutex<Cloud>,
}

impl SimCloud {
    /// A cloud named `name` (node ids start with it) on `clock`.
    pub fn new(name: &str, cfg: SimCloudConfig, clock: SimClock) -> SimCloud {
        SimCloud {
            name: name.to_owned(),
            cloud: Mutex::new(Cloud {
                rng: ChaCha8Rng::seed_from_u64(cfg.seed),
                next: 0,
                groups: BTreeMap::new(),
                interrupted: 0,
            }),
            cfg,
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cloud> {
        // A panic while holding the lock leaves plain data behind; carry on with it.
        self.cloud.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops nodes whose interruption time has passed, counting them.
    fn reap(&self, cloud: &mut Cloud, now: u64) {
        for nodes in cloud.groups.values_mut() {
            let before = nodes.len();
            nodes.retain(|n| n.interrupt_at_ms.is_none_or(|t| t > now));
            cloud.interrupted += (before - nodes.len()) as u64;
        }
    }

    /// Spot nodes taken back so far.
    pub fn interrupted(&self) -> u64 {
        self.lock().interrupted
    }

    /// Whether `group` is in a stockout window at `now`.
    pub fn stocked_out(&self, group: &NodeGroupConfig, now: u64) -> bool {
        self.cfg.stockouts.iter().any(|w| {
            w.region == group.region
                && (w.instance_type.is_empty() || w.instance_type == group.instance_type)
                && (w.start_s * 1000..w.end_s * 1000).contains(&now)
        })
    }
}

/// An exponential draw with mean `mean` from a uniform u64.
fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    -mean * (1.0 - u).ln()
}

impl SimCloud {
    /// [`Provider::scale_up`], without a runtime (the simulator calls it directly).
    pub fn scale_up_now(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError> {
        let now = self.clock.now_ms();
        if self.stocked_out(group, now) {
            return Err(ProviderError::Stockout(format!(
                "{}: no {} capacity in {}",
                self.name, group.instance_type, group.region
            )));
        }
        let mut cloud = self.lock();
        self.reap(&mut cloud, now);
        let live: usize = cloud.groups.values().map(Vec::len).sum();
        if self.cfg.quota_nodes > 0 && live + count as usize > self.cfg.quota_nodes as usize {
            return Err(ProviderError::Quota(format!(
                "{}: {live} nodes + {count} would pass the quota of {}",
                self.name, self.cfg.quota_nodes
            )));
        }
        let spread = self.cfg.delay_s_max.saturating_sub(self.cfg.delay_s_min) * 1000;
        for _ in 0..count {
            let delay = self.cfg.delay_s_min * 1000 + cloud.rng.next_u64() % (spread + 1);
            let ready_at_ms = now + delay;
            let rate = self.cfg.spot_interruptions_per_hour;
            let interrupt_at_ms = (group.capacity_type == CapacityType::Spot && rate > 0.0)
                .then(|| ready_at_ms + (exponential(&mut cloud.rng, 3_600_000.0 / rate) as u64));
            let id = format!("{}-{}-{}", self.name, group.name, cloud.next);
            cloud.next += 1;
            cloud
                .groups
                .entry(group.name.clone())
                .or_default()
                .push(SimNode {
                    id,
                    ready_at_ms,
                    interrupt_at_ms,
                });
        }
        Ok(())
    }

    /// [`Provider::remove`], without a runtime.
    pub fn remove_now(&self, group: &NodeGroupConfig, nodes: &[String]) {
        let mut cloud = self.lock();
        if let Some(list) = cloud.groups.get_mut(&group.name) {
            list.retain(|n| !nodes.contains(&n.id));
        }
    }

    /// [`Provider::list`], without a runtime.
    pub fn list_now(&self, group: &NodeGroupConfig) -> Vec<ProviderNode> {
        let now = self.clock.now_ms();
        let mut cloud = self.lock();
        self.reap(&mut cloud, now);
        cloud
            .groups
            .get(&group.name)
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| ProviderNode {
                        id: n.id.clone(),
                        state: if now >= n.ready_at_ms {
                            InstanceState::Running
                        } else {
                            InstanceState::Provisioning
                        },
                        interruption_notice: n
                            .interrupt_at_ms
                            .is_some_and(|t| now + INTERRUPTION_NOTICE_MS >= t),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[async_trait]
impl Provider for SimCloud {
    async fn scale_up(&self, group: &NodeGroupConfig, count: u32) -> Result<(), ProviderError> {
        self.scale_up_now(group, count)
    }

    async fn remove(&self, group: &NodeGroupConfig, nodes: &[String]) -> Result<(), ProviderError> {
        self.remove_now(group, nodes);
        Ok(())
    }

    async fn list(&self, group: &NodeGroupConfig) -> Result<Vec<ProviderNode>, ProviderError> {
        Ok(self.list_now(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimStockout;
    use crate::testing::h100_group;

    fn block<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(f)
    }

    #[test]
    fn delays_stockouts_quota_and_interruptions() {
        let clock = SimClock::new();
        let cfg = SimCloudConfig {
            seed: 3,
            delay_s_min: 10,
            delay_s_max: 20,
            quota_nodes: 3,
            stockouts: vec![SimStockout {
                region: "r".into(),
                instance_type: String::new(),
                start_s: 100,
                end_s: 200,
            }],
            spot_interruptions_per_hour: 60.0,
        };
        let cloud = SimCloud::new("sim", cfg.clone(), clock.clone());
        let group = h100_group("g", 0, 10, 1.0);
        block(async {
            cloud.scale_up(&group, 2).await.expect("room");
            let nodes = cloud.list(&group).await.expect("list");
            assert_eq!(nodes.len(), 2);
            assert!(nodes.iter().all(|n| n.state == InstanceState::Provisioning));
            clock.set(20_000);
            let nodes = cloud.list(&group).await.expect("list");
            assert!(
                nodes.iter().all(|n| n.state == InstanceState::Running),
                "{nodes:?}"
            );
            let err = cloud.scale_up(&group, 2).await.expect_err("quota 3");
            assert_eq!(err.class(), "quota");
            clock.set(150_000);
            let err = cloud
                .scale_up(&group, 1)
                .await
                .expect_err("stockout window");
            assert_eq!(err.class(), "stockout");
            clock.set(200_000);
            cloud.scale_up(&group, 1).await.expect("window over");
            cloud
                .remove(&group, &[nodes[0].id.clone()])
                .await
                .expect("remove");
            assert_eq!(cloud.list(&group).await.expect("list").len(), 2);

            // Spot nodes at 60 interruptions an hour are all gone within hours.
            let spot = NodeGroupConfig {
                capacity_type: CapacityType::Spot,
                ..h100_group("s", 0, 10, 1.0)
            };
            let spot_cloud = SimCloud::new(
                "spot",
                SimCloudConfig {
                    quota_nodes: 0,
                    ..cfg
                },
                clock.clone(),
            );
            spot_cloud.scale_up(&spot, 5).await.expect("room");
            let mut noticed = false;
            for t in (200..20_000).step_by(10) {
                clock.set(t * 1000);
                let nodes = spot_cloud.list(&spot).await.expect("list");
                noticed |= nodes.iter().any(|n| n.interruption_notice);
                if nodes.is_empty() {
                    break;
                }
            }
            assert!(noticed, "a notice comes before the node goes");
            assert_eq!(spot_cloud.interrupted(), 5);
        });
    }

    #[test]
    fn the_same_seed_gives_the_same_cloud() {
        let run = || {
            let clock = SimClock::new();
            let cloud = SimCloud::new(
                "sim",
                SimCloudConfig {
                    seed: 9,
                    ..SimCloudConfig::default()
                },
                clock.clone(),
            );
            let group = h100_group("g", 0, 10, 1.0);
            block(async {
                cloud.scale_up(&group, 4).await.expect("room");
                let mut ready = Vec::new();
                for t in (0..200).step_by(5) {
                    clock.set(t * 1000);
                    let running = cloud
                        .list(&group)
                        .await
                        .expect("list")
                        .iter()
                        .filter(|n| n.state == InstanceState::Running)
                        .count();
                    ready.push(running);
                }
                ready
            })
        };
        let first = run();
        assert_eq!(first, run());
        assert_eq!(first.last(), Some(&4));
        assert!(first.first() == Some(&0));
    }
}
