//! `NodeService.Connect`: the scheduler's side of an agent's stream. Only the leader serves
//! it; a follower answers `NotLeader`. Registration proposes one `RegisterAgent`; then
//! [`agent_inbound`] records heartbeats and reports, and [`agent_outbound`] pushes
//! assignments and terminations as applied revisions change.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::node_service_server::NodeService;

use super::{MAX_OBSERVED, NodeApi, only_outcome};
use crate::convert;
use crate::model::{NodeStatus, SandboxId, SandboxState, SnapshotMode};
use crate::service::liveness::Liveness;
use crate::service::usage::UsageBook;
use crate::service::{ServiceError, Store};
use crate::state::{Command, ItemOutcome, Rejection};

type SchedulerStream =
    Pin<Box<dyn Stream<Item = Result<pb::SchedulerMessage, Status>> + Send + 'static>>;

/// What an agent's outbound channel holds: boxed, because a channel allocates its slots
/// in blocks of 32 up front and an unboxed message (an assignment carries a whole sandbox)
/// made that 32 KiB per connected agent, 320 MiB at 10,000 agents.
type Queued = Box<Result<pb::SchedulerMessage, Status>>;

fn scheduler_message(m: pb::scheduler_message::Message) -> Queued {
    Box::new(Ok(pb::SchedulerMessage { message: Some(m) }))
}

/// The response stream over an agent's outbound channel.
fn outbound_stream(rx: mpsc::Receiver<Queued>) -> SchedulerStream {
    Box::pin(ReceiverStream::new(rx).map(|m| *m))
}

#[tonic::async_trait]
impl<S: Store> NodeService for NodeApi<S> {
    type ConnectStream = SchedulerStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = crate::service::auth::caller(&request);
        if caller == crate::service::auth::Caller::Anonymous {
            return Err(self.node_denied(
                tonic::Code::Unauthenticated,
                "NodeService.Connect needs a node certificate (an agent without one joins \
                 with a join token: berth node token create)"
                    .into(),
            ));
        }
        let mut inbound = request.into_inner();
        let first = match inbound.next().await {
            Some(Ok(m)) => m,
            Some(Err(status)) => return Err(status),
            None => {
                return Err(
                    ServiceError::invalid("message", "the stream ended before register").into(),
                );
            }
        };
        let Some(pb::agent_message::Message::Register(register)) = first.message else {
            return Err(ServiceError::invalid(
                "message",
                "the first message on the stream must be register",
            )
            .into());
        };
        let (tx, rx) = mpsc::channel(256);
        if !self.handle.is_leader() {
            let (leader_id, leader_address) = self.handle.leader();
            let _ = tx
                .send(scheduler_message(
                    pb::scheduler_message::Message::NotLeader(pb::NotLeader {
                        leader_id,
                        leader_address,
                    }),
                ))
                .await;
            return Ok(Response::new(outbound_stream(rx)));
        }
        let spec = convert::node_spec_from_pb(register.inventory.as_ref(), "register.inventory")
            .map_err(ServiceError::from)?;
        let node = spec.id.clone();
        if let crate::service::auth::Caller::Cert(id) = &caller {
            // An operator may register any node by hand (tests, benches, recovery).
            if id.role != berth_net::Role::Node(node.to_string())
                && !matches!(id.role, berth_net::Role::Admin(_))
            {
                return Err(self.node_denied(
                    tonic::Code::PermissionDenied,
                    format!(
                        "register.inventory.node_id: {id} may register only as its own node, \
                         not as {node}"
                    ),
                ));
            }
        }
        if register.running.len() > MAX_OBSERVED {
            return Err(ServiceError::invalid(
                "register.running",
                format!(
                    "{} sandboxes; an agent reports at most {MAX_OBSERVED}",
                    register.running.len()
                ),
            )
            .into());
        }
        // Everything the agent has, running or finished, with its state there: the state
        // machine re-adopts it, lets the agent's report stand, and makes Lost what the agent
        // no longer has. An entry that does not read is simply not ours.
        let (has, problems) =
            convert::observed_from_pb(&node, &register.running, "register.running");
        if let Some(problems) = problems {
            tracing::warn!(node = %node, errors = %problems.one_line(), "unreadable sandboxes in a registration left out");
        }
        let result = self
            .handle
            .command(Command::RegisterAgent { spec, has })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        // Running on the agent but not bound to this node in the state, or paused to its
        // disk but no longer wanted there (deleted, restored elsewhere): the agent stops
        // them, and a snapshot goes with its sandbox.
        let held: Vec<(String, bool)> = register
            .running
            .into_iter()
            .filter_map(|o| {
                let paused = o.state == pb::SandboxState::Paused as i32;
                let runs = o.state == pb::SandboxState::Running as i32
                    || o.state == pb::SandboxState::Standby as i32;
                (paused || runs).then_some((o.sandbox_id, paused))
            })
            .collect();
        let lookup = node.clone();
        let (epoch, stop, nodes) = self
            .handle
            .read(false, move |v| {
                let record = v.state.node(&lookup);
                let wanted = |id: &str, paused: bool| {
                    id.parse::<SandboxId>().is_ok_and(|id| {
                        record.is_some_and(|r| {
                            if paused {
                                r.snapshots.contains(&id)
                            } else {
                                r.sandboxes.contains(&id)
                            }
                        })
                    })
                };
                let stop: Vec<String> = held
                    .into_iter()
                    .filter(|(id, paused)| !wanted(id, *paused))
                    .map(|(id, _)| id)
                    .collect();
                (record.map_or(0, |r| r.epoch), stop, v.state.nodes().len())
            })
            .await?;
        self.liveness.heard_from(&node);
        let _ = tx
            .send(scheduler_message(
                pb::scheduler_message::Message::RegisterAck(pb::RegisterAck {
                    epoch,
                    heartbeat_interval_ms: self.liveness.interval_for(nodes).as_millis() as u64,
                    stop_sandbox_ids: stop,
                }),
            ))
            .await;
        tracing::info!(node = %node, epoch, "agent registered");
        tokio::spawn(agent_inbound(
            self.handle.clone(),
            self.liveness.clone(),
            self.usage.clone(),
            node.clone(),
            inbound,
        ));
        let intervals = self.liveness.interval_changes();
        tokio::spawn(agent_outbound(
            self.handle.clone(),
            node,
            epoch,
            intervals,
            tx,
        ));
        Ok(Response::new(outbound_stream(rx)))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        self.join_call(request).await
    }

    async fn renew_certificate(
        &self,
        request: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        self.renew_call(request).await
    }

    type FetchSnapshotStream = super::sandbox_calls::Boxed<pb::SnapshotData>;

    async fn fetch_snapshot(
        &self,
        request: Request<pb::FetchSnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        self.fetch_snapshot_call(request).await
    }
}

