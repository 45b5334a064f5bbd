//! The batch calls, `CreateSandboxes` and `DeleteSandboxes`, against a real one-replica
//! `berth scheduler` process through `berth_net::Client`: one result per item in order, a
//! bad item refused alone with its field named, each item deduplicated on its own request
//! id, the 64-item limit, and deletes reporting whether each sandbox existed.

use tonic::Code;

use berth_proto::pb::MAX_BATCH_ITEMS;
use berth_proto::pb::v1 as pb;

mod common;
use common::single_replica;

fn item(request_id: &str, command: &[&str]) -> pb::CreateSandboxRequest {
    pb::CreateSandboxRequest {
        request_id: request_id.into(),
        spec: Some(pb::SandboxSpec {
            tenant: "acme".into(),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            resources: Some(pb::Resources {
                cpu_milli: 100,
                memory_mib: 64,
                gpu: None,
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_items_succeed_fail_and_deduplicate_on_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let mut client = cluster.client();

    // The second item has neither a command nor an image.
    let batch = vec![
        item("b-0", &["sleep", "60"]),
        item("b-1", &[]),
        item("b-2", &["sleep", "60"]),
        item("b-3", &["sleep", "60"]),
    ];
    let first = client.create_many(batch.clone()).await.expect("call");
    assert_eq!(first.len(), 4);
    let bad = first[1].as_ref().expect_err("item 1 is invalid");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("spec.command"), "{bad:?}");
    let mut ids = Vec::new();
    for i in [0, 2, 3] {
        let created = first[i].as_ref().expect("created");
        assert!(!created.deduplicated, "item {i}: {created:?}");
        ids.push(created.sandbox.as_ref().expect("sandbox").id.clone());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three distinct sandboxes: {ids:?}");

    // The same batch again: each good item is answered with its first result.
    let again = client.create_many(batch).await.expect("call");
    for i in [0, 2, 3] {
        let created = again[i].as_ref().expect("created");
        assert!(created.deduplicated, "item {i}: {created:?}");
        let id = |r: &pb::CreateSandboxResponse| r.sandbox.as_ref().map(|s| s.id.clone());
        assert_eq!(id(created), id(first[i].as_ref().expect("first")));
    }
    assert_eq!(
        again[1].as_ref().expect_err("still invalid").code(),
        Code::InvalidArgument
    );

    // One item past the limit refuses the whole call, naming the list.
    let too_many = (0..=MAX_BATCH_ITEMS)
        .map(|i| item(&format!("many-{i}"), &["true"]))
        .collect();
    let refused = client.create_many(too_many).await.expect_err("65 items");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("items:"), "{refused:?}");
    let too_many = vec!["sbx-0000000001".to_owned(); MAX_BATCH_ITEMS + 1];
    let refused = client.delete_many(too_many).await.expect_err("65 ids");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().starts_with("sandbox_ids:"), "{refused:?}");

    // Deletes: two that exist, one that never did, one that is not an id.
    let created = |i: usize| first[i].as_ref().expect("created").sandbox.clone();
    let a = created(0).expect("sandbox").id;
    let b = created(2).expect("sandbox").id;
    let deleted = client
        .delete_many(vec![
            a.clone(),
            b.clone(),
            "sbx-0000099999".into(),
            "nope".into(),
        ])
        .await
        .expect("call");
    assert_eq!(deleted.len(), 4);
    assert!(*deleted[0].as_ref().expect("a"));
    assert!(*deleted[1].as_ref().expect("b"));
    assert!(!*deleted[2].as_ref().expect("absent"));
    let bad = deleted[3].as_ref().expect_err("not an id");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().starts_with("sandbox_ids[3]:"), "{bad:?}");
    let twice = client.delete_many(vec![a, b]).await.expect("call");
    assert!(twice.iter().all(|r| matches!(r, Ok(false))), "{twice:?}");
    let c = created(3).expect("sandbox").id;
    assert!(client.get(&c).await.is_ok(), "the third is untouched");
}
