//! The discrete-event simulator behind `berth sim run`: the real placement engine
//! ([`Placer`] on a [`ClusterView`]) and the real autoscaler policy ([`Policy::decide`])
//! with `sim` clouds ([`SimCloud`]), in virtual time.
//!
//! Events, in time order (departures, then arrivals, then the autoscaler, at equal times):
//! - an arrival is placed at once when it fits, else it waits in a queue per spec;
//! - a departure frees its resources; waiting sandboxes are retried at most once per
//!   virtual second while something has freed up (the scheduler's retry loop);
//! - every `interval_ms` the autoscaler round runs as `berth autoscaler` does: nodes that
//!   the clouds report Running join the pool, spot nodes with a notice are cordoned and
//!   interrupted ones leave (their sandboxes fail), the policy decides, scale-ups go to the
//!   clouds (a stockout or quota error backs the group off and the policy decides again in
//!   the same round), and idle nodes are released.
//!
//! Nothing reads the wall clock or a global RNG: the same scenario and seed give the same
//! run, byte for byte.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

use berth_autoscaler::config::{NodeGroupConfig, ProviderConfig};
use berth_autoscaler::policy::decide::{
    ExistingNode, GroupStatus, PendingSandbox, Policy, fit_on_template, planning_placer, template,
};
use berth_autoscaler::provider::sim::{SimClock, SimCloud};
use berth_autoscaler::provider::{InstanceState, ProviderError};
use berth_autoscaler::round::{Attempt, Memory, now_or_never};
use berth_core::model::{NodeSpec, Placement, SandboxId, SandboxSpec};
use berth_core::placement::fragmentation::TypicalWorkload;
use berth_core::placement::view::ClusterView;
use berth_core::placement::{Placer, PlacerConfig};
use berth_proto::gpu::GPU_MILLI_PER_GPU;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use crate::scenario::{Scenario, WorkloadKind, arrivals, mix_spec};

/// How often waiting sandboxes are retried while resources free up (virtual ms).
const RETRY_MS: u64 = 1_000;

/// One arrival: when, for how long, which spec.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Arrival time, ms.
    pub at_ms: u64,
    /// Run time once started, ms.
    pub duration_ms: u64,
    /// Index into the spec table.
    pub spec: u32,
}

/// A workload: distinct specs and the arrivals that use them.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Specs.
    pub specs: Vec<SandboxSpec>,
    /// Arrivals in time order.
    pub arrivals: Vec<Arrival>,
}

/// Builds the scenario's workload for `seed`.
pub fn workload(scenario: &Scenario, seed: u64) -> Result<Workload, String> {
    let duration_ms = (scenario.scenario.duration_h * 3_600_000.0) as u64;
    let w = &scenario.workload;
    if w.kind == WorkloadKind::Openb {
        let path = w
            .pods
            .as_ref()
            .ok_or("workload.pods: an openb workload needs it")?;
        let pods = crate::openb::trace::load_pods(path).map_err(|e| e.to_string())?;
        let mut index: HashMap<SandboxSpec, u32> = HashMap::new();
        let mut specs = Vec::new();
        let mut out = Vec::new();
        for pod in pods {
            let at = (pod.created_s as f64 * 1000.0 / w.time_compression) as u64;
            if at >= duration_ms {
                continue;
            }
            let run = ((pod.deleted_s - pod.created_s) as f64 * 1000.0 / w.time_compression) as u64;
            let next = specs.len() as u32;
            let i = *index.entry(pod.spec.clone()).or_insert(next);
            if i == next {
                specs.push(pod.spec);
            }
            out.push(Arrival {
                at_ms: at,
                duration_ms: run.max(1),
                spec: i,
            });
        }
        out.sort_by_key(|a| (a.at_ms, a.spec));
        return Ok(Workload {
            specs,
            arrivals: out,
        });
    }
    let specs = w.mix.iter().map(mix_spec).collect();
    let arrivals = arrivals(w, duration_ms, seed)
        .into_iter()
        .map(|(at_ms, duration_ms, spec)| Arrival {
            at_ms,
            duration_ms,
            spec: spec as u32,
        })
        .collect();
    Ok(Workload { specs, arrivals })
}

