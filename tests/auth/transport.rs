//! TLS itself: plaintext, no certificate, another CA's, an expired one, another cluster's;
//! and the `Peer` service, which takes only replicas in the peer list.

use std::time::Duration;

use tonic::Code;

use berth_net::tls::pki::{LocalPki, unix_now};
use berth_net::{Identity, Tls};
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_proto::pb::v1::node_service_client::NodeServiceClient;
use berth_proto::pb::v1::peer_client::PeerClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use super::common::single_replica;
use super::{assert_status, channel, denials, server_verdict, spec, tls_for};

const PLAINTEXT: &str = "this replica requires TLS and the connection is plaintext";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_and_certificate_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;

    // Plaintext: every service says TLS is required.
    let plain = channel(&cluster, None);
    let r = SandboxServiceClient::new(plain.clone())
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "sbx-0000000001".into(),
        })
        .await;
    assert_status(r, Code::Unauthenticated, PLAINTEXT);
    let r = AdminServiceClient::new(plain.clone())
        .set_tenant_quota(pb::SetTenantQuotaRequest::default())
        .await;
    assert_status(r, Code::Unauthenticated, PLAINTEXT);
    let r = PeerClient::new(plain.clone())
        .send(pb::RaftBatch::default())
        .await;
    assert_status(r, Code::Unauthenticated, PLAINTEXT);
    let r = NodeServiceClient::new(plain)
        .join(pb::JoinRequest::default())
        .await;
    assert_status(r, Code::Unauthenticated, PLAINTEXT);

    // TLS without a client certificate.
    let ca = cluster.pki().expect("pki").ca_path();
    let anonymous = berth_net::join_channel(&cluster.members[0].address, &ca).expect("channel");
    let r = SandboxServiceClient::new(anonymous.clone())
        .create_sandbox(pb::CreateSandboxRequest {
            request_id: "a".into(),
            spec: Some(spec("t")),
        })
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        "SandboxService needs a client certificate from the cluster CA",
    );
    let r = AdminServiceClient::new(anonymous.clone())
        .cluster_status(pb::ClusterStatusRequest {})
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        "AdminService needs a client certificate",
    );
    let r = PeerClient::new(anonymous)
        .send(pb::RaftBatch::default())
        .await;
    assert_status(r, Code::Unauthenticated, "Peer needs a client certificate");

    // A certificate from another CA: the server ends the handshake.
    let other = LocalPki::create(&dir.path().join("other"), "elsewhere").expect("other CA");
    let stranger = other.issue("admin/eve").expect("issue");
    let verdict = server_verdict(&cluster, &stranger.cert, &stranger.key).await;
    assert!(verdict.contains("UnknownCA"), "{verdict}");
    // Another CA that copies the cluster CA's name: its signature does not verify.
    let forger = LocalPki::create(&dir.path().join("forger"), "local").expect("forged CA");
    let forged = forger.issue("admin/mallory").expect("issue");
    let verdict = server_verdict(&cluster, &forged.cert, &forged.key).await;
    assert!(verdict.contains("DecryptError"), "{verdict}");

    // An expired certificate from the right CA: the server refuses it, and our own
    // loader will not even present it.
    let pki = cluster.pki().expect("pki");
    let old = Identity::parse("spiffe://local/admin/old").expect("id");
    let expired = pki
        .issue_identity(&old, Duration::from_secs(60), unix_now() - 3_600)
        .expect("issue");
    let verdict = server_verdict(&cluster, &expired.cert, &expired.key).await;
    assert!(verdict.contains("CertificateExpired"), "{verdict}");
    let err = Tls::load(&expired).expect_err("expired");
    assert_eq!(err.field, "cert");
    assert!(err.message.contains("expired"), "{err}");

    // Another cluster's identity from the same CA: its own client refuses a replica of
    // another cluster, naming both.
    let foreign = Tls::load(
        &pki.issue_identity(
            &Identity::parse("spiffe://other/admin/x").expect("id"),
            Duration::from_secs(600),
            unix_now(),
        )
        .expect("issue"),
    )
    .expect("load")
    .expect("secure");
    let r = AdminServiceClient::new(channel(&cluster, Some(&foreign)))
        .cluster_status(pb::ClusterStatusRequest {})
        .await;
    assert_status(
        r,
        Code::Unavailable,
        "the server is spiffe://local/replica/1, of cluster \"local\", not \"other\"",
    );

    // Every refusal above that reached a guard was counted.
    assert!(denials(&cluster, "SandboxService", "unauthenticated") >= 2);
    assert!(denials(&cluster, "Peer", "unauthenticated") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_come_only_from_peers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;

    // An admin certificate is not a replica.
    let r = PeerClient::new(cluster.admin_channel(&cluster.members[0].address))
        .send(pb::RaftBatch::default())
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/admin/local is an admin certificate; Peer takes replica certificates",
    );
    // Neither is a node.
    let node = tls_for(&cluster, "node/n1");
    let r = PeerClient::new(channel(&cluster, Some(&node)))
        .send(pb::RaftBatch::default())
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/node/n1 is a node certificate; Peer takes replica certificates",
    );
    // A replica certificate from the cluster's CA whose id is not in the peer list.
    let outsider = tls_for(&cluster, "replica/9");
    let r = PeerClient::new(channel(&cluster, Some(&outsider)))
        .send(pb::RaftBatch::default())
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spiffe://local/replica/9: replica 9 is not in this cluster's peer list (1)",
    );
    // A replica in the list gets through to the message checks.
    let own = cluster.replica_tls(1).expect("replica certificate");
    let r = PeerClient::new(channel(&cluster, Some(&own)))
        .send(pb::RaftBatch {
            from: 1,
            to: 1,
            cluster_id: "someone-else".into(),
            messages: vec![],
        })
        .await;
    assert_status(r, Code::FailedPrecondition, "cluster_id");
    assert!(denials(&cluster, "Peer", "permission_denied") >= 3);
}
