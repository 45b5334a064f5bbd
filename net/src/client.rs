//! A client of a scheduler cluster that follows leader hints: the CLI, the benchmarks and
//! the tests use it.
//!
//! A call goes to the replica believed to lead. A follower's FAILED_PRECONDITION with a
//! `berth-leader` address moves the client there at once; UNAVAILABLE (a transport error,
//! or "no leader is known yet" during an election, whose `berth-leader` is empty) moves it
//! to the next endpoint after a short backoff, until the call's deadline. Creates are safe
//! to retry because they carry a request id. The batch calls (`create_many`,
//! `delete_many`) are in `client/batch.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Response, Status, Streaming};

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use crate::NetConfig;

mod batch;
use crate::tls::{Expect, Tls};

/// Adds `authorization: Bearer TOKEN` to every request when the client has a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel with the client's token on every call: what [`Client::call`] hands out.
pub type Conn = InterceptedService<Channel, Bearer>;

/// How a client authenticates: its certificate (TLS), and an API token.
#[derive(Clone, Default)]
pub struct Credentials {
    /// The certificate, key and CA (`None`: plaintext, for an insecure cluster).
    pub tls: Option<Tls>,
    /// An API token (tenant or admin), sent as `authorization: Bearer`.
    pub token: Option<String>,
}
use crate::leader::{LEADER_METADATA, READ_MODE_METADATA, is_not_leader};

/// A cluster client.
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<String>,
    current: String,
    channels: HashMap<String, Channel>,
    credentials: Credentials,
    bearer: Bearer,
    /// How long one call keeps retrying.
    pub deadline: Duration,
}

/// Whether a status means "try another replica": the replica or the network is not there,
/// or a follower said who leads. Every other answer, FAILED_PRECONDITION refusals (a wrong
/// cluster id, a node that must re-register, a sandbox with no agent to read logs from)
/// included, would be the same on retry and goes back to the caller at once.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) || is_not_leader(status)
}

impl Client {
    /// A client over these `host:port` endpoints (any replica will do).
    pub fn new(endpoints: Vec<String>) -> Client {
        let current = endpoints.first().cloned().unwrap_or_default();
        Client {
            endpoints,
            current,
            channels: HashMap::new(),
            credentials: Credentials::default(),
            bearer: Bearer::default(),
            deadline: Duration::from_secs(15),
        }
    }

    /// The same client, authenticating with `credentials`. A token that is not valid
    /// metadata is refused here rather than at the first call.
    pub fn with_credentials(mut self, credentials: Credentials) -> Result<Client, String> {
        self.bearer = match &credentials.token {
            None => Bearer(None),
            Some(t) => Bearer(Some(format!("Bearer {t}").parse().map_err(|_| {
                "the API token holds characters a header cannot".to_string()
            })?)),
        };
        self.credentials = credentials;
        self.channels.clear();
        Ok(self)
    }

    /// The credentials calls are made with.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint calls go to now.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Creates the (lazy) channel of every endpoint now, so clones of this client share
    /// connections instead of each opening its own.
    pub fn share_connections(mut self) -> Client {
        for e in self.endpoints.clone() {
            let _ = self.channel(&e);
        }
        self
    }

    fn channel(&mut self, address: &str) -> Result<Conn, Status> {
        if let Some(c) = self.channels.get(address) {
            return Ok(InterceptedService::new(c.clone(), self.bearer.clone()));
        }
        let cfg = NetConfig::peer().with_tls(self.credentials.tls.as_ref(), Expect::AnyReplica);
        let channel =
            crate::channel(address, &cfg).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.channels.insert(address.to_owned(), channel.clone());
        Ok(InterceptedService::new(channel, self.bearer.clone()))
    }

    fn rotate(&mut self) {
        let i = self
            .endpoints
            .iter()
            .position(|e| *e == self.current)
            .map_or(0, |i| (i + 1) % self.endpoints.len().max(1));
        if let Some(next) = self.endpoints.get(i) {
            self.current = next.clone();
        }
    }