impl<S: Store> NodeApi<S> {
    pub(super) fn node_denied(&self, code: tonic::Code, message: String) -> Status {
        self.denied(crate::service::auth::service::NODE, code, message)
    }
}

/// Heartbeats, inventory changes, status and usage reports from an agent.
async fn agent_inbound<S: Store>(
    handle: S,
    liveness: Liveness,
    usage: UsageBook,
    node: String,
    mut inbound: Streaming<pb::AgentMessage>,
) {
    let metrics = handle.metrics().clone();
    metrics.agent_streams.inc();
    while let Some(Ok(message)) = inbound.next().await {
        liveness.heard_from(&node);
        let command = match message.message {
            Some(pb::agent_message::Message::Heartbeat(_)) => {
                metrics.heartbeats.inc();
                continue;
            }
            Some(pb::agent_message::Message::Usage(report)) => {
                usage.record(&node, report);
                continue;
            }
            Some(pb::agent_message::Message::SandboxStatus(update)) => {
                match convert::status_update_from_pb(&node, &update) {
                    Ok(u) => Command::UpdateSandboxes { items: vec![u] },
                    Err(errors) => {
                        tracing::warn!(node = %node, errors = %errors.one_line(), "bad status report ignored");
                        continue;
                    }
                }
            }
            Some(pb::agent_message::Message::Inventory(update)) => {
                match convert::node_spec_from_pb(update.inventory.as_ref(), "inventory.inventory") {
                    Ok(spec) if spec.id == node => Command::RegisterNode { spec },
                    Ok(spec) => {
                        tracing::warn!(node = %node, other = %spec.id, "inventory update for another node ignored");
                        continue;
                    }
                    Err(errors) => {
                        tracing::warn!(node = %node, errors = %errors.one_line(), "bad inventory update ignored");
                        continue;
                    }
                }
            }
            Some(pb::agent_message::Message::Register(_)) | None => {
                tracing::warn!(node = %node, "unexpected message on an agent stream ignored");
                continue;
            }
        };
        match handle.command(command).await {
            Ok(result) => {
                for outcome in result.outcomes {
                    match outcome {
                        // A node may report only on sandboxes bound to it: the state machine
                        // refuses the rest, and a refusal is a denial like any other.
                        ItemOutcome::Rejected(r @ Rejection::NotBoundHere { .. }) => {
                            crate::service::auth::count_denial(
                                &metrics,
                                crate::service::auth::service::NODE,
                                tonic::Code::PermissionDenied,
                            );
                            tracing::warn!(node = %node, rejection = %r, "status report for a sandbox not bound to this node refused");
                        }
                        ItemOutcome::Rejected(r) => {
                            tracing::debug!(node = %node, rejection = %r, "agent report not applied");
                        }
                        _ => {}
                    }
                }
            }
            Err(error) => tracing::warn!(node = %node, %error, "agent report not recorded"),
        }
    }
    metrics.agent_streams.dec();
    usage.forget(&node);
    tracing::info!(node = %node, "agent stream closed");
}

