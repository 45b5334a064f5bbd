//! A deterministic cluster harness: N real replicas (raft-rs, the state machine, the
//! leader's batched placement) over a simulated network and simulated disks, in virtual
//! time, with every random choice drawn from one seed.
//!
//! The network drops, delays, duplicates and reorders messages, partitions the cluster and
//! isolates replicas; replicas crash and restart, and a crash can land in the middle of a
//! disk write, which then leaves nothing (a write not yet synced). Clients create and delete
//! sandboxes all along, retry with the same request id, and follow leader hints.
//!
//! Checkers, run after the faults heal:
//! - no acknowledged create is lost: every replica holds it under its original id;
//! - no resource is double-allocated: the invariant catalog holds on every replica
//!   (checked during the run too);
//! - replicas converge: identical state bytes at the same applied index;
//! - progress resumes: a create is acknowledged within a deadline after healing.
//!
//! raft-rs draws election timeouts from the thread RNG; the harness pins each replica's
//! timeout to a value drawn from the seed at every start, so a seed replays exactly.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;

use berth_proto::GpuModel;
use raft::eraftpb::Message;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::log_store::{DiskImage, MemDisk};
use super::replica::{Applied, ProposeError, Replica, ReplicaConfig};
use super::{ProposalId, slog_bridge};
use crate::invariants;
use crate::model::SandboxId;
use crate::state::Submission;
use crate::state::{Command, ItemOutcome};
use crate::testing;

/// Shape of one chaos run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Replicas (3 or 5).
    pub replicas: usize,
    /// Virtual milliseconds of faults and load.
    pub fault_ms: u64,
    /// Virtual milliseconds after healing in which progress must resume and replicas converge.
    pub heal_deadline_ms: u64,
    /// Length of a Raft tick.
    pub tick_ms: u64,
    /// GPU nodes registered at the start.
    pub nodes: usize,
    /// Probability that a message is dropped while faults are on.
    pub drop_probability: f64,
    /// Probability that a message is delivered twice.
    pub duplicate_probability: f64,
    /// Largest one-way delay.
    pub max_delay_ms: u64,
    /// Mean virtual time between faults.
    pub mean_fault_interval_ms: u64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            replicas: 3,
            fault_ms: 12_000,
            heal_deadline_ms: 10_000,
            tick_ms: 10,
            nodes: 6,
            drop_probability: 0.05,
            duplicate_probability: 0.02,
            max_delay_ms: 25,
            mean_fault_interval_ms: 1_500,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Creates acknowledged to clients.
    pub acked_creates: u64,
    /// Deletes acknowledged.
    pub acked_deletes: u64,
    /// Proposals dropped (clients retried them).
    pub dropped_proposals: u64,
    /// Crashes injected (including mid-write ones).
    pub crashes: u64,
    /// Writes lost to a crash before sync.
    pub lost_writes: u64,
    /// Partitions and isolations injected.
    pub partitions: u64,
    /// Messages dropped.
    pub messages_dropped: u64,
    /// Leader elections observed (summed over replicas).
    pub leader_changes: u64,
    /// Applied index the replicas converged on.
    pub final_applied: u64,
    /// Virtual ms from healing to the first acknowledged create.
    pub recovery_ms: Option<u64>,
    /// Hash of everything that happened, for replay checks.
    pub trace_hash: u64,
    /// Broken properties; empty on success.
    pub violations: Vec<String>,
}

impl ChaosReport {
    /// One line for logs; a failure says how to replay it.
    pub fn summary(&self) -> String {
        let verdict = if self.violations.is_empty() {
            "ok".to_owned()
        } else {
            format!("FAILED SEED={} {:?}", self.seed, self.violations)
        };
        format!(
            "seed {}: {} acked creates, {} deletes, {} crashes ({} lost writes), {} partitions, \
             {} elections, applied {}, recovery {:?} ms: {verdict}",
            self.seed,
            self.acked_creates,
            self.acked_deletes,
            self.crashes,
            self.lost_writes,
            self.partitions,
            self.leader_changes,
            self.final_applied,
            self.recovery_ms,
        )
    }
}

/// A client request in flight or waiting to be retried.
#[derive(Debug, Clone)]
enum Request {
    Create(Vec<(String, usize)>),
    Delete(Vec<SandboxId>),
}