    /// Calls `f` on the leader, following hints and retrying until the deadline.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let current = self.current.clone();
            let channel = self.channel(&current)?;
            let status = match f(channel).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if !retryable(&status) || started.elapsed() >= self.deadline {
                return Err(status);
            }
            let hint = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match hint {
                Some(leader) if leader != current && !leader.is_empty() => {
                    self.current = leader;
                    continue;
                }
                _ => self.rotate(),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(100));
        }
    }

    /// Creates a sandbox (idempotent on `request_id`).
    pub async fn create(
        &mut self,
        request_id: &str,
        spec: pb::SandboxSpec,
    ) -> Result<pb::CreateSandboxResponse, Status> {
        let request = pb::CreateSandboxRequest {
            request_id: request_id.to_owned(),
            spec: Some(spec),
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).create_sandbox(request).await }
        })
        .await
    }

    /// Deletes a sandbox; returns whether it existed.
    pub async fn delete(&mut self, sandbox_id: &str) -> Result<bool, Status> {
        self.delete_with_grace(sandbox_id, 0).await
    }

    /// Deletes a sandbox, giving its process `grace_ms` between SIGTERM and SIGKILL (0 = the
    /// agent's default); returns whether it existed.
    pub async fn delete_with_grace(
        &mut self,
        sandbox_id: &str,
        grace_ms: u64,
    ) -> Result<bool, Status> {
        let request = pb::DeleteSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            grace_ms,
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).delete_sandbox(request).await }
        })
        .await
        .map(|r| r.existed)
    }

    /// Reads a sandbox (linearizable, through the leader).
    pub async fn get(&mut self, sandbox_id: &str) -> Result<pb::Sandbox, Status> {
        let request = pb::GetSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).get_sandbox(request).await }
        })
        .await
    }

    /// Pauses a Running sandbox to its node's disk; answers with it PAUSING (a repeat, or
    /// a sandbox already paused, answers as it stands). With `standby`, it is frozen in
    /// place instead and answers STANDBY.
    pub async fn pause(&mut self, sandbox_id: &str, standby: bool) -> Result<pb::Sandbox, Status> {
        let request = pb::PauseSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            standby,
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).pause_sandbox(request).await }
        })
        .await
    }

    /// Resumes a Paused sandbox; answers with it on its way back (PENDING or SCHEDULED).
    pub async fn resume(&mut self, sandbox_id: &str) -> Result<pb::Sandbox, Status> {
        let request = pb::ResumeSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).resume_sandbox(request).await }
        })
        .await
    }

    /// Writes a sandbox's filesystem changes as a new image in its node's snapshot
    /// repository: the phases as they start, then the pushed reference (`reference` empty
    /// for the default name). Not retried once the stream has begun.
    pub async fn snapshot(
        &mut self,
        sandbox_id: &str,
        reference: &str,
    ) -> Result<Streaming<pb::SnapshotSandboxProgress>, Status> {
        let request = pb::SnapshotSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            reference: reference.to_owned(),
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).snapshot_sandbox(request).await }
        })
        .await
    }

    /// One page of sandboxes matching the request's filters.
    pub async fn list_sandboxes(
        &mut self,
        request: pb::ListSandboxesRequest,
    ) -> Result<pb::ListSandboxesResponse, Status> {
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).list_sandboxes(request).await }
        })
        .await
    }

    /// A `SandboxService` client on the replica calls go to now. Streaming calls (exec,
    /// file transfers) go through it once, without retries: their requests are streams.
    pub fn sandbox_service(&mut self) -> Result<SandboxServiceClient<Conn>, Status> {
        let current = self.current.clone();
        Ok(SandboxServiceClient::new(self.channel(&current)?))
    }

    /// Opens a sandbox's captured output; with `follow` the stream ends when it exits. The
    /// caller reads the stream; only opening it is retried.
    pub async fn read_logs(
        &mut self,
        sandbox_id: &str,
        follow: bool,
    ) -> Result<Streaming<pb::LogChunk>, Status> {
        let request = pb::ReadLogsRequest {
            sandbox_id: sandbox_id.to_owned(),
            follow,
        };
        self.call(|c| {
            let request = request.clone();
            async move { SandboxServiceClient::new(c).read_logs(request).await }
        })
        .await
    }

    /// Nodes matching the request's filters.
    pub async fn list_nodes(
        &mut self,
        request: pb::ListNodesRequest,
    ) -> Result<pb::ListNodesResponse, Status> {
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).list_nodes(request).await }
        })
        .await
    }

    /// Pending demand grouped by shape, and every node with its free capacity: what the
    /// autoscaler decides from.
    pub async fn capacity_view(&mut self) -> Result<pb::CapacityViewResponse, Status> {
        self.call(|c| async move {
            AdminServiceClient::new(c)
                .capacity_view(pb::CapacityViewRequest {})
                .await
        })
        .await
    }

    /// Forgets a node that holds no sandboxes.
    pub async fn remove_node(&mut self, node_id: &str) -> Result<(), Status> {
        let request = node_request(node_id, "");
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).remove_node(request).await }
        })
        .await
        .map(|_| ())
    }

    /// Takes or renews the autoscaler lease, recording `decisions` when granted.
    pub async fn autoscaler_lease(
        &mut self,
        holder: &str,
        ttl_ms: u64,
        decisions: Vec<String>,
    ) -> Result<pb::AutoscalerLeaseResponse, Status> {
        let request = pb::AutoscalerLeaseRequest {
            holder: holder.to_owned(),
            ttl_ms,
            decisions,
        };
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).autoscaler_lease(request).await }
        })
        .await
    }

    /// Stops placing new sandboxes on a node; returns the node as it is now.
    pub async fn cordon(&mut self, node_id: &str, reason: &str) -> Result<pb::Node, Status> {
        let request = node_request(node_id, reason);
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).cordon_node(request).await }
        })
        .await
    }

    /// Makes a cordoned or draining node ready again.
    pub async fn uncordon(&mut self, node_id: &str) -> Result<pb::Node, Status> {
        let request = node_request(node_id, "");
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).uncordon_node(request).await }
        })
        .await
    }

    /// Cordons a node and marks it for removal once its sandboxes finish.
    pub async fn drain(&mut self, node_id: &str, reason: &str) -> Result<pb::Node, Status> {
        let request = node_request(node_id, reason);
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).drain_node(request).await }
        })
        .await
    }

    /// Cluster status as the current endpoint sees it.
    pub async fn status(&mut self) -> Result<pb::ClusterStatusResponse, Status> {
        self.call(|c| async move {
            AdminServiceClient::new(c)
                .cluster_status(pb::ClusterStatusRequest {})
                .await
        })
        .await
    }

    /// Adds a replica.
    pub async fn add_peer(
        &mut self,
        peer_id: u64,
        address: &str,
        as_learner: bool,
    ) -> Result<pb::MembershipResponse, Status> {
        let request = pb::AddPeerRequest {
            peer_id,
            address: address.to_owned(),
            as_learner,
        };
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).add_peer(request).await }
        })
        .await
    }

    /// Registers a node the way an agent does (opens `NodeService.Connect`, sends
    /// `Register`, waits for the ack) and closes the stream; returns the node's epoch.
    pub async fn register_node(&mut self, inventory: pb::NodeInventory) -> Result<u64, Status> {
        let message = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Register(pb::Register {
                inventory: Some(inventory),
                running: Vec::new(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            })),
        };
        let ack = self
            .call(|c| {
                let message = message.clone();
                async move {
                    let mut client = NodeServiceClient::new(c);
                    let mut stream = client
                        .connect(tokio_stream::iter(vec![message]))
                        .await?
                        .into_inner();
                    let first = stream.message().await?.ok_or_else(|| {
                        Status::unavailable("the scheduler closed the stream before answering")
                    })?;
                    match first.message {
                        Some(pb::scheduler_message::Message::RegisterAck(ack)) => {
                            Ok(Response::new(ack))
                        }
                        Some(pb::scheduler_message::Message::NotLeader(nl)) => Err(
                            crate::leader::not_leader_status(nl.leader_id, &nl.leader_address),
                        ),
                        _ => Err(Status::internal(
                            "unexpected first message from the scheduler",
                        )),
                    }
                }
            })
            .await?;
        Ok(ack.epoch)
    }

    /// Creates an API or join token; the response holds its secret, shown this once.
    pub async fn create_token(
        &mut self,
        request: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Status> {
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).create_token(request).await }
        })
        .await
    }

    /// Revokes a token by id; returns it as it is now.
    pub async fn revoke_token(&mut self, id: &str) -> Result<pb::TokenInfo, Status> {
        let request = pb::RevokeTokenRequest { id: id.to_owned() };
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).revoke_token(request).await }
        })
        .await
    }

    /// Every token's record (never a secret).
    pub async fn list_tokens(&mut self) -> Result<Vec<pb::TokenInfo>, Status> {
        let r = self
            .call(|c| async move {
                AdminServiceClient::new(c)
                    .list_tokens(pb::ListTokensRequest {})
                    .await
            })
            .await?;
        Ok(r.tokens)
    }

    /// Sets or replaces a warm pool.
    pub async fn set_warm_pool(
        &mut self,
        request: pb::SetWarmPoolRequest,
    ) -> Result<pb::WarmPool, Status> {
        self.call(|c| {
            let request = request.clone();
            async move { AdminServiceClient::new(c).set_warm_pool(request).await }
        })
        .await
    }

    /// Deletes a warm pool and its unclaimed members.
    pub async fn delete_warm_pool(&mut self, name: &str) -> Result<(), Status> {
        self.call(|c| async move {
            AdminServiceClient::new(c)
                .delete_warm_pool(pb::DeleteWarmPoolRequest { name: name.into() })
                .await
        })
        .await
        .map(|_| ())
    }

    /// Every warm pool, with its ready and warming members.
    pub async fn list_warm_pools(&mut self) -> Result<Vec<pb::WarmPool>, Status> {
        let r = self
            .call(|c| async move {
                AdminServiceClient::new(c)
                    .list_warm_pools(pb::ListWarmPoolsRequest {})
                    .await
            })
            .await?;
        Ok(r.pools)
    }

    /// Removes a replica.
    pub async fn remove_peer(&mut self, peer_id: u64) -> Result<pb::MembershipResponse, Status> {
        self.call(|c| async move {
            AdminServiceClient::new(c)
                .remove_peer(pb::RemovePeerRequest { peer_id })
                .await
        })
        .await
    }
}

