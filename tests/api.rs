//! The gRPC API against a real one-replica `berth scheduler` process: bad input gets the
//! right status code naming the field, and the replica keeps serving afterwards.

use std::time::Duration;

use tonic::Code;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_proto::pb::v1::peer_client::PeerClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

mod common;
use common::single_replica;

fn valid_spec() -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "acme".into(),
        image: "python:3.12".into(),
        command: vec!["python".into()],
        resources: Some(pb::Resources {
            cpu_milli: 500,
            memory_mib: 512,
            gpu: None,
        }),
        ..Default::default()
    }
}

async fn create_err(
    client: &mut SandboxServiceClient<tonic::transport::Channel>,
    request: pb::CreateSandboxRequest,
) -> tonic::Status {
    match client.create_sandbox(request).await {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field_and_the_replica_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let address = cluster.members[0].address.clone();
    let channel = cluster.admin_channel(&address);
    let mut sandboxes = SandboxServiceClient::new(channel.clone());

    // No spec.
    let s = create_err(
        &mut sandboxes,
        pb::CreateSandboxRequest {
            request_id: "r1".into(),
            spec: None,
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("spec"), "{}", s.message());

    // Empty request id and a bad GPU spec, reported together.
    let mut spec = valid_spec();
    spec.resources = Some(pb::Resources {
        cpu_milli: 500,
        memory_mib: 512,
        gpu: Some(pb::GpuRequest {
            options: vec!["H100:99".into()],
            min_memory_mib: 0,
        }),
    });
    let s = create_err(
        &mut sandboxes,
        pb::CreateSandboxRequest {
            request_id: String::new(),
            spec: Some(spec),
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("request_id"), "{}", s.message());
    assert!(
        s.message().contains("spec.resources.gpu.options[0]"),
        "{}",
        s.message()
    );

    // Zero CPU.
    let mut spec = valid_spec();
    spec.resources = Some(pb::Resources {
        cpu_milli: 0,
        memory_mib: 512,
        gpu: None,
    });
    let s = create_err(
        &mut sandboxes,
        pb::CreateSandboxRequest {
            request_id: "r2".into(),
            spec: Some(spec),
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("spec.resources.cpu_milli"),
        "{}",
        s.message()
    );

    // An env above the spec's limit.
    let mut spec = valid_spec();
    spec.env.insert("BIG".into(), "x".repeat(100 * 1024));
    let s = create_err(
        &mut sandboxes,
        pb::CreateSandboxRequest {
            request_id: "r3".into(),
            spec: Some(spec),
        },
    )
    .await;
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("spec.env"), "{}", s.message());

    // An oversized request.
    let mut spec = valid_spec();
    spec.command = (0..40).map(|_| "y".repeat(64 * 1024)).collect();
    let s = create_err(
        &mut sandboxes,
        pb::CreateSandboxRequest {
            request_id: "r4".into(),
            spec: Some(spec),
        },
    )
    .await;
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().starts_with("spec.command"), "{}", s.message());

    // Malformed ids and paging.
    let s = sandboxes
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "not-an-id".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("sandbox_id"), "{}", s.message());
    let s = sandboxes
        .list_sandboxes(pb::ListSandboxesRequest {
            page_size: 5_000,
            ..Default::default()
        })
        .await
        .expect_err("page too large");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("page_size"), "{}", s.message());
    let s = sandboxes
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "sbx-0000009999".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(s.code(), Code::NotFound);

    // Peers: another cluster's traffic and garbage Raft messages are refused (sent with a
    // replica certificate in the peer list: the guard lets it through to the checks).
    let replica = cluster.replica_tls(1).expect("replica certificate");
    let peer_cfg =
        berth_net::NetConfig::peer().with_tls(Some(&replica), berth_net::Expect::AnyReplica);
    let mut peer = PeerClient::new(berth_net::channel(&address, &peer_cfg).expect("channel"));
    let s = peer
        .send(pb::RaftBatch {
            from: 2,
            to: 1,
            cluster_id: "someone-else".into(),
            messages: vec![],
        })
        .await
        .expect_err("foreign cluster");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("cluster_id"), "{}", s.message());
    let s = peer
        .send(pb::RaftBatch {
            from: 2,
            to: 1,
            cluster_id: "local".into(),
            messages: vec![vec![0xff, 0xff, 0xff]],
        })
        .await
        .expect_err("garbage");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("messages[0]"), "{}", s.message());

    // Admin input.
    let mut admin = AdminServiceClient::new(channel.clone());
    let s = admin
        .add_peer(pb::AddPeerRequest {
            peer_id: 0,
            address: "nowhere".into(),
            as_learner: true,
        })
        .await
        .expect_err("bad peer");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("peer_id"), "{}", s.message());
    assert!(s.message().contains("address"), "{}", s.message());

    // Still serving: a valid create succeeds and is idempotent.
    let mut client = cluster.client_of(vec![address]);
    let first = client.create("ok-1", valid_spec()).await.expect("create");
    let again = client.create("ok-1", valid_spec()).await.expect("retry");
    assert!(!first.deduplicated);
    assert!(again.deduplicated);
    assert_eq!(
        first.sandbox.map(|s| s.id),
        again.sandbox.map(|s| s.id),
        "a retry returns the original sandbox"
    );
    let status = client.status().await.expect("status");
    assert_eq!(status.invariant_violations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_node_would_refuse_is_invalid_argument_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let address = cluster.members[0].address.clone();
    let channel = cluster.admin_channel(&address);
    let mut sandboxes = SandboxServiceClient::new(channel);
    let cases: Vec<(&str, pb::SandboxSpec, &str)> = vec![
        (
            "nul-arg",
            pb::SandboxSpec {
                command: vec!["sh".into(), "-c".into(), "echo \0".into()],
                ..valid_spec()
            },
            "spec.command[2]: contains a NUL byte",
        ),
        (
            "eq-key",
            pb::SandboxSpec {
                env: [("A=B".to_string(), "1".to_string())].into(),
                ..valid_spec()
            },
            "spec.env[\"A=B\"]: the name contains '='",
        ),
        (
            "empty-key",
            pb::SandboxSpec {
                env: [(String::new(), "1".to_string())].into(),
                ..valid_spec()
            },
            "spec.env[\"\"]: the name is empty",
        ),
        (
            "nul-key",
            pb::SandboxSpec {
                env: [("A\0".to_string(), "1".to_string())].into(),
                ..valid_spec()
            },
            "spec.env[\"A\\0\"]: the name contains a NUL byte",
        ),
        (
            "nul-value",
            pb::SandboxSpec {
                env: [("A".to_string(), "\0".to_string())].into(),
                ..valid_spec()
            },
            "spec.env[\"A\"]: the value contains a NUL byte",
        ),
        (
            "bad-image",
            pb::SandboxSpec {
                image: "Registry:99999/Python:3.12".into(),
                ..valid_spec()
            },
            "spec.image: \"Registry:99999/Python:3.12\" is not an image reference: registry",
        ),
        (
            "nothing-to-run",
            pb::SandboxSpec {
                image: String::new(),
                command: vec![],
                ..valid_spec()
            },
            "spec.command: required when spec.image is empty and spec.keep_alive is false",
        ),
    ];
    for (request_id, spec, expected) in cases {
        let s = create_err(
            &mut sandboxes,
            pb::CreateSandboxRequest {
                request_id: request_id.into(),
                spec: Some(spec),
            },
        )
        .await;
        assert_eq!(s.code(), Code::InvalidArgument, "{request_id}: {s:?}");
        assert!(
            s.message().starts_with(expected),
            "{request_id}: {}",
            s.message()
        );
    }
    // An image and no command is fine: the image's entrypoint runs.
    let created = sandboxes
        .create_sandbox(pb::CreateSandboxRequest {
            request_id: "image-only".into(),
            spec: Some(pb::SandboxSpec {
                image: "127.0.0.1:5000/busybox:1".into(),
                command: vec![],
                ..valid_spec()
            }),
        })
        .await
        .expect("an image without a command");
    assert!(created.into_inner().sandbox.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let mut client = cluster.client();
    client.create("m-1", valid_spec()).await.expect("create");
    // /metrics over plain HTTP.
    let body = http_get(&cluster.members[0].metrics_address, "/metrics").await;
    for name in [
        "berth_raft_term",
        "berth_raft_commit_index",
        "berth_raft_applied_index",
        "berth_raft_leader_changes_total",
        "berth_raft_proposals_total",
        "berth_create_batch_size",
        "berth_apply_seconds",
        "berth_placement_batch_seconds",
        "berth_sandboxes",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    assert!(body.contains("berth_raft_is_leader 1"), "{body}");
    // gRPC health.
    let channel = cluster.admin_channel(&cluster.members[0].address);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "berth.v1.SandboxService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to metrics");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_the_current_state_then_changes_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let mut client = cluster.client();
    let before = client
        .create("w-0", valid_spec())
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    let channel = cluster.admin_channel(&cluster.members[0].address);
    let mut sandboxes = SandboxServiceClient::new(channel);

    // A bad id is refused, naming it.
    let s = sandboxes
        .watch_sandboxes(pb::WatchSandboxesRequest {
            sandbox_ids: vec!["nope".into()],
            ..Default::default()
        })
        .await
        .expect_err("bad id");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("sandbox_ids[0]"), "{}", s.message());

    let mut events = sandboxes
        .watch_sandboxes(pb::WatchSandboxesRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .expect("stream ok")
            .expect("stream open")
    };
    // The current state first.
    let first = next().await;
    assert_eq!(first.kind, pb::sandbox_event::Kind::Upserted as i32);
    assert_eq!(first.sandbox.expect("sandbox").id, before);
    // A new sandbox in the tenant, then its deletion.
    let created = client
        .create("w-1", valid_spec())
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    let mut seen_create = false;
    while !seen_create {
        let e = next().await;
        seen_create = e.kind == pb::sandbox_event::Kind::Upserted as i32
            && e.sandbox.as_ref().is_some_and(|s| s.id == created);
    }
    assert!(client.delete(&created).await.expect("delete"));
    loop {
        let e = next().await;
        if e.kind == pb::sandbox_event::Kind::Deleted as i32 {
            assert_eq!(e.sandbox.expect("sandbox").id, created);
            assert!(e.revision > first.revision);
            break;
        }
    }
}