struct Slot {
    replica: Option<Replica<MemDisk>>,
    image: Rc<RefCell<DiskImage>>,
    crash_next_write: Rc<Cell<bool>>,
    restart_at: Option<u64>,
    incarnation: u64,
    tick_offset: u64,
}

mod clients;
mod network;

struct Sim {
    cfg: ChaosConfig,
    rng: ChaCha8Rng,
    now: u64,
    slots: Vec<Slot>,
    founders: BTreeMap<u64, String>,
    network: BinaryHeap<Reverse<(u64, u64, u64)>>,
    in_transit: BTreeMap<u64, Message>,
    next_msg: u64,
    /// Replica id → partition group; messages cross groups only when equal.
    group: BTreeMap<u64, u32>,
    heal_at: u64,
    faults_on: bool,
    leader_hint: u64,
    /// Proposal → request, per proposer.
    in_flight: BTreeMap<ProposalId, Request>,
    retry: Vec<Request>,
    next_request: u64,
    specs: Vec<crate::model::SandboxSpec>,
    acked: BTreeMap<String, SandboxId>,
    deleted: BTreeSet<SandboxId>,
    delete_in_flight: BTreeSet<SandboxId>,
    report: ChaosReport,
    first_ack_after_heal: Option<u64>,
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Sim {
    fn new(seed: u64, cfg: ChaosConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let founders: BTreeMap<u64, String> = (1..=cfg.replicas as u64)
            .map(|id| (id, format!("sim-replica-{id}")))
            .collect();
        let slots = (0..cfg.replicas)
            .map(|_| Slot {
                replica: None,
                image: Rc::new(RefCell::new(DiskImage::default())),
                crash_next_write: Rc::new(Cell::new(false)),
                restart_at: Some(0),
                incarnation: 0,
                tick_offset: rng.next_u64() % cfg.tick_ms,
            })
            .collect();
        let specs = vec![
            testing::spec(&["H100"]),
            testing::spec(&["H100:2"]),
            testing::spec(&["A100-80GB|H100"]),
            testing::spec(&["T4:500m"]),
            testing::spec(&[]),
        ];
        Sim {
            heal_at: cfg.fault_ms,
            cfg,
            rng,
            now: 0,
            slots,
            founders,
            network: BinaryHeap::new(),
            in_transit: BTreeMap::new(),
            next_msg: 0,
            group: BTreeMap::new(),
            faults_on: true,
            leader_hint: 0,
            in_flight: BTreeMap::new(),
            retry: Vec::new(),
            next_request: 0,
            specs,
            acked: BTreeMap::new(),
            deleted: BTreeSet::new(),
            delete_in_flight: BTreeSet::new(),
            report: ChaosReport {
                seed,
                trace_hash: 0xcbf2_9ce4_8422_2325,
                ..Default::default()
            },
            first_ack_after_heal: None,
        }
    }

    fn trace(&mut self, values: &[u64]) {
        for v in values {
            self.report.trace_hash = (self.report.trace_hash ^ v).wrapping_mul(FNV_PRIME);
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn start(&mut self, i: usize) {
        let timeout = 10 + self.below(10) as usize;
        let slot = &mut self.slots[i];
        slot.incarnation += 1;
        let mut cfg = ReplicaConfig::new(i as u64 + 1);
        cfg.election_tick = 10;
        cfg.heartbeat_tick = 2;
        cfg.fixed_election_timeout = Some(timeout);
        cfg.snapshot_every_entries = 150;
        cfg.keep_entries_after_snapshot = 40;
        cfg.max_inflight_msgs = 32;
        cfg.placement_seed = 7;
        let disk = MemDisk::new(slot.image.clone(), slot.crash_next_write.clone());
        match Replica::open(
            cfg,
            disk,
            &self.founders,
            true,
            slot.incarnation,
            &slog_bridge::discard(),
        ) {
            Ok(r) => {
                slot.replica = Some(r);
                slot.restart_at = None;
            }
            Err(e) => self
                .report
                .violations
                .push(format!("replica {} failed to restart: {e}", i + 1)),
        }
        self.trace(&[1, i as u64, timeout as u64]);
    }

    fn crash(&mut self, i: usize, restart_after: u64) {
        let at = self.now + restart_after;
        let slot = &mut self.slots[i];
        if slot.replica.take().is_some() {
            self.report.crashes += 1;
            slot.restart_at = Some(at);
            slot.crash_next_write.set(false);
            // Its clients see the connection drop and retry elsewhere.
            let id = i as u64 + 1;
            let lost: Vec<ProposalId> = self
                .in_flight
                .keys()
                .filter(|p| p.replica == id)
                .copied()
                .collect();
            for p in lost {
                if let Some(r) = self.in_flight.remove(&p) {
                    self.retry.push(r);
                }
            }
            self.trace(&[2, i as u64]);
        }
    }

    fn step_replicas(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(at) = self.slots[i].restart_at {
                if at <= self.now {
                    self.start(i);
                }
            }
            let tick = (self.now + self.slots[i].tick_offset) % self.cfg.tick_ms == 0;
            let now = self.now;
            let Some(replica) = self.slots[i].replica.as_mut() else {
                continue;
            };
            if tick {
                replica.tick();
                if now % 50 == 0 {
                    let _ = replica.schedule_pending(now);
                }
            }
            let result = replica.handle_ready();
            let applied = replica.applied();
            match result {
                Ok(out) => {
                    if out.became_leader {
                        self.leader_hint = i as u64 + 1;
                    }
                    self.trace(&[5, i as u64, out.entries_applied, applied]);
                    for m in out.messages {
                        self.send(m);
                    }
                    for p in out.dropped {
                        self.report.dropped_proposals += 1;
                        if let Some(r) = self.in_flight.remove(&p) {
                            self.retry.push(r);
                        }
                    }
                    for (p, applied) in out.applied {
                        self.on_applied(p, applied);
                    }
                }
                Err(_) => {
                    let after = 100 + self.below(1_000);
                    self.crash(i, after);
                }
            }
        }
    }

    fn register_nodes(&mut self) -> bool {
        let Some(leader) = self
            .slots
            .iter_mut()
            .filter_map(|s| s.replica.as_mut())
            .find(|r| r.is_leader())
        else {
            return false;
        };
        let models = [GpuModel::H100, GpuModel::A100_80GB, GpuModel::T4];
        for n in 0..self.cfg.nodes {
            let model = models[n % models.len()];
            let spec = testing::gpu_node(&format!("node-{n}"), model, 4);
            if leader
                .propose(Command::RegisterNode { spec }, self.now)
                .is_err()
            {
                return false;
            }
        }
        true
    }

    fn check_invariants(&mut self, when: &str) {
        for slot in &self.slots {
            if let Some(r) = &slot.replica {
                let violations = invariants::check(r.state());
                if let Some(v) = violations.first() {
                    self.report.violations.push(format!(
                        "{when}: replica {} breaks an invariant: {v}",
                        r.id()
                    ));
                }
            }
        }
    }

    fn check_views(&mut self) {
        for slot in &self.slots {
            if let Some(r) = &slot.replica {
                if r.view_is_consistent() == Some(false) {
                    self.report.violations.push(format!(
                        "replica {}: the leader's placement view drifted from the state",
                        r.id()
                    ));
                }
            }
        }
    }

    fn run(mut self) -> ChaosReport {
        let mut registered = false;
        let mut next_fault = 1_000 + self.below(self.cfg.mean_fault_interval_ms);
        let end = self.heal_at + self.cfg.heal_deadline_ms;
        while self.now < end {
            self.now += 1;
            self.deliver();
            self.step_replicas();
            if !registered && self.now % 20 == 0 {
                registered = self.register_nodes();
            }
            if self.now == self.heal_at {
                self.faults_on = false;
                self.group.clear();
                for i in 0..self.slots.len() {
                    self.slots[i].crash_next_write.set(false);
                    if self.slots[i].replica.is_none() {
                        self.slots[i].restart_at = Some(self.now);
                    }
                }
            }
            if self.faults_on && self.now >= next_fault {
                self.inject_fault();
                next_fault = self.now + 1 + self.below(2 * self.cfg.mean_fault_interval_ms);
            }
            if registered && self.now % 7 == 0 && self.in_flight.len() < 8 {
                if let Some(r) = self.client_request() {
                    self.submit(r);
                }
            }
            if self.now % 500 == 0 {
                self.check_invariants("during the run");
                self.check_views();
            }
            if !self.faults_on && self.first_ack_after_heal.is_some() && self.converged() {
                break;
            }
        }
        self.finish()
    }

    fn converged(&self) -> bool {
        let applied: BTreeSet<u64> = self
            .slots
            .iter()
            .map(|s| s.replica.as_ref().map_or(0, |r| r.applied()))
            .collect();
        applied.len() == 1
            && self.in_flight.is_empty()
            && self.retry.is_empty()
            && self.slots.iter().all(|s| {
                s.replica
                    .as_ref()
                    .is_some_and(|r| r.status().commit == r.applied())
            })
    }

    fn finish(mut self) -> ChaosReport {
        self.check_invariants("after healing");
        self.report.recovery_ms = self.first_ack_after_heal.map(|t| t - self.heal_at);
        if self.first_ack_after_heal.is_none() {
            self.report.violations.push(format!(
                "no create was acknowledged within {} ms of healing",
                self.cfg.heal_deadline_ms
            ));
        }
        if !self.converged() {
            let applied: Vec<u64> = self
                .slots
                .iter()
                .map(|s| s.replica.as_ref().map_or(0, |r| r.applied()))
                .collect();
            self.report.violations.push(format!(
                "replicas did not converge within {} ms of healing: applied {applied:?}, {} \
                 requests outstanding",
                self.cfg.heal_deadline_ms,
                self.in_flight.len() + self.retry.len()
            ));
        }
        let mut hashes = BTreeSet::new();
        for slot in &self.slots {
            let Some(r) = &slot.replica else { continue };
            self.report.leader_changes += r.leader_changes();
            self.report.final_applied = self.report.final_applied.max(r.applied());
            hashes.insert(fnv(&r.state().snapshot()));
            for (rid, id) in &self.acked {
                if self.deleted.contains(id) {
                    continue;
                }
                let found = r.state().by_request_id("t", rid);
                if found != Some(*id) {
                    self.report.violations.push(format!(
                        "acknowledged create {rid} ({id}) is {} on replica {}",
                        found.map_or("missing".to_owned(), |f| format!("{f}")),
                        r.id()
                    ));
                }
            }
        }
        if hashes.len() > 1 {
            self.report
                .violations
                .push(format!("replicas hold {} different states", hashes.len()));
        }
        self.report.lost_writes = self
            .slots
            .iter()
            .map(|s| s.image.borrow().lost_writes)
            .sum();
        self.report.violations.truncate(10);
        self.report
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
    })
}

/// Runs one seed.
pub fn run(seed: u64, cfg: &ChaosConfig) -> ChaosReport {
    Sim::new(seed, cfg.clone()).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds run on every `scripts/test`; `berth sim chaos --seeds N` runs more.
    const SEEDS: u64 = 200;

    #[test]
    fn chaos_seeds_keep_every_acknowledged_create_and_converge() {
        let cfg = ChaosConfig::default();
        let mut failures = Vec::new();
        let mut acked = 0;
        let mut crashes = 0;
        let mut lost = 0;
        for seed in 0..SEEDS {
            let report = run(seed, &cfg);
            acked += report.acked_creates;
            crashes += report.crashes;
            lost += report.lost_writes;
            if !report.violations.is_empty() {
                failures.push(report.summary());
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        // The runs must have exercised something.
        assert!(acked > SEEDS * 50, "only {acked} creates acknowledged");
        assert!(crashes > SEEDS, "only {crashes} crashes");
        assert!(lost > 0, "no crash landed in a write");
    }

    #[test]
    fn a_seed_replays_exactly() {
        let cfg = ChaosConfig::default();
        let a = run(4242, &cfg);
        let b = run(4242, &cfg);
        assert_eq!(a, b);
        let c = run(4243, &cfg);
        assert_ne!(a.trace_hash, c.trace_hash);
    }

    #[test]
    fn five_replicas_survive_chaos_too() {
        let cfg = ChaosConfig {
            replicas: 5,
            ..ChaosConfig::default()
        };
        for seed in 0..10 {
            let report = run(seed, &cfg);
            assert!(report.violations.is_empty(), "{}", report.summary());
        }
    }
}