/// One row of the time series.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Simulated hours.
    pub t_h: f64,
    /// Waiting sandboxes.
    pub pending: u64,
    /// Running sandboxes.
    pub running: u64,
    /// Nodes per group (running or provisioning), in config order.
    pub nodes: Vec<u32>,
    /// GPU milli allocated over GPU milli of the pool, %.
    pub gpu_alloc_pct: f64,
    /// $/hour of the nodes the clouds have.
    pub usd_per_hour: f64,
}

/// The figures `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Simulated hours.
    pub simulated_hours: f64,
    /// Most sandboxes running at once.
    pub peak_concurrent_sandboxes: u64,
    /// Wait from arrival to start, median, s.
    pub wait_p50_s: f64,
    /// 99th percentile, s.
    pub wait_p99_s: f64,
    /// Longest, s.
    pub wait_max_s: f64,
    /// Sandboxes that arrived.
    pub sandboxes_arrived: u64,
    /// Sandboxes that started.
    pub sandboxes_placed: u64,
    /// Sandboxes that ran to the end of their time.
    pub sandboxes_finished: u64,
    /// Sandboxes that failed, by reason.
    pub sandboxes_failed: BTreeMap<String, u64>,
    /// Sandboxes still waiting at the end, by the autoscaler's reason.
    pub unplaceable: BTreeMap<String, u64>,
    /// Time-averaged GPU allocation per model, %.
    pub gpu_allocation_pct_by_model: BTreeMap<String, f64>,
    /// Time-averaged share of GPU capacity left free on partly used GPUs, %.
    pub fragmentation_pct: f64,
    /// Most nodes at once.
    pub peak_nodes: u64,
    /// Node-hours per group.
    pub node_hours_by_group: BTreeMap<String, f64>,
    /// Dollars per group.
    pub cost_by_group_usd: BTreeMap<String, f64>,
    /// Dollars in all.
    pub cost_usd: f64,
    /// Each sandbox's run time at the cheapest price per slot of any group that can run it.
    pub cost_lower_bound_usd: f64,
    /// `cost_usd / cost_lower_bound_usd`.
    pub cost_over_lower_bound: f64,
    /// Scale-ups refused for a stockout.
    pub stockouts: u64,
    /// Scale-ups refused for a quota.
    pub quota_errors: u64,
    /// Scale-up calls that succeeded, and the nodes they asked for.
    pub scale_up_events: u64,
    /// Nodes asked for.
    pub scale_up_nodes: u64,
    /// Nodes released as idle.
    pub scale_down_nodes: u64,
    /// Spot nodes taken back.
    pub spot_interruptions: u64,
}

/// A whole run.
#[derive(Debug, Clone)]
pub struct Run {
    /// Headline figures.
    pub summary: Summary,
    /// Time series.
    pub series: Vec<Sample>,
    /// Group names, the order of `Sample::nodes`.
    pub groups: Vec<String>,
}

struct Node {
    group: usize,
    sandboxes: u32,
    idle_since: u64,
    cordoned: bool,
}

struct Sim<'a> {
    scenario: &'a Scenario,
    work: &'a Workload,
    placer: Placer,
    policy: Policy,
    clock: SimClock,
    clouds: BTreeMap<String, SimCloud>,
    view: ClusterView,
    nodes: BTreeMap<String, Node>,
    running: BinaryHeap<Reverse<(u64, u32)>>,
    placements: HashMap<u32, Placement>,
    waiting: BTreeMap<u32, VecDeque<u32>>,
    waiting_count: u64,
    arrived_at: Vec<u64>,
    waits_ms: Vec<u64>,
    rng: ChaCha8Rng,
    memory: Memory,
    dirty: bool,
    s: Summary,
    slot_price: Vec<f64>,
    alloc_sum: BTreeMap<String, f64>,
    frag_sum: f64,
    samples: u64,
}

