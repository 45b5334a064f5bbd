//! Certificate rotation under traffic (issue #16): replace a replica's and an agent's
//! certificate files while `berth dev` serves creates; new handshakes present the new
//! certificates, every create is acknowledged and kept, and the agent keeps its epoch and
//! its sandbox.

use std::time::{Duration, Instant};

use berth_net::tls::pki::LocalPki;
use berth_net::{ClientTls, Expect};
use berth_proto::pb::v1 as pb;

use super::common::Dev;

const NODE: &str = "gcp-euw4-g2-0";

fn small(command: &[&str]) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: "rotation".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        resources: Some(pb::Resources {
            cpu_milli: 10,
            memory_mib: 16,
            gpu: None,
        }),
        ..Default::default()
    }
}

async fn served(address: &str, tls: &berth_net::Tls, expect: Expect) -> Vec<u8> {
    berth_net::conn::peer_certificate(
        address,
        ClientTls {
            tls: tls.clone(),
            expect,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("handshake with {address}: {e}"))
}

/// Waits until `address` presents a certificate other than `old`; returns it.
async fn rotated(address: &str, tls: &berth_net::Tls, expect: Expect, old: &[u8]) -> Vec<u8> {
    let started = Instant::now();
    loop {
        let now = served(address, tls, expect.clone()).await;
        if now != old {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{address} still presents its old certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_traffic_and_no_create_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = Dev::start(
        dir.path(),
        &[
            "--runtime",
            "process",
            "--only-node",
            NODE,
            "--no-autoscaler",
        ],
    );
    let mut client = dev.client();
    let started = Instant::now();
    let node = loop {
        let ready = client
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .ok()
            .and_then(|r| r.nodes.into_iter().next())
            .filter(|n| n.status == pb::NodeStatus::Ready as i32);
        if let Some(n) = ready {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "berth dev did not come up; log:\n{}",
            dev.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let agent = node.inventory.clone().expect("inventory").agent_address;
    let sleeper = client
        .create("sleeper", small(&["sleep", "600"]))
        .await
        .expect("create")
        .sandbox
        .expect("sandbox")
        .id;
    let started = Instant::now();
    while client
        .get(&sleeper)
        .await
        .ok()
        .and_then(|s| s.status)
        .map(|s| s.state)
        != Some(pb::SandboxState::Running as i32)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{sleeper} never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let admin = dev.admin_tls();
    let old_replica = served(&dev.endpoint, &admin, Expect::AnyReplica).await;
    let old_agent = served(&agent, &admin, Expect::Node(NODE.into())).await;

    // Creates keep flowing on one client's connections throughout.
    let mut creator = dev.client();
    let traffic = tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..150 {
            let r = creator
                .create(&format!("rot-{i}"), small(&["true"]))
                .await
                .map_err(|s| format!("create rot-{i}: {s}"))?;
            ids.push(r.sandbox.expect("sandbox").id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, String>(ids)
    });

    tokio::time::sleep(Duration::from_millis(500)).await;
    let pki = LocalPki::open(&dir.path().join("state/pki")).expect("dev's CA");
    pki.issue("replica/1").expect("new replica certificate");
    pki.issue(&format!("node/{NODE}"))
        .expect("new node certificate");
    let new_replica = rotated(&dev.endpoint, &admin, Expect::AnyReplica, &old_replica).await;
    let new_agent = rotated(&agent, &admin, Expect::Node(NODE.into()), &old_agent).await;
    for (der, uri) in [
        (&new_replica, "spiffe://berth-dev/replica/1".to_owned()),
        (&new_agent, format!("spiffe://berth-dev/node/{NODE}")),
    ] {
        let (id, _) = berth_net::tls::identity::of_certificate(der).expect("identity");
        assert_eq!(id.uri(), uri);
    }

    let ids = traffic
        .await
        .expect("traffic task")
        .expect("every create answered");
    assert_eq!(ids.len(), 150);
    for id in &ids {
        client
            .get(id)
            .await
            .expect("an acknowledged create is kept");
    }
    // The agent's stream and registration survived: same epoch, sandbox still running.
    let after = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("nodes")
        .nodes
        .into_iter()
        .next()
        .expect("the node");
    assert_eq!(after.epoch, node.epoch, "the agent re-registered");
    assert_eq!(after.status, pb::NodeStatus::Ready as i32);
    let status = client
        .get(&sleeper)
        .await
        .expect("sleeper")
        .status
        .expect("status");
    assert_eq!(status.state, pb::SandboxState::Running as i32, "{status:?}");
    assert_eq!(status.node_id, NODE);
    // Replica → agent calls work with the rotated certificates (logs are read from the
    // agent on the leader's channel to it).
    let mut logs = client
        .read_logs(&sleeper, false)
        .await
        .expect("logs through the agent");
    logs.message().await.expect("the log stream");
}