fn node_request(node_id: &str, reason: &str) -> pb::NodeRequest {
    pb::NodeRequest {
        node_id: node_id.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Reads every sandbox id in one replica's applied state (`berth-read: local`), following
/// pages. Tests use it to check what each replica holds.
pub async fn local_sandbox_ids(address: &str, tls: Option<&Tls>) -> Result<Vec<String>, Status> {
    let channel = crate::channel(
        address,
        &NetConfig::peer().with_tls(tls, Expect::AnyReplica),
    )
    .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut client = SandboxServiceClient::new(channel);
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let mut request = tonic::Request::new(pb::ListSandboxesRequest {
            page_size: 1_000,
            page_token: token.clone(),
            ..Default::default()
        });
        request.metadata_mut().insert(
            READ_MODE_METADATA,
            tonic::metadata::MetadataValue::from_static("local"),
        );
        let page = client.list_sandboxes(request).await?.into_inner();
        ids.extend(page.sandboxes.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            return Ok(ids);
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leader::not_leader_status;

    #[test]
    fn only_not_leader_answers_and_unreachable_replicas_are_retried() {
        // A follower's answer, with or without a known leader (UNAVAILABLE while none is).
        assert!(retryable(&not_leader_status(2, "127.0.0.1:7071")));
        assert!(retryable(&not_leader_status(0, "")));
        assert_eq!(not_leader_status(0, "").code(), Code::Unavailable);
        assert!(retryable(&Status::unavailable("connection refused")));
        // Refusals that every replica would repeat go straight back.
        for refusal in [
            Status::failed_precondition("cluster_id: \"other\" is not this replica's cluster"),
            Status::failed_precondition("node n1 must re-register"),
            Status::failed_precondition("sandbox_id: sbx-1 has not been placed on a node yet"),
            Status::invalid_argument("spec.resources.cpu_milli: must be > 0"),
            Status::not_found("sandbox sbx-1 does not exist"),
        ] {
            assert!(!retryable(&refusal), "{refusal:?}");
        }
    }
}
