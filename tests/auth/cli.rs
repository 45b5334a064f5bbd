//! `berth token …` and `berth node token create` against a real replica: the secret is
//! printed once on stdout alone, works as `--token`, and is refused once revoked.

use std::process::{Command, Output};

use super::common::{single_replica, text};

fn berth(creds: &std::path::Path, endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(&args[..2])
        .args(["--endpoint", endpoint, "--timeout", "10s"])
        .arg("--credentials")
        .arg(creds)
        .args(&args[2..])
        .env_remove("BERTH_TOKEN")
        .output()
        .expect("run berth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_made_listed_used_and_revoked_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let endpoint = cluster.endpoints()[0].clone();
    let pki = cluster.pki().expect("pki");
    let admin = dir.path().join("admin.toml");
    std::fs::write(
        &admin,
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.ca_path().display(),
            pki.dir.join("admin-local.pem").display(),
            pki.dir.join("admin-local.key").display()
        ),
    )
    .expect("admin credentials");
    let client = pki.issue("client/cli").expect("client cert");
    let tenant_creds = dir.path().join("tenant.toml");
    std::fs::write(
        &tenant_creds,
        format!(
            "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            client.ca, client.cert, client.key
        ),
    )
    .expect("tenant credentials");

    let out = berth(
        &admin,
        &endpoint,
        &["token", "create", "--tenant", "acme", "--ttl", "1h"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert!(
        token.starts_with("berth_"),
        "stdout is the token alone: {token:?}"
    );
    let id = token.split('_').nth(1).expect("id").to_owned();
    assert!(
        text(&out.stderr).contains(&format!("token {id} (tenant acme)"))
            && text(&out.stderr).contains("shown this once"),
        "{}",
        text(&out.stderr)
    );

    // The token lists without its secret.
    let out = berth(&admin, &endpoint, &["token", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&id) && listing.contains("tenant acme"),
        "{listing}"
    );
    assert!(!listing.contains(&token), "{listing}");

    // It works as --token with a client certificate, and only for its tenant.
    let out = berth(
        &tenant_creds,
        &endpoint,
        &["sandbox", "list", "--token", &token],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = berth(
        &tenant_creds,
        &endpoint,
        &["token", "create", "--tenant", "bolt", "--token", &token],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot call AdminService.CreateToken"),
        "{}",
        text(&out.stderr)
    );

    // Revoked, it is refused.
    let out = berth(&admin, &endpoint, &["token", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("{id}: revoked"));
    let out = berth(
        &tenant_creds,
        &endpoint,
        &["sandbox", "list", "--token", &token],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("API token {id} has been revoked")),
        "{}",
        text(&out.stderr)
    );

    // Join tokens come from `berth node token create`, pinned to a node if asked.
    let out = berth(
        &admin,
        &endpoint,
        &["node", "token", "create", "--node", "gpu-7", "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(value["kind"], "join");
    assert_eq!(value["node_id"], "gpu-7");
    assert!(
        value["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("berth_"))
    );
}