/// Runs a scenario. `progress` gets the simulated fraction now and then.
pub fn run(scenario: &Scenario, seed: u64, progress: &mut dyn FnMut(f64)) -> Result<Run, String> {
    let work = workload(scenario, seed)?;
    let clock = SimClock::new();
    let clouds = scenario
        .autoscaler
        .providers
        .iter()
        .filter_map(|(name, p)| match p {
            ProviderConfig::Sim(cfg) => {
                let mut cfg = cfg.clone();
                cfg.seed ^= seed;
                Some((name.clone(), SimCloud::new(name, cfg, clock.clone())))
            }
            _ => None,
        })
        .collect();
    let policy = Policy::new(scenario.autoscaler.clone(), planning_placer());
    let placer = Placer::new(
        PlacerConfig::default(),
        TypicalWorkload::from_specs(&work.specs),
    );
    let slot_price = work
        .specs
        .iter()
        .map(|spec| cheapest_slot(&scenario.autoscaler.node_groups, spec))
        .collect();
    let sim = Sim {
        scenario,
        work: &work,
        placer,
        policy,
        clock,
        clouds,
        view: ClusterView::new(),
        nodes: BTreeMap::new(),
        running: BinaryHeap::new(),
        placements: HashMap::new(),
        waiting: BTreeMap::new(),
        waiting_count: 0,
        arrived_at: vec![0; work.arrivals.len()],
        waits_ms: Vec::with_capacity(work.arrivals.len()),
        rng: ChaCha8Rng::seed_from_u64(seed),
        memory: Memory::with_seed(seed),
        dirty: false,
        s: empty_summary(scenario, seed),
        slot_price,
        alloc_sum: BTreeMap::new(),
        frag_sum: 0.0,
        samples: 0,
    };
    sim.run(progress)
}

/// The cheapest $/hour of one slot of `spec` in any group (price over how many fit a node,
/// by the policy's own fit).
fn cheapest_slot(groups: &[NodeGroupConfig], spec: &SandboxSpec) -> f64 {
    let placer = Placer::new(planning_placer(), TypicalWorkload::default());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    groups
        .iter()
        .filter_map(|g| {
            let fit = fit_on_template(&placer, &Arc::new(template(g)), spec, &mut rng)?;
            Some(g.price_per_hour_usd / f64::from(fit.per_node))
        })
        .reduce(f64::min)
        .unwrap_or(0.0)
}

fn empty_summary(scenario: &Scenario, seed: u64) -> Summary {
    Summary {
        scenario: scenario.scenario.name.clone(),
        seed,
        simulated_hours: scenario.scenario.duration_h,
        peak_concurrent_sandboxes: 0,
        wait_p50_s: 0.0,
        wait_p99_s: 0.0,
        wait_max_s: 0.0,
        sandboxes_arrived: 0,
        sandboxes_placed: 0,
        sandboxes_finished: 0,
        sandboxes_failed: BTreeMap::new(),
        unplaceable: BTreeMap::new(),
        gpu_allocation_pct_by_model: BTreeMap::new(),
        fragmentation_pct: 0.0,
        peak_nodes: 0,
        node_hours_by_group: BTreeMap::new(),
        cost_by_group_usd: BTreeMap::new(),
        cost_usd: 0.0,
        cost_lower_bound_usd: 0.0,
        cost_over_lower_bound: 0.0,
        stockouts: 0,
        quota_errors: 0,
        scale_up_events: 0,
        scale_up_nodes: 0,
        scale_down_nodes: 0,
        spot_interruptions: 0,
    }
}

