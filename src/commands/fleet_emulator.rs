//! `berth fleet-emulator` (hidden): many node agents in one process, for `berth bench
//! fleet` and the fleet test.
//!
//! Each emulated agent is what the scheduler sees of a real one: its own connection (and,
//! with `--pki`, its own certificate `node/<id>`), a `NodeService.Connect` stream that
//! registers an inventory drawn from the synthetic multi-cloud pool, heartbeats at the
//! interval the scheduler hands out, follows leader hints with jittered backoff, and a fake
//! runtime: an assigned sandbox is reported Running at once and, with `--run`, Exited after
//! a drawn duration; a terminated one is dropped. A re-registration reports what it holds.
//!
//! Every `--report-every` it prints one JSON line of counters and latencies on stdout
//! ([`Report`]). Create → assignment latency is measured at the agent from the sandbox's
//! `created_unix_ms` (the leader's clock when it proposed the create; same host).
//! `--slow N` makes the first N agents stop reading their stream after registering, to
//! show that a stalled agent holds up no one else. Each agent's node carries the label
//! `emulator.berth.dev/agent = <index>`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Args;
use rand_chacha::rand_core::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use berth_net::{Expect, NetConfig, Tls};
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;
use berth_scheduler::convert;
use berth_sim::synthetic;

use super::fleet_stats::{Counters, Histogram, Report};

/// The node label carrying an emulated agent's index (0-based).
pub(crate) const AGENT_LABEL: &str = "emulator.berth.dev/agent";

/// Arguments of `berth fleet-emulator`.
#[derive(Debug, Args)]
pub(crate) struct EmulatorArgs {
    /// Scheduler replicas (host:port, comma-separated); agents follow leader hints.
    #[arg(long, value_delimiter = ',', required = true)]
    scheduler: Vec<String>,
    /// Emulated agents (nodes).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    nodes: u64,
    /// Seed of the inventories and jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A local PKI directory (`ca.pem`, `ca.key`): each agent gets its own certificate.
    /// Without it, the agents connect without TLS.
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
    /// Mean run time of an assigned sandbox before it exits (exponential); unset: runs
    /// until terminated.
    #[arg(long, value_parser = super::parse_duration)]
    run: Option<Duration>,
    /// The first N agents stop reading their stream after registering.
    #[arg(long, default_value_t = 0)]
    slow: u64,
    /// How often to print a report line.
    #[arg(long, default_value = "1s", value_parser = super::parse_duration)]
    report_every: Duration,
    /// Agents connecting at once during the first connection ramp.
    #[arg(long, default_value_t = 256)]
    ramp: usize,
}

/// Shared by all agents of the process.
struct Fleet {
    counters: Counters,
    latency: Histogram,
    /// The leader as last hinted (empty: unknown).
    leader: RwLock<String>,
    endpoints: Vec<String>,
}

