//! `Peer`: Raft messages and chunked snapshots from the other replicas of this cluster.

use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::peer_server::Peer;

use super::{PeerApi, SNAPSHOT_MAX_BYTES};
use crate::service::ServiceError;

fn decode_messages(messages: &[Vec<u8>]) -> Result<Vec<Message>, ServiceError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, bytes)| {
            Message::parse_from_bytes(bytes).map_err(|e| {
                ServiceError::invalid(
                    &format!("messages[{i}]"),
                    format!("not a Raft message: {e}"),
                )
            })
        })
        .collect()
}

impl PeerApi {
    fn check_cluster(&self, cluster_id: &str) -> Result<(), ServiceError> {
        if cluster_id != self.cluster_id {
            return Err(ServiceError::Precondition(format!(
                "cluster_id: {cluster_id:?} is not this replica's cluster ({:?})",
                self.cluster_id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerApi {
    async fn send(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let batch = request.into_inner();
        self.check_cluster(&batch.cluster_id)?;
        if batch.to != self.handle.id() {
            return Err(ServiceError::Precondition(format!(
                "to: this is replica {}, not {}",
                self.handle.id(),
                batch.to
            ))
            .into());
        }
        let messages = decode_messages(&batch.messages)?;
        self.handle.step(messages)?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<Message> = None;
        let mut data: Vec<u8> = Vec::new();
        let mut done = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            self.check_cluster(&chunk.cluster_id)?;
            if header.is_none() {
                if chunk.message.is_empty() {
                    return Err(ServiceError::invalid(
                        "message",
                        "the first chunk must carry the snapshot message",
                    )
                    .into());
                }
                header = Some(Message::parse_from_bytes(&chunk.message).map_err(|e| {
                    ServiceError::invalid("message", format!("not a Raft message: {e}"))
                })?);
            }
            if data.len() + chunk.data.len() > SNAPSHOT_MAX_BYTES {
                return Err(ServiceError::Exhausted(format!(
                    "data: the snapshot exceeds {SNAPSHOT_MAX_BYTES} bytes"
                ))
                .into());
            }
            data.extend_from_slice(&chunk.data);
            if chunk.last {
                done = true;
                break;
            }
        }
        let (Some(mut message), true) = (header, done) else {
            return Err(
                ServiceError::invalid("last", "the stream ended before the last chunk").into(),
            );
        };
        message.mut_snapshot().set_data(data.into());
        self.handle.step(vec![message])?;
        Ok(Response::new(pb::RaftAck {}))
    }
}