impl Sim<'_> {
    fn groups(&self) -> &[NodeGroupConfig] {
        &self.scenario.autoscaler.node_groups
    }

    fn run(mut self, progress: &mut dyn FnMut(f64)) -> Result<Run, String> {
        let end = (self.scenario.scenario.duration_h * 3_600_000.0) as u64;
        let interval = self.scenario.autoscaler.interval_ms.max(100);
        let sample_every = self.scenario.scenario.sample_interval_s * 1000;
        let mut next_tick = 0u64;
        let mut next_sample = 0u64;
        let mut next_retry = 0u64;
        let mut next_arrival = 0usize;
        let mut series = Vec::new();
        let mut reported = 0.0;
        let mut last = 0u64;
        loop {
            let departure = self.running.peek().map_or(u64::MAX, |r| r.0.0);
            let arrival = self
                .work
                .arrivals
                .get(next_arrival)
                .map_or(u64::MAX, |a| a.at_ms);
            let retry = if self.dirty && self.waiting_count > 0 {
                next_retry.max(last)
            } else {
                u64::MAX
            };
            let now = departure
                .min(arrival)
                .min(next_tick)
                .min(retry)
                .min(next_sample);
            if now >= end {
                break;
            }
            last = now;
            if departure == now {
                let Some(Reverse((_, id))) = self.running.pop() else {
                    continue;
                };
                self.finish(id, now);
            } else if arrival == now {
                self.arrive(next_arrival as u32, now);
                next_arrival += 1;
            } else if retry == now {
                self.retry_waiting(now);
                next_retry = now + RETRY_MS;
            } else if next_tick == now {
                self.tick(now, interval)?;
                self.retry_waiting(now);
                next_tick = now + interval;
            } else {
                series.push(self.sample(now));
                next_sample = now + sample_every;
                let done = now as f64 / end as f64;
                if done - reported >= 0.01 {
                    progress(done);
                    reported = done;
                }
            }
        }
        series.push(self.sample(end));
        progress(1.0);
        Ok(self.finish_run(series))
    }

    fn arrive(&mut self, index: u32, now: u64) {
        self.s.sandboxes_arrived += 1;
        self.arrived_at[index as usize] = now;
        let spec = self.work.arrivals[index as usize].spec;
        if self.waiting.get(&spec).is_some_and(|q| !q.is_empty()) || !self.start(index, now) {
            self.waiting.entry(spec).or_default().push_back(index);
            self.waiting_count += 1;
        }
    }

    /// Places and starts one sandbox now, if it fits.
    fn start(&mut self, index: u32, now: u64) -> bool {
        let a = self.work.arrivals[index as usize];
        let spec = &self.work.specs[a.spec as usize];
        let Some(p) = self.placer.place(&self.view, spec, &mut self.rng).placement else {
            return false;
        };
        self.view.reserve(spec, &p);
        if let Some(node) = self.nodes.get_mut(&p.node) {
            node.sandboxes += 1;
        }
        self.placements.insert(index, p);
        self.running.push(Reverse((now + a.duration_ms, index)));
        self.waits_ms
            .push(now.saturating_sub(self.arrived_at[index as usize]));
        self.s.sandboxes_placed += 1;
        self.s.peak_concurrent_sandboxes = self
            .s
            .peak_concurrent_sandboxes
            .max(self.placements.len() as u64);
        // Only the part of the run inside the simulated horizon is paid for either way.
        let horizon = (self.scenario.scenario.duration_h * 3_600_000.0) as u64;
        let hours = a.duration_ms.min(horizon.saturating_sub(now)) as f64 / 3_600_000.0;
        self.s.cost_lower_bound_usd += hours * self.slot_price[a.spec as usize];
        true
    }

    fn release(&mut self, index: u32, now: u64) {
        let Some(p) = self.placements.remove(&index) else {
            return;
        };
        let spec = &self.work.specs[self.work.arrivals[index as usize].spec as usize];
        self.view.release(spec, &p);
        if let Some(node) = self.nodes.get_mut(&p.node) {
            node.sandboxes = node.sandboxes.saturating_sub(1);
            if node.sandboxes == 0 {
                node.idle_since = now;
            }
        }
        self.dirty = true;
    }

    fn finish(&mut self, index: u32, now: u64) {
        if self.placements.contains_key(&index) {
            self.s.sandboxes_finished += 1;
            self.release(index, now);
        }
    }

    fn retry_waiting(&mut self, now: u64) {
        self.dirty = false;
        let specs: Vec<u32> = self.waiting.keys().copied().collect();
        for spec in specs {
            while let Some(&index) = self.waiting.get(&spec).and_then(VecDeque::front) {
                if !self.start(index, now) {
                    break;
                }
                if let Some(q) = self.waiting.get_mut(&spec) {
                    q.pop_front();
                }
                self.waiting_count -= 1;
            }
        }
        self.waiting.retain(|_, q| !q.is_empty());
    }

    /// Rebuilds the view without `gone` and with the cordoned nodes not ready.
    fn rebuild_view(&mut self, gone: &[String]) {
        let mut view = ClusterView::new();
        for n in self.view.nodes() {
            if gone.contains(&n.spec.id) {
                continue;
            }
            let ready = self.nodes.get(&n.spec.id).is_some_and(|r| !r.cordoned);
            view.push(
                n.spec.clone(),
                n.epoch,
                ready,
                n.cpu_milli_free,
                n.memory_mib_free,
                n.gpu_milli_free.clone(),
            );
        }
        self.view = view;
    }

    /// One autoscaler round at `now`, as the controller runs it.
    fn tick(&mut self, now: u64, interval: u64) -> Result<(), String> {
        self.clock.set(now);
        let groups = self.groups().to_vec();
        let mut status: BTreeMap<String, GroupStatus> = BTreeMap::new();
        let mut live_ids: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut to_cordon = Vec::new();
        let mut joined = Vec::new();
        for (gi, g) in groups.iter().enumerate() {
            let Some(cloud) = self.clouds.get(&g.provider) else {
                continue;
            };
            let listed = cloud.list_now(g);
            let mut s = GroupStatus::default();
            let hours = interval as f64 / 3_600_000.0;
            for n in &listed {
                live_ids.insert(n.id.clone());
                *self
                    .s
                    .node_hours_by_group
                    .entry(g.name.clone())
                    .or_default() += hours;
                *self.s.cost_by_group_usd.entry(g.name.clone()).or_default() +=
                    hours * g.price_per_hour_usd;
                match (n.state, self.nodes.get(&n.id)) {
                    (InstanceState::Running, None) => joined.push((gi, n.id.clone())),
                    (InstanceState::Provisioning, _) => s.in_flight += 1,
                    _ => {}
                }
                if n.interruption_notice && self.nodes.get(&n.id).is_some_and(|r| !r.cordoned) {
                    to_cordon.push(n.id.clone());
                }
            }
            status.insert(g.name.clone(), s);
        }
        // Nodes that joined.
        for (gi, id) in joined {
            let t = template(&groups[gi]);
            let model = t.gpus.first().map(|d| (d.model.clone(), d.memory_mib));
            let spec = NodeSpec {
                id: id.clone(),
                gpus: model.map_or_else(Vec::new, |(m, mem)| {
                    NodeSpec::uniform_gpus(&id, &m, mem, t.gpus.len() as u32)
                }),
                ..t
            };
            let gpus = vec![GPU_MILLI_PER_GPU; spec.gpus.len()];
            self.view.push(
                Arc::new(spec.clone()),
                0,
                true,
                spec.cpu_milli,
                spec.memory_mib,
                gpus,
            );
            self.nodes.insert(
                id,
                Node {
                    group: gi,
                    sandboxes: 0,
                    idle_since: now,
                    cordoned: false,
                },
            );
            self.dirty = true;
        }
        // Interrupted nodes are gone; their sandboxes fail.
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|id| !live_ids.contains(*id))
            .cloned()
            .collect();
        let mut changed = !to_cordon.is_empty();
        for id in &to_cordon {
            if let Some(n) = self.nodes.get_mut(id) {
                n.cordoned = true;
            }
        }
        if !gone.is_empty() {
            let victims: Vec<u32> = self
                .placements
                .iter()
                .filter(|(_, p)| gone.contains(&p.node))
                .map(|(i, _)| *i)
                .collect();
            for i in victims {
                *self
                    .s
                    .sandboxes_failed
                    .entry("spot_interrupted".into())
                    .or_default() += 1;
                self.release(i, now);
            }
            self.s.spot_interruptions += gone.len() as u64;
            for id in &gone {
                self.nodes.remove(id);
            }
            changed = true;
        }
        if changed {
            self.rebuild_view(&gone);
        }

        // Decide and act; after a refused scale-up, decide again this round.
        let pending: Vec<PendingSandbox> = self
            .waiting
            .iter()
            .filter_map(|(spec, q)| {
                Some(PendingSandbox {
                    id: SandboxId(u64::from(*q.front()?)),
                    count: q.len() as u32,
                    spec: self.work.specs[*spec as usize].clone(),
                    reason: "no node fits".into(),
                })
            })
            .collect();
        let existing = self.existing();
        let clouds = &self.clouds;
        let (decision, attempts, _) = now_or_never(self.memory.decide_and_scale(
            &self.policy,
            now,
            &pending,
            &existing,
            &mut status,
            |g, n| {
                let answer = clouds.get(&g.provider).map_or_else(
                    || {
                        Err(ProviderError::Permanent(format!(
                            "no cloud {:?}",
                            g.provider
                        )))
                    },
                    |cloud| cloud.scale_up_now(&g, n),
                );
                std::future::ready(answer)
            },
        ))
        .ok_or("a simulated cloud did not answer at once")?;
        for attempt in attempts {
            match attempt {
                Attempt::Granted { nodes, .. } => {
                    self.s.scale_up_events += 1;
                    self.s.scale_up_nodes += u64::from(nodes);
                }
                Attempt::Refused { error, .. } => match error {
                    ProviderError::Stockout(_) => self.s.stockouts += 1,
                    ProviderError::Quota(_) => self.s.quota_errors += 1,
                    _ => {}
                },
            }
        }
        // Idle nodes go.
        let mut released = Vec::new();
        for r in &decision.remove {
            if self.nodes.get(&r.node).is_some_and(|n| n.sandboxes == 0)
                && let Some(g) = groups.iter().find(|g| g.name == r.group)
                && let Some(cloud) = self.clouds.get(&g.provider)
            {
                cloud.remove_now(g, std::slice::from_ref(&r.node));
                self.nodes.remove(&r.node);
                released.push(r.node.clone());
            }
        }
        if !released.is_empty() {
            self.s.scale_down_nodes += released.len() as u64;
            self.rebuild_view(&released);
        }
        self.s.peak_nodes = self.s.peak_nodes.max(live_ids.len() as u64);
        if now + interval >= (self.scenario.scenario.duration_h * 3_600_000.0) as u64 {
            self.s.unplaceable = decision
                .unmet
                .iter()
                .map(|(k, v)| (k.clone(), u64::from(*v)))
                .collect();
        }
        Ok(())
    }

    fn existing(&self) -> Vec<ExistingNode> {
        self.view
            .nodes()
            .iter()
            .filter_map(|n| {
                let rec = self.nodes.get(&n.spec.id)?;
                Some(ExistingNode {
                    spec: n.spec.clone(),
                    group: Some(self.groups()[rec.group].name.clone()),
                    ready: n.ready,
                    cpu_milli_free: n.cpu_milli_free,
                    memory_mib_free: n.memory_mib_free,
                    gpu_milli_free: n.gpu_milli_free.clone(),
                    sandboxes: rec.sandboxes,
                    idle_since_ms: (rec.sandboxes == 0).then_some(rec.idle_since),
                })
            })
            .collect()
    }

    fn sample(&mut self, now: u64) -> Sample {
        let mut per_group = vec![0u32; self.groups().len()];
        let mut usd = 0.0;
        self.clock.set(now);
        for g in self.groups().iter().enumerate() {
            if let Some(cloud) = self.clouds.get(&g.1.provider) {
                let n = cloud.list_now(g.1).len() as u32;
                per_group[g.0] = n;
                usd += f64::from(n) * g.1.price_per_hour_usd;
            }
        }
        let mut by_model: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let (mut partial_free, mut total) = (0u64, 0u64);
        for n in self.view.nodes() {
            for (i, free) in n.gpu_milli_free.iter().enumerate() {
                let model = n.spec.gpus[i].model.as_str().to_owned();
                let e = by_model.entry(model).or_default();
                e.0 += u64::from(GPU_MILLI_PER_GPU - free.min(&GPU_MILLI_PER_GPU));
                e.1 += u64::from(GPU_MILLI_PER_GPU);
                total += u64::from(GPU_MILLI_PER_GPU);
                if *free > 0 && *free < GPU_MILLI_PER_GPU {
                    partial_free += u64::from(*free);
                }
            }
        }
        let (used, all): (u64, u64) = by_model
            .values()
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        for (model, (u, t)) in &by_model {
            *self.alloc_sum.entry(model.clone()).or_default() += 100.0 * *u as f64 / *t as f64;
        }
        self.frag_sum += if total > 0 {
            100.0 * partial_free as f64 / total as f64
        } else {
            0.0
        };
        self.samples += 1;
        Sample {
            t_h: now as f64 / 3_600_000.0,
            pending: self.waiting_count,
            running: self.placements.len() as u64,
            nodes: per_group,
            gpu_alloc_pct: if all > 0 {
                100.0 * used as f64 / all as f64
            } else {
                0.0
            },
            usd_per_hour: usd,
        }
    }

    fn finish_run(mut self, series: Vec<Sample>) -> Run {
        self.waits_ms.sort_unstable();
        let q = |p: f64| {
            if self.waits_ms.is_empty() {
                0.0
            } else {
                let i = ((self.waits_ms.len() - 1) as f64 * p).round() as usize;
                self.waits_ms[i] as f64 / 1000.0
            }
        };
        self.s.wait_p50_s = q(0.5);
        self.s.wait_p99_s = q(0.99);
        self.s.wait_max_s = q(1.0);
        let samples = self.samples.max(1) as f64;
        self.s.gpu_allocation_pct_by_model = self
            .alloc_sum
            .iter()
            .map(|(m, s)| (m.clone(), round2(s / samples)))
            .collect();
        self.s.fragmentation_pct = round2(self.frag_sum / samples);
        self.s.cost_usd = round2(self.s.cost_by_group_usd.values().sum());
        for v in self.s.cost_by_group_usd.values_mut() {
            *v = round2(*v);
        }
        for v in self.s.node_hours_by_group.values_mut() {
            *v = round2(*v);
        }
        self.s.cost_lower_bound_usd = round2(self.s.cost_lower_bound_usd);
        self.s.cost_over_lower_bound = if self.s.cost_lower_bound_usd > 0.0 {
            round2(self.s.cost_usd / self.s.cost_lower_bound_usd)
        } else {
            0.0
        };
        let waiting = self.waiting_count;
        if waiting > 0 && self.s.unplaceable.is_empty() {
            self.s.unplaceable.insert("still waiting".into(), waiting);
        }
        Run {
            summary: self.s,
            series,
            groups: self
                .scenario
                .autoscaler
                .node_groups
                .iter()
                .map(|g| g.name.clone())
                .collect(),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
