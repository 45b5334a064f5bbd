//! API tokens: a tenant token acts on its tenant's sandboxes only, and another tenant's
//! sandbox reads exactly like one that does not exist; tenant tokens are not admins;
//! revoked, expired, malformed and wrong tokens are refused.

use std::time::Duration;

use tonic::Code;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_proto::pb::v1::sandbox_service_client::SandboxServiceClient;

use berth_scheduler::service::local_cluster::LocalCluster;

use super::common::single_replica;
use super::{assert_status, channel, denials, spec, tls_for, token, with_token};

/// A replica with tenant tokens for `acme` and `bolt`.
async fn two_tenants(dir: &std::path::Path) -> (LocalCluster, String, String) {
    let cluster = single_replica(dir).await;
    let a = token(&cluster, pb::TokenKind::Tenant, "acme", 0).await;
    let b = token(&cluster, pb::TokenKind::Tenant, "bolt", 0).await;
    (cluster, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_see_only_their_tenant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cluster, a, b) = two_tenants(dir.path()).await;
    let client = tls_for(&cluster, "client/web");
    let mut sandboxes = SandboxServiceClient::new(channel(&cluster, Some(&client)));

    // A client certificate alone is not enough.
    let r = sandboxes
        .get_sandbox(pb::GetSandboxRequest {
            sandbox_id: "sbx-0000000001".into(),
        })
        .await;
    assert_status(r, Code::Unauthenticated, "a tenant API token is required");

    // The tenant comes from the token; another is refused.
    let created = sandboxes
        .create_sandbox(with_token(
            pb::CreateSandboxRequest {
                request_id: "a-1".into(),
                spec: Some(spec("")),
            },
            &a,
        ))
        .await
        .expect("create")
        .into_inner();
    let id = created.sandbox.expect("sandbox").id;
    let r = sandboxes
        .create_sandbox(with_token(
            pb::CreateSandboxRequest {
                request_id: "a-2".into(),
                spec: Some(spec("bolt")),
            },
            &a,
        ))
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "spec.tenant: \"bolt\" is not the tenant of this token (\"acme\")",
    );
    let mine = sandboxes
        .get_sandbox(with_token(
            pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            },
            &a,
        ))
        .await
        .expect("own sandbox")
        .into_inner();
    assert_eq!(mine.spec.expect("spec").tenant, "acme");

    // In a batch, an item naming another tenant is refused alone.
    let batch = sandboxes
        .create_sandboxes(with_token(
            pb::CreateSandboxesRequest {
                items: vec![
                    pb::CreateSandboxRequest {
                        request_id: "a-3".into(),
                        spec: Some(spec("")),
                    },
                    pb::CreateSandboxRequest {
                        request_id: "a-4".into(),
                        spec: Some(spec("bolt")),
                    },
                ],
            },
            &a,
        ))
        .await
        .expect("batch")
        .into_inner();
    use pb::create_sandbox_result::Result as Item;
    match &batch.results[..] {
        [
            pb::CreateSandboxResult {
                result: Some(Item::Created(ok)),
            },
            pb::CreateSandboxResult {
                result: Some(Item::Error(denied)),
            },
        ] => {
            let tenant = ok.sandbox.as_ref().and_then(|s| s.spec.as_ref());
            assert_eq!(tenant.map(|s| s.tenant.as_str()), Some("acme"));
            assert_eq!(denied.code, Code::PermissionDenied as i32, "{denied:?}");
            assert_eq!(
                denied.message,
                "spec.tenant: \"bolt\" is not the tenant of this token (\"acme\")"
            );
        }
        other => panic!("expected created then denied: {other:?}"),
    }

    // Another tenant's real id reads byte for byte like a random one.
    let random = "sbx-0000099999";
    let theirs = sandboxes
        .get_sandbox(with_token(
            pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            },
            &b,
        ))
        .await
        .expect_err("hidden");
    let absent = sandboxes
        .get_sandbox(with_token(
            pb::GetSandboxRequest {
                sandbox_id: random.into(),
            },
            &b,
        ))
        .await
        .expect_err("absent");
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(theirs.code(), absent.code());
    assert_eq!(
        theirs.message().replace(&id, "ID").as_bytes(),
        absent.message().replace(random, "ID").as_bytes()
    );

    // Logs, exec, files and delete of another tenant's sandbox: the same as absent.
    let logs = |sandbox_id: String| {
        with_token(
            pb::ReadLogsRequest {
                sandbox_id,
                follow: false,
            },
            &b,
        )
    };
    let theirs = sandboxes
        .read_logs(logs(id.clone()))
        .await
        .expect_err("logs");
    let absent = sandboxes
        .read_logs(logs(random.into()))
        .await
        .expect_err("logs");
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(
        theirs.message().replace(&id, "ID"),
        absent.message().replace(random, "ID")
    );
    let exec = |sandbox_id: String| {
        let start = pb::ExecRequest {
            message: Some(pb::exec_request::Message::Start(pb::ExecStart {
                sandbox_id,
                command: vec!["cat".into(), "/etc/secret".into()],
                ..Default::default()
            })),
        };
        with_token(tokio_stream::iter(vec![start]), &b)
    };
    let theirs = sandboxes.exec(exec(id.clone())).await.expect_err("exec");
    let absent = sandboxes.exec(exec(random.into())).await.expect_err("exec");
    assert_eq!(theirs.code(), Code::NotFound);
    assert_eq!(
        theirs.message().replace(&id, "ID"),
        absent.message().replace(random, "ID")
    );
    let r = sandboxes
        .read_file(with_token(
            pb::ReadFileRequest {
                sandbox_id: id.clone(),
                path: "/etc/passwd".into(),
            },
            &b,
        ))
        .await;
    assert_status(r, Code::NotFound, &format!("no sandbox {id}"));
    let write = pb::WriteFileRequest {
        message: Some(pb::write_file_request::Message::Start(pb::WriteFileStart {
            sandbox_id: id.clone(),
            path: "/tmp/x".into(),
            ..Default::default()
        })),
    };
    let r = sandboxes
        .write_file(with_token(tokio_stream::iter(vec![write]), &b))
        .await;
    assert_status(r, Code::NotFound, &format!("no sandbox {id}"));
    let deleted = sandboxes
        .delete_sandbox(with_token(
            pb::DeleteSandboxRequest {
                sandbox_id: id.clone(),
                grace_ms: 0,
            },
            &b,
        ))
        .await
        .expect("delete answers")
        .into_inner();
    assert!(!deleted.existed);
    let deleted = sandboxes
        .delete_sandboxes(with_token(
            pb::DeleteSandboxesRequest {
                sandbox_ids: vec![id.clone()],
            },
            &b,
        ))
        .await
        .expect("batch delete answers")
        .into_inner();
    assert_eq!(
        deleted.results[0].result,
        Some(pb::delete_sandbox_result::Result::Deleted(
            pb::DeleteSandboxResponse { existed: false }
        ))
    );
    let listed = sandboxes
        .list_sandboxes(with_token(pb::ListSandboxesRequest::default(), &b))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.sandboxes.is_empty(), "{listed:?}");
    // And the sandbox is still there for its tenant.
    sandboxes
        .get_sandbox(with_token(
            pb::GetSandboxRequest {
                sandbox_id: id.clone(),
            },
            &a,
        ))
        .await
        .expect("still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_tokens_are_not_admins_and_bad_tokens_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cluster, a, b) = two_tenants(dir.path()).await;
    let client = tls_for(&cluster, "client/web");
    let mut sandboxes = SandboxServiceClient::new(channel(&cluster, Some(&client)));
    let mut admin_calls = AdminServiceClient::new(channel(&cluster, Some(&client)));

    // Tenant tokens are not admins.
    let r = admin_calls
        .set_tenant_quota(with_token(pb::SetTenantQuotaRequest::default(), &a))
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "a tenant token (tenant acme) cannot call AdminService.SetTenantQuota",
    );
    let r = admin_calls
        .create_token(with_token(
            pb::CreateTokenRequest {
                kind: pb::TokenKind::Admin as i32,
                ..Default::default()
            },
            &a,
        ))
        .await;
    assert_status(
        r,
        Code::PermissionDenied,
        "a tenant token (tenant acme) cannot call AdminService.CreateToken",
    );
    // A client certificate without any token.
    let r = admin_calls
        .cluster_status(pb::ClusterStatusRequest {})
        .await;
    assert_status(
        r,
        Code::Unauthenticated,
        "AdminService needs an admin certificate or an admin token",
    );
    // An admin token does open AdminService to a client certificate.
    let admin_token = token(&cluster, pb::TokenKind::Admin, "", 0).await;
    admin_calls
        .cluster_status(with_token(pb::ClusterStatusRequest {}, &admin_token))
        .await
        .expect("an admin token is an admin");

    // Revoked, expired, malformed and wrong tokens.
    let mut admin = AdminServiceClient::new(cluster.admin_channel(&cluster.members[0].address));
    let b_id = b.split('_').nth(1).expect("id").to_owned();
    admin
        .revoke_token(pb::RevokeTokenRequest { id: b_id.clone() })
        .await
        .expect("revoke");
    let short = token(&cluster, pb::TokenKind::Tenant, "acme", 1).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let wrong = format!("berth_{b_id}_00");
    for (bad, needle) in [
        (b.as_str(), format!("API token {b_id} has been revoked")),
        (short.as_str(), "expired".into()),
        ("nonsense", "the API token is malformed".into()),
        (
            wrong.as_str(),
            "is not valid (unknown, or the secret is wrong)".into(),
        ),
    ] {
        let r = sandboxes
            .list_sandboxes(with_token(pb::ListSandboxesRequest::default(), bad))
            .await;
        assert_status(r, Code::Unauthenticated, &needle);
    }
    // The secret never comes back: listing shows ids and state only.
    let listed = admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("list")
        .into_inner();
    let text = format!("{listed:?}");
    assert!(
        !text.contains(a.rsplit('_').next().expect("secret")),
        "{text}"
    );
    assert!(listed.tokens.iter().any(|t| t.id == b_id && t.revoked));
    assert!(denials(&cluster, "SandboxService", "unauthenticated") >= 4);
}
