//! Raft traffic to the other replicas over the tonic `Peer` service.
//!
//! One tokio task per peer owns a lazily connected channel and a bounded queue of message
//! batches; it coalesces what is queued into one `Peer.Send` call. A full queue or a failed
//! call drops the messages and reports the peer unreachable to Raft, which then probes
//! instead of streaming appends. Snapshots travel on `Peer.SendSnapshot` in chunks of at most
//! 4 MiB, and their outcome is reported back to Raft.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::peer_client::PeerClient;

use super::metrics::Metrics;

/// Batches queued per peer before messages are dropped.
const PEER_QUEUE: usize = 1_024;
/// Largest snapshot chunk.
pub const SNAPSHOT_CHUNK: usize = 4 << 20;
pub use berth_net::MAX_PEER_MESSAGE;

struct PeerSender {
    address: String,
    tx: mpsc::Sender<Vec<Message>>,
    task: tokio::task::JoinHandle<()>,
    client: PeerClient<Channel>,
}

/// What the transport tells the Raft thread about its sends (the driver's handle
/// implements it, so the transport does not depend on the driver).
pub trait PeerFeedback: Clone + Send + Sync + 'static {
    /// `peer` could not be reached; Raft probes it instead of streaming to it.
    fn unreachable(&self, peer: u64);
    /// How sending a snapshot to `to` ended.
    fn snapshot_status(&self, to: u64, ok: bool);
}

/// Sends Raft messages to peers.
pub struct Transport<F: PeerFeedback> {
    id: u64,
    cluster_id: String,
    tls: Option<berth_net::Tls>,
    runtime: tokio::runtime::Handle,
    handle: F,
    metrics: Metrics,
    peers: HashMap<u64, PeerSender>,
}

impl<F: PeerFeedback> Transport<F> {
    /// A transport with no peers yet.
    pub fn new(
        id: u64,
        cluster_id: String,
        tls: Option<berth_net::Tls>,
        runtime: tokio::runtime::Handle,
        handle: F,
        metrics: Metrics,
    ) -> Transport<F> {
        Transport {
            id,
            cluster_id,
            tls,
            runtime,
            handle,
            metrics,
            peers: HashMap::new(),
        }
    }

    /// Follows membership: starts senders for new peers, stops removed ones, and restarts
    /// one whose address changed.
    pub fn set_peers(&mut self, peers: &BTreeMap<u64, String>) {
        self.peers.retain(|id, sender| {
            let keep = peers.get(id) == Some(&sender.address);
            if !keep {
                sender.task.abort();
            }
            keep
        });
        for (id, address) in peers {
            if *id == self.id || self.peers.contains_key(id) {
                continue;
            }
            let channel = {
                let _guard = self.runtime.enter();
                berth_net::channel(
                    address,
                    &berth_net::NetConfig::peer()
                        .with_tls(self.tls.as_ref(), berth_net::Expect::AnyReplica),
                )
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer = id, "{e}");
                    continue;
                }
            };
            let client = PeerClient::new(channel)
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE);
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let task = self.runtime.spawn(send_loop(
                self.id,
                *id,
                self.cluster_id.clone(),
                client.clone(),
                rx,
                self.handle.clone(),
                self.metrics.clone(),
            ));
            self.peers.insert(
                *id,
                PeerSender {
                    address: address.clone(),
                    tx,
                    task,
                    client,
                },
            );
        }
    }

    /// Queues messages; returns the peers whose messages had to be dropped.
    pub fn send(&mut self, messages: Vec<Message>) -> Vec<u64> {
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        let mut unreachable = Vec::new();
        for (to, mut batch) in by_peer {
            let Some(peer) = self.peers.get(&to) else {
                unreachable.push(to);
                continue;
            };
            // Snapshots go on their own stream.
            batch.retain(|m| {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    self.runtime.spawn(send_snapshot(
                        self.id,
                        self.cluster_id.clone(),
                        peer.client.clone(),
                        m.clone(),
                        self.handle.clone(),
                    ));
                    false
                } else {
                    true
                }
            });
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            if peer.tx.try_send(batch).is_err() {
                self.metrics
                    .peer_messages_dropped
                    .with_label_values(&[to.to_string().as_str()])
                    .inc_by(n);
                unreachable.push(to);
            }
        }
        unreachable
    }
}

impl<F: PeerFeedback> Drop for Transport<F> {
    fn drop(&mut self) {
        for sender in self.peers.values() {
            sender.task.abort();
        }
    }
}

async fn send_loop<F: PeerFeedback>(
    from: u64,
    to: u64,
    cluster_id: String,
    mut client: PeerClient<Channel>,
    mut rx: mpsc::Receiver<Vec<Message>>,
    handle: F,
    metrics: Metrics,
) {
    let label = to.to_string();
    while let Some(first) = rx.recv().await {
        let mut messages: Vec<Vec<u8>> = Vec::with_capacity(first.len());
        encode_into(&mut messages, first);
        while messages.len() < 4_096 {
            match rx.try_recv() {
                Ok(more) => encode_into(&mut messages, more),
                Err(_) => break,
            }
        }
        let n = messages.len() as u64;
        let request = pb::RaftBatch {
            from,
            to,
            cluster_id: cluster_id.clone(),
            messages,
        };
        if let Err(status) = client.send(request).await {
            tracing::debug!(peer = to, %status, "raft batch not delivered");
            metrics
                .peer_messages_dropped
                .with_label_values(&[label.as_str()])
                .inc_by(n);
            handle.unreachable(to);
            // Do not spin on a dead peer: Raft resends what matters after a probe.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn encode_into(out: &mut Vec<Vec<u8>>, batch: Vec<Message>) {
    for m in batch {
        if let Ok(bytes) = m.write_to_bytes() {
            out.push(bytes);
        }
    }
}

async fn send_snapshot<F: PeerFeedback>(
    from: u64,
    cluster_id: String,
    mut client: PeerClient<Channel>,
    mut message: Message,
    handle: F,
) {
    let to = message.to;
    let data = message.mut_snapshot().take_data();
    let header = message.write_to_bytes().unwrap_or_default();
    let mut chunks = Vec::new();
    let mut offset = 0;
    loop {
        let end = (offset + SNAPSHOT_CHUNK).min(data.len());
        chunks.push(pb::SnapshotChunk {
            from,
            to,
            cluster_id: cluster_id.clone(),
            message: if offset == 0 {
                header.clone()
            } else {
                Vec::new()
            },
            data: data[offset..end].to_vec(),
            last: end == data.len(),
        });
        offset = end;
        if offset >= data.len() {
            break;
        }
    }
    let bytes = data.len();
    let result = client.send_snapshot(tokio_stream_iter(chunks)).await;
    let ok = result.is_ok();
    match result {
        Ok(_) => tracing::info!(peer = to, bytes, "snapshot sent"),
        Err(status) => tracing::warn!(peer = to, %status, "snapshot not delivered"),
    }
    handle.snapshot_status(to, ok);
    if !ok {
        handle.unreachable(to);
    }
}

fn tokio_stream_iter(
    chunks: Vec<pb::SnapshotChunk>,
) -> impl tonic::IntoStreamingRequest<Message = pb::SnapshotChunk> {
    tokio_stream::iter(chunks)
}