/// What the agent is to be told after one look at its node.
struct Feed {
    assign: Vec<pb::AssignSandbox>,
    pause: Vec<pb::PauseSandbox>,
    terminate: Vec<SandboxId>,
    /// Bound here now, with the revision each was bound at (a sandbox bound again after a
    /// pause is assigned again).
    bound: BTreeMap<SandboxId, u64>,
    /// Pausing here now.
    pausing: BTreeSet<SandboxId>,
    /// On standby here now.
    standby: BTreeSet<SandboxId>,
    /// Snapshots held here now.
    held: BTreeSet<SandboxId>,
}

/// What the agent was last told.
#[derive(Default, Clone)]
struct Told {
    bound: BTreeMap<SandboxId, u64>,
    pausing: BTreeSet<SandboxId>,
    standby: BTreeSet<SandboxId>,
    held: BTreeSet<SandboxId>,
}

/// One look at the node: what to send its agent beyond what it was `told`. `None` when the
/// node is Down or gone.
fn feed(state: &crate::state::State, node: &str, told: &Told, epoch: u64) -> Option<Feed> {
    // A Down node's agent must register again (a stopped or starved agent whose stream
    // outlived its TTL): end the stream, and the agent reconnects with everything it has,
    // which brings the node back.
    let record = state.node(node).filter(|r| r.status != NodeStatus::Down)?;
    let sandboxes: Vec<&crate::model::Sandbox> = record
        .sandboxes
        .iter()
        .filter_map(|id| state.sandbox(*id))
        .collect();
    let bound: BTreeMap<SandboxId, u64> = sandboxes
        .iter()
        .filter_map(|s| s.binding.as_ref().map(|b| (s.id, b.bound_revision)))
        .collect();
    let assign = sandboxes
        .iter()
        .filter(|s| s.state == SandboxState::Scheduled && told.bound.get(&s.id) != bound.get(&s.id))
        .map(|s| pb::AssignSandbox {
            sandbox: Some(convert::sandbox_to_pb_with_gpus(
                s,
                Some(&record.spec),
                state.revision(),
            )),
            epoch,
            restore: s.snapshot.as_ref().map(|snap| pb::RestoreFrom {
                node_id: snap.node.to_string(),
                bytes: snap.bytes,
                filesystem_only: snap.mode == SnapshotMode::FilesystemOnly,
            }),
        })
        .collect();
    let pausing: BTreeSet<SandboxId> = sandboxes
        .iter()
        .filter(|s| s.state == SandboxState::Pausing)
        .map(|s| s.id)
        .collect();
    let pause: Vec<pb::PauseSandbox> = sandboxes
        .iter()
        .filter(|s| s.state == SandboxState::Pausing && !told.pausing.contains(&s.id))
        .map(|s| pb::PauseSandbox {
            sandbox_id: s.id.to_string(),
            filesystem_only: s
                .binding
                .as_ref()
                .is_some_and(|b| !b.placement.gpu_indices.is_empty()),
            standby: false,
        })
        .collect();
    let standby: BTreeSet<SandboxId> = sandboxes
        .iter()
        .filter(|s| matches!(s.state, SandboxState::Standby { .. }))
        .map(|s| s.id)
        .collect();
    let freeze = standby
        .difference(&told.standby)
        .map(|id| pb::PauseSandbox {
            sandbox_id: id.to_string(),
            filesystem_only: false,
            standby: true,
        });
    let pause: Vec<pb::PauseSandbox> = pause.into_iter().chain(freeze).collect();
    let held = record.snapshots.clone();
    // Gone from the node: deleted, Lost, or its snapshot here is no longer wanted (deleted,
    // restored elsewhere, or past its retention). One that ended on its own (Exited,
    // Failed) while bound here was reported by the agent, which keeps its output for
    // `logs`; one paused to this node stays. A snapshot only held here (not bound here at
    // the last look) did not end on this node: whatever its state, the agent removes it.
    let ended_on_its_own = |id: &SandboxId| {
        told.bound.contains_key(id)
            && state.sandbox(*id).is_some_and(|s| {
                matches!(
                    s.state,
                    SandboxState::Exited { .. } | SandboxState::Failed { .. }
                )
            })
    };
    let terminate = told
        .bound
        .keys()
        .chain(told.held.iter())
        .filter(|id| !bound.contains_key(id) && !held.contains(id))
        .filter(|id| !ended_on_its_own(id))
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Some(Feed {
        assign,
        pause,
        terminate,
        bound,
        pausing,
        standby,
        held,
    })
}

