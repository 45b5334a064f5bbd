//! Node identity: a node certificate acts for its own node only, on sandboxes bound to it,
//! and cannot call tenant or admin RPCs; joining takes a single-use, expiring join token.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use berth_net::Identity;
use berth_net::client::Credentials;
use berth_net::tls::pki::signing_request;
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use rustls_pki_types::pem::PemObject;

use super::common::agents::{AgentProcess, node_in};
use berth_scheduler::service::local_cluster::LocalClusterConfig;

use super::common::{single_replica, single_replica_with};
use super::{assert_status, channel, denials, spec, tls_for, token, token_for_node, with_token};

fn inventory(node: &str) -> pb::NodeInventory {
    pb::NodeInventory {
        node_id: node.into(),
        cpu_milli: 8_000,
        memory_mib: 8_192,
        capacity_type: pb::CapacityType::OnDemand as i32,
        ..Default::default()
    }
}

fn register(node: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(pb::agent_message::Message::Register(pb::Register {
            inventory: Some(inventory(node)),
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_acts_only_for_its_own_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let node = tls_for(&cluster, "node/n1");

    // No tenant or admin calls.
    let r = SandboxServiceClient::new(channel(&cluster, Some(&node)))
        .create_sandbox(pb::CreateSandboxRequest {
            request_id: "n".into(),
            spec: Some(spec("t")),
        })
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/node/n1 is a node certificate; SandboxService takes admin and client \
         certificates",
    );
    let mut admin_calls = AdminServiceClient::new(channel(&cluster, Some(&node)));
    let r = admin_calls
        .set_tenant_quota(pb::SetTenantQuotaRequest::default())
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/node/n1 is a node certificate; AdminService takes",
    );
    let r = admin_calls
        .create_token(pb::CreateTokenRequest::default())
        .await;
    assert_status(r, Code::PermissionDenied, "is a node certificate");

    // Not NodeService for a client certificate, not Connect without a certificate.
    let client = tls_for(&cluster, "client/web");
    let r = NodeServiceClient::new(channel(&cluster, Some(&client)))
        .connect(tokio_stream::iter(vec![register("n1")]))
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/client/web is a client certificate; NodeService takes node certificates",
    );
    let ca = cluster.pki().expect("pki").ca_path();
    let anonymous = berth_net::join_channel(&cluster.members[0].address, &ca).expect("channel");
    let r = NodeServiceClient::new(anonymous.clone())
        .connect(tokio_stream::iter(vec![register("n1")]))
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        "NodeService.Connect needs a node certificate",
    );
    let r = NodeServiceClient::new(anonymous)
        .renew_certificate(pb::RenewCertificateRequest::default())
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        "RenewCertificate needs the node's current certificate",
    );

    // Registering as another node.
    let mut as_node = berth_net::Client::new(cluster.endpoints())
        .with_credentials(Credentials {
            tls: Some(node.clone()),
            token: None,
        })
        .expect("client");
    as_node.deadline = Duration::from_secs(2);
    let r = as_node.register_node(inventory("n2")).await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/node/n1 may register only as its own node, not as n2",
    );

    // A status report for a sandbox bound to another node is refused and counted; the
    // sandbox is untouched. n2 registers (as the admin may), takes the sandbox, and n1
    // claims it exited.
    let mut admin = cluster.client();
    admin.register_node(inventory("n2")).await.expect("n2");
    let created = admin
        .create("unbound-1", spec("acme"))
        .await
        .expect("create");
    let id = created.sandbox.expect("sandbox").id;
    let before = denials(&cluster, "NodeService", "permission_denied");
    let (tx, rx) = mpsc::channel(4);
    tx.send(register("n1")).await.expect("send");
    let mut stream = NodeServiceClient::new(channel(&cluster, Some(&node)))
        .connect(ReceiverStream::new(rx))
        .await
        .expect("its own node")
        .into_inner();
    let ack = stream.message().await.expect("ack").expect("a message");
    assert!(
        matches!(
            ack.message,
            Some(pb::scheduler_message::Message::RegisterAck(_))
        ),
        "{ack:?}"
    );
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::SandboxStatus(
            pb::SandboxStatusUpdate {
                sandbox_id: id.clone(),
                state: pb::SandboxState::Exited as i32,
                exit_code: 0,
                reason: "n1 says so".into(),
                at_unix_ms: 0,
                ..Default::default()
            },
        )),
    })
    .await
    .expect("send");
    let mut counted = false;
    for _ in 0..50 {
        if denials(&cluster, "NodeService", "permission_denied") > before {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted, "the unbound report was not refused");
    let sandbox = admin.get(&id).await.expect("get");
    let status = sandbox.status.expect("status");
    assert_eq!(
        status.state,
        pb::SandboxState::Scheduled as i32,
        "{status:?}"
    );
    assert_eq!(status.node_id, "n2", "the sandbox stays on n2: {status:?}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_single_use_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let ca = cluster.pki().expect("pki").ca_path();
    let anonymous = berth_net::join_channel(&cluster.members[0].address, &ca).expect("channel");
    let mut nodes = NodeServiceClient::new(anonymous);
    let join = token(&cluster, pb::TokenKind::Join, "", 0).await;
    let (_key, csr) =
        signing_request(&Identity::parse("spiffe://x/node/j1").expect("id")).expect("csr");
    let request = |token: &str, node: &str| pb::JoinRequest {
        token: token.into(),
        node_id: node.into(),
        csr_pem: csr.clone(),
    };
    // The certificate names the node it joined as, in this cluster, whatever the request
    // asked for.
    let issued = nodes
        .join(request(&join, "j1"))
        .await
        .expect("join")
        .into_inner();
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes()).expect("pem");
    let (identity, _) = berth_net::tls::identity::of_certificate(&der).expect("identity");
    assert_eq!(identity.uri(), "spiffe://local/node/j1");

    let r = nodes.join(request(&join, "j2")).await;
    assert_status(
        r,
        Code::Unauthenticated,
        "was already used (by node j1); join tokens are single-use",
    );
    let short = token(&cluster, pb::TokenKind::Join, "", 1).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let r = nodes.join(request(&short, "j3")).await;
    assert_status(r, Code::Unauthenticated, "expired");
    let r = nodes.join(request("berth_nope_nope", "j4")).await;
    assert_status(r, Code::Unauthenticated, "the join token is not valid");
    let r = nodes.join(request("nonsense", "j4")).await;
    assert_status(r, Code::Unauthenticated, "not a join token");
    let pinned = token_for_node(&cluster, pb::TokenKind::Join, "", "gpu-7", 0).await;
    let r = nodes.join(request(&pinned, "gpu-8")).await;
    assert_status(r, Code::Unauthenticated, "is for node gpu-7, not gpu-8");
    nodes
        .join(request(&pinned, "gpu-7"))
        .await
        .expect("the node it is for");
    // A revoked join token.
    let revoked = token(&cluster, pb::TokenKind::Join, "", 0).await;
    AdminServiceClient::new(cluster.admin_channel(&cluster.members[0].address))
        .revoke_token(pb::RevokeTokenRequest {
            id: revoked.split('_').nth(1).expect("id").into(),
        })
        .await
        .expect("revoke");
    let r = nodes.join(request(&revoked, "j5")).await;
    assert_status(r, Code::Unauthenticated, "has been revoked");
    // A tenant token is not a join token.
    let tenant = token(&cluster, pb::TokenKind::Tenant, "acme", 0).await;
    let r = nodes.join(request(&tenant, "j6")).await;
    assert_status(r, Code::Unauthenticated, "the join token is not valid");

    // Join tokens are not API tokens.
    let client = tls_for(&cluster, "client/x");
    let another = token(&cluster, pb::TokenKind::Join, "", 0).await;
    let r = SandboxServiceClient::new(channel(&cluster, Some(&client)))
        .list_sandboxes(with_token(pb::ListSandboxesRequest::default(), &another))
        .await;
    assert_status(r, Code::PermissionDenied, "is a join token");

    // A joined node renews its own certificate, for its own node id only.
    let node = tls_for(&cluster, "node/j1");
    let renewed = NodeServiceClient::new(channel(&cluster, Some(&node)))
        .renew_certificate(pb::RenewCertificateRequest {
            csr_pem: signing_request(&Identity::parse("spiffe://local/node/other").expect("id"))
                .expect("csr")
                .1,
        })
        .await
        .expect("renew")
        .into_inner();
    let der: rustls_pki_types::CertificateDer<'static> =
        rustls_pki_types::pem::PemObject::from_pem_slice(renewed.cert_pem.as_bytes()).expect("pem");
    let (identity, _) = berth_net::tls::identity::of_certificate(&der).expect("identity");
    assert_eq!(identity.uri(), "spiffe://local/node/j1");
    assert!(denials(&cluster, "NodeService", "unauthenticated") >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_certificate_joins_once_with_its_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let join = token_for_node(&cluster, pb::TokenKind::Join, "", "fresh-1", 600).await;
    let mut agent = AgentProcess::new(dir.path(), "fresh-1", &cluster);
    let cert = agent.join_with(&join);
    agent.start();
    let client = cluster.client();
    let node = node_in(
        &client,
        "fresh-1",
        pb::NodeStatus::Ready,
        Duration::from_secs(30),
        &agent,
    )
    .await;
    assert_eq!(node.status, pb::NodeStatus::Ready as i32);
    // The certificate it wrote names its node in this cluster.
    let der = rustls_pki_types::CertificateDer::from_pem_file(&cert).expect("issued cert");
    let (identity, _) = berth_net::tls::identity::of_certificate(&der).expect("identity");
    assert_eq!(identity.uri(), "spiffe://local/node/fresh-1");

    // The same token again, for a second agent of the same node id: refused, and the
    // agent exits saying why.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut again = AgentProcess::new(dir2.path(), "fresh-1", &cluster);
    again.join_with(&join);
    again.start();
    let status = again.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(
        again
            .log_tail()
            .contains("was already used (by node fresh-1)"),
        "{}",
        again.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_short_lived_certificate_and_stays_registered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = LocalClusterConfig::new(env!("CARGO_BIN_EXE_berth"));
    cfg.auth_extra = "node_cert_ttl_s = 60".into();
    let cluster = single_replica_with(dir.path(), cfg).await;
    let join = token_for_node(&cluster, pb::TokenKind::Join, "", "short-1", 600).await;
    let mut agent = AgentProcess::new(dir.path(), "short-1", &cluster);
    let cert = agent.join_with(&join);
    agent.start();
    let client = cluster.client();
    let ready = |limit| node_in(&client, "short-1", pb::NodeStatus::Ready, limit, &agent);
    let before = ready(Duration::from_secs(30)).await;
    let issued = std::fs::read(&cert).expect("joined certificate");
    // A 60 s certificate is renewed at its half-life: within ~30 s the file changes.
    let started = std::time::Instant::now();
    while std::fs::read(&cert).expect("certificate") == issued {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "no renewal; agent log:\n{}",
            agent.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        agent.log_tail().contains("certificate renewed"),
        "{}",
        agent.log_tail()
    );
    // At its half-life, not at once (a renewal storm would replace it within a second).
    assert!(
        started.elapsed() >= Duration::from_secs(15),
        "renewed after {:?}",
        started.elapsed()
    );
    let after = ready(Duration::from_secs(5)).await;
    assert_eq!(
        after.epoch, before.epoch,
        "renewal must not re-register the node"
    );
}