pub(crate) fn run(args: &EmulatorArgs) -> ExitCode {
    match super::block_on("fleet-emulator", emulate(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

async fn emulate(args: &EmulatorArgs) -> Result<(), String> {
    let specs = synthetic::pool(args.nodes as usize, args.seed);
    let fleet = Arc::new(Fleet {
        counters: Counters::default(),
        latency: Histogram::default(),
        leader: RwLock::new(String::new()),
        endpoints: args.scheduler.clone(),
    });
    let pki = match &args.pki {
        Some(dir) => Some(
            berth_net::tls::pki::LocalPki::open(dir)
                .map_err(|e| format!("--pki {}: {e}", dir.display()))?,
        ),
        None => None,
    };
    let pki = pki.map(Arc::new);
    let ramp = Arc::new(tokio::sync::Semaphore::new(args.ramp.max(1)));
    for (i, spec) in specs.into_iter().enumerate() {
        let mut inventory = convert::node_inventory_to_pb(&spec);
        // Tests pin sandboxes to one emulated agent by this label.
        inventory.labels.insert(AGENT_LABEL.into(), i.to_string());
        let mut agent = Agent {
            inventory,
            node: spec.id.clone(),
            tls: None,
            fleet: fleet.clone(),
            held: BTreeMap::new(),
            slow: (i as u64) < args.slow,
            run: args.run,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(
                args.seed ^ (i as u64).wrapping_mul(0x9e37),
            ),
        };
        let ramp = ramp.clone();
        let pki = pki.clone();
        tokio::spawn(async move {
            // Each agent's own certificate, issued on the blocking pool as it starts.
            if let Some(pki) = pki {
                let node = agent.node.clone();
                let issued = tokio::task::spawn_blocking(move || {
                    let settings = pki.issue(&format!("node/{node}"))?;
                    Tls::load(&settings).map_err(|e| e.to_string())
                })
                .await;
                match issued {
                    Ok(Ok(tls)) => agent.tls = tls,
                    Ok(Err(e)) => {
                        eprintln!("berth fleet-emulator: certificate for {}: {e}", agent.node);
                        return;
                    }
                    Err(_) => return,
                }
            }
            agent.live(ramp).await;
        });
    }
    let started = Instant::now();
    let mut tick = tokio::time::interval(args.report_every);
    loop {
        tick.tick().await;
        let report = Report::take(&fleet.counters, &fleet.latency, started.elapsed());
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
}

struct Agent {
    inventory: pb::NodeInventory,
    node: String,
    tls: Option<Tls>,
    fleet: Arc<Fleet>,
    /// Sandbox id → when it exits on its own (None: when terminated).
    held: BTreeMap<String, Option<Instant>>,
    slow: bool,
    run: Option<Duration>,
    rng: rand_chacha::ChaCha8Rng,
}

/// How a session ended.
enum End {
    /// Told to go to another replica (or that none leads yet).
    NotLeader,
    /// The connection or stream broke.
    Broken,
}

impl Agent {
    async fn live(mut self, ramp: Arc<tokio::sync::Semaphore>) {
        let mut backoff = Duration::from_millis(100);
        let mut first = Some(ramp);
        let mut attempt = 0usize;
        loop {
            let permit = match &first {
                Some(r) => r.clone().acquire_owned().await.ok(),
                None => None,
            };
            let target = self.target(attempt);
            attempt += 1;
            let end = self.session(&target, permit).await;
            if matches!(end, End::Broken) {
                self.unreachable(&target);
            }
            first = None;
            self.fleet
                .counters
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
            // Jitter spreads a whole fleet's reconnection after a leader change.
            let wait = match end {
                End::NotLeader => Duration::from_millis(self.rng.next_u64() % 1_001),
                End::Broken => {
                    backoff = (backoff * 2).min(Duration::from_secs(3));
                    Duration::from_millis(self.rng.next_u64() % (backoff.as_millis() as u64 + 1))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The hinted leader, else the replicas in turn (as a real agent does).
    fn target(&self, attempt: usize) -> String {
        let hinted = self
            .fleet
            .leader
            .read()
            .map(|l| l.clone())
            .unwrap_or_default();
        if !hinted.is_empty() {
            return hinted;
        }
        let e = &self.fleet.endpoints;
        e[(attempt + self.node.len()) % e.len()].clone()
    }

    /// `target` could not be reached: forget it as the leader (for every agent).
    fn unreachable(&self, target: &str) {
        if let Ok(mut l) = self.fleet.leader.write() {
            if *l == target {
                l.clear();
            }
        }
    }

    async fn session(
        &mut self,
        target: &str,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> End {
        let fleet = self.fleet.clone();
        let counters = &fleet.counters;
        let cfg = NetConfig::agent().with_tls(self.tls.as_ref(), Expect::AnyReplica);
        let Ok(channel) = berth_net::channel(target, &cfg) else {
            return End::Broken;
        };
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
        let running = self
            .held
            .keys()
            .map(|id| pb::ObservedSandbox {
                sandbox_id: id.clone(),
                state: pb::SandboxState::Running as i32,
                ..Default::default()
            })
            .collect();
        let register = pb::agent_message::Message::Register(pb::Register {
            inventory: Some(self.inventory.clone()),
            running,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        });
        if tx.send(message(register)).await.is_err() {
            return End::Broken;
        }
        let mut client = NodeServiceClient::new(channel);
        let Ok(inbound) = client.connect(ReceiverStream::new(rx)).await else {
            return End::Broken;
        };
        let mut inbound = inbound.into_inner();
        let ack = match inbound.next().await {
            Some(Ok(pb::SchedulerMessage {
                message: Some(pb::scheduler_message::Message::RegisterAck(ack)),
            })) => ack,
            Some(Ok(pb::SchedulerMessage {
                message: Some(pb::scheduler_message::Message::NotLeader(nl)),
            })) => {
                self.hint(&nl.leader_address);
                return End::NotLeader;
            }
            _ => return End::Broken,
        };
        drop(permit);
        for id in &ack.stop_sandbox_ids {
            self.held.remove(id);
        }
        counters.registrations.fetch_add(1, Ordering::Relaxed);
        counters.connected.fetch_add(1, Ordering::Relaxed);
        let end = self.registered(&tx, &mut inbound, &ack).await;
        counters.connected.fetch_sub(1, Ordering::Relaxed);
        end
    }

    async fn registered(
        &mut self,
        tx: &mpsc::Sender<pb::AgentMessage>,
        inbound: &mut tonic::Streaming<pb::SchedulerMessage>,
        ack: &pb::RegisterAck,
    ) -> End {
        let fleet = self.fleet.clone();
        let counters = &fleet.counters;
        let every = Duration::from_millis(ack.heartbeat_interval_ms.clamp(50, 60_000));
        let mut heartbeat = tokio::time::interval(every);
        let mut sequence = 0;
        let mut exits = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                biased;
                _ = heartbeat.tick() => {
                    sequence += 1;
                    let hb = pb::agent_message::Message::Heartbeat(pb::Heartbeat {
                        epoch: ack.epoch,
                        sequence,
                    });
                    if tx.send(message(hb)).await.is_err() {
                        return End::Broken;
                    }
                    counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                next = inbound.next(), if !self.slow => {
                    let Some(Ok(m)) = next else { return End::Broken };
                    if let Some(end) = self.on_message(tx, m, &mut heartbeat).await {
                        return end;
                    }
                }
                _ = exits.tick(), if self.run.is_some() => {
                    if !self.exit_due(tx).await {
                        return End::Broken;
                    }
                }
            }
        }
    }

    /// Handles one message from the scheduler; `Some` ends the session.
    async fn on_message(
        &mut self,
        tx: &mpsc::Sender<pb::AgentMessage>,
        m: pb::SchedulerMessage,
        heartbeat: &mut tokio::time::Interval,
    ) -> Option<End> {
        match m.message {
            Some(pb::scheduler_message::Message::Assign(a)) => {
                (!self.assigned(tx, a).await).then_some(End::Broken)
            }
            Some(pb::scheduler_message::Message::Terminate(t)) => {
                self.held.remove(&t.sandbox_id);
                self.fleet
                    .counters
                    .terminations
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(pb::scheduler_message::Message::NotLeader(nl)) => {
                self.hint(&nl.leader_address);
                Some(End::NotLeader)
            }
            Some(pb::scheduler_message::Message::Heartbeat(h)) => {
                let every = Duration::from_millis(h.interval_ms.clamp(50, 60_000));
                *heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                None
            }
            _ => None,
        }
    }

    /// Records an assignment and reports the sandbox Running.
    async fn assigned(
        &mut self,
        tx: &mpsc::Sender<pb::AgentMessage>,
        a: pb::AssignSandbox,
    ) -> bool {
        let fleet = self.fleet.clone();
        let counters = &fleet.counters;
        let Some(sandbox) = a.sandbox else {
            return true;
        };
        let status = sandbox.status.unwrap_or_default();
        if status.node_id != self.node {
            counters.misdelivered.fetch_add(1, Ordering::Relaxed);
        }
        counters.assignments.fetch_add(1, Ordering::Relaxed);
        let now = unix_ms();
        self.fleet
            .latency
            .record(now.saturating_sub(status.created_unix_ms));
        let ends = self.run.map(|mean| {
            let u = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            Instant::now() + mean.mul_f64(-u.ln())
        });
        self.held.insert(sandbox.id.clone(), ends);
        let running = pb::agent_message::Message::SandboxStatus(pb::SandboxStatusUpdate {
            sandbox_id: sandbox.id,
            state: pb::SandboxState::Running as i32,
            at_unix_ms: now,
            ..Default::default()
        });
        tx.send(message(running)).await.is_ok()
    }

    /// Reports Exited for the sandboxes whose drawn run time is over.
    async fn exit_due(&mut self, tx: &mpsc::Sender<pb::AgentMessage>) -> bool {
        let now = Instant::now();
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|(_, end)| end.is_some_and(|e| e <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.held.remove(&id);
            self.fleet.counters.exits.fetch_add(1, Ordering::Relaxed);
            let exited = pb::agent_message::Message::SandboxStatus(pb::SandboxStatusUpdate {
                sandbox_id: id,
                state: pb::SandboxState::Exited as i32,
                exit_code: 0,
                at_unix_ms: unix_ms(),
                ..Default::default()
            });
            if tx.send(message(exited)).await.is_err() {
                return false;
            }
        }
        true
    }

    fn hint(&self, leader: &str) {
        if let Ok(mut l) = self.fleet.leader.write() {
            if !leader.is_empty() && *l != leader {
                *l = leader.to_owned();
            }
        }
    }
}

fn message(m: pb::agent_message::Message) -> pb::AgentMessage {
    pb::AgentMessage { message: Some(m) }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