/// Sends the agent its assignments, pauses and terminations as the applied state changes.
///
/// Push, from what apply changed: the stream waits on its node's wake-up in the change
/// feed, and looks at the node (a read of the applied-state copy, off the Raft thread)
/// only when an applied entry touched it. Each look diffs the node against what the agent
/// was last told, so a stream that fell behind (its bounded channel full while the agent
/// is slow) resyncs on its next look; it never holds up the others or the Raft thread.
async fn agent_outbound<S: Store>(
    handle: S,
    node: String,
    epoch: u64,
    mut intervals: tokio::sync::watch::Receiver<std::time::Duration>,
    tx: mpsc::Sender<Queued>,
) {
    // The register ack carried the interval as it is now.
    intervals.borrow_and_update();
    let mut changes = handle.feed().subscribe(&node);
    let mut leading = handle.feed().leading();
    let mut told = Told::default();
    loop {
        // A replica that stops leading sends the agent on to the new leader: agents
        // heartbeat only to the leader, which is the one that marks silent nodes Down.
        if !handle.is_leader() {
            let (leader_id, leader_address) = handle.leader();
            let msg = pb::scheduler_message::Message::NotLeader(pb::NotLeader {
                leader_id,
                leader_address,
            });
            let _ = tx.send(scheduler_message(msg)).await;
            return;
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            changed = leading.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            changed = intervals.changed() => {
                if changed.is_err() {
                    return;
                }
                let interval_ms = intervals.borrow_and_update().as_millis() as u64;
                let msg = pb::scheduler_message::Message::Heartbeat(pb::HeartbeatSettings {
                    interval_ms,
                });
                if tx.send(scheduler_message(msg)).await.is_err() {
                    return;
                }
                continue;
            }
            () = tx.closed() => return,
        }
        // Coalesce a burst of entries touching this node into one look.
        tokio::time::sleep(COALESCE).await;
        changes.borrow_and_update();
        let lookup = node.clone();
        let known = told.clone();
        let diff = handle
            .read(false, move |v| feed(v.state, &lookup, &known, epoch))
            .await;
        let Ok(Some(feed)) = diff else {
            if matches!(diff, Ok(None)) {
                tracing::info!(node = %node, "node is down or gone; closing its stream so the agent registers again");
            }
            return;
        };
        let messages = feed
            .assign
            .into_iter()
            .map(pb::scheduler_message::Message::Assign)
            .chain(
                feed.pause
                    .into_iter()
                    .map(pb::scheduler_message::Message::Pause),
            )
            .chain(feed.terminate.into_iter().map(|id| {
                pb::scheduler_message::Message::Terminate(pb::TerminateSandbox {
                    sandbox_id: id.to_string(),
                    reason: "deleted or finished".into(),
                    grace_ms: 10_000,
                })
            }));
        for msg in messages {
            if tx.send(scheduler_message(msg)).await.is_err() {
                return;
            }
        }
        told = Told {
            bound: feed.bound,
            pausing: feed.pausing,
            standby: feed.standby,
            held: feed.held,
        };
    }
}

/// Entries touching one node within this window are looked at together.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(5);
