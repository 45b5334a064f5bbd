//! `berth token …` and `berth node token create`: API tokens (tenant, admin) and join
//! tokens. A token's secret is printed once, on stdout alone, so `TOKEN=$(berth token
//! create --tenant acme)` works; the cluster keeps only its hash.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use berth_proto::pb::v1 as pb;

use super::{CallTimeout, Endpoint, Table, emit, enum_label, parse_duration};

/// Token commands.
#[derive(Debug, Args)]
pub(crate) struct TokenArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    call: CallTimeout,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token bound to one tenant (or, with --admin, an operator token); prints it
    /// once.
    Create {
        /// The tenant the token acts for.
        #[arg(long, required_unless_present = "admin", conflicts_with = "admin")]
        tenant: Option<String>,
        /// An operator token (AdminService, membership, quotas, tokens) instead.
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. 30d or 12h (default: until revoked).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// What it is for, for the record.
        #[arg(long)]
        description: Option<String>,
    },
    /// Every token: id, kind, tenant or node, expiry, state (never a secret).
    List,
    /// Revoke a token by id (the part after `berth_` in the token).
    Revoke {
        /// Token id.
        id: String,
    },
}

/// `berth node token create`: a single-use join token for a node without a certificate.
#[derive(Debug, Args)]
pub(crate) struct JoinTokenArgs {
    /// The only node id it may join as (default: any).
    #[arg(long)]
    node: Option<String>,
    /// Lifetime (default: 1h; at most the cluster's auth.max_join_token_ttl_s).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// What it is for, for the record.
    #[arg(long)]
    description: Option<String>,
}

pub(crate) fn run(args: &TokenArgs) -> ExitCode {
    let json = args.endpoint.json();
    super::with_client("token", &args.endpoint, args.call.timeout, async |client| {
        match &args.command {
            TokenCommand::Create {
                tenant,
                admin,
                ttl,
                description,
            } => {
                let kind = if *admin {
                    pb::TokenKind::Admin
                } else {
                    pb::TokenKind::Tenant
                };
                let request = pb::CreateTokenRequest {
                    kind: kind as i32,
                    tenant: tenant.clone().unwrap_or_default(),
                    node_id: String::new(),
                    ttl_s: ttl.map_or(0, |d| d.as_secs().max(1)),
                    description: description.clone().unwrap_or_default(),
                };
                let created = client.create_token(request).await?;
                print_created(&created, json);
            }
            TokenCommand::List => {
                let mut tokens = client.list_tokens().await?;
                tokens.sort_by_key(|t| t.created_unix_ms);
                if json {
                    let all: Vec<serde_json::Value> = tokens.iter().map(token_json).collect();
                    emit(&format!("{}\n", serde_json::Value::Array(all)));
                } else {
                    emit(&table(&tokens).to_string());
                }
            }
            TokenCommand::Revoke { id } => {
                let info = client.revoke_token(id).await?;
                if json {
                    emit(&format!("{}\n", token_json(&info)));
                } else {
                    emit(&format!("{}: revoked\n", info.id));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Creates a join token (`berth node token create`).
pub(crate) fn create_join(
    endpoint: &Endpoint,
    call: &CallTimeout,
    args: &JoinTokenArgs,
) -> ExitCode {
    let json = endpoint.json();
    super::with_client("node token", endpoint, call.timeout, async |client| {
        let request = pb::CreateTokenRequest {
            kind: pb::TokenKind::Join as i32,
            tenant: String::new(),
            node_id: args.node.clone().unwrap_or_default(),
            ttl_s: args.ttl.map_or(0, |d| d.as_secs().max(1)),
            description: args.description.clone().unwrap_or_default(),
        };
        let created = client.create_token(request).await?;
        print_created(&created, json);
        Ok(ExitCode::SUCCESS)
    })
}

/// The secret alone on stdout; what it is on stderr (JSON: both on stdout).
fn print_created(created: &pb::CreateTokenResponse, json: bool) {
    let info = created.info.clone().unwrap_or_default();
    if json {
        let mut value = token_json(&info);
        value["token"] = serde_json::Value::String(created.token.clone());
        emit(&format!("{value}\n"));
        return;
    }
    emit(&format!("{}\n", created.token));
    eprintln!(
        "{} token {} ({}), expires {}: shown this once, store it now",
        kind_label(info.kind),
        info.id,
        subject(&info),
        expiry(info.expires_unix_ms),
    );
}

fn kind_label(raw: i32) -> String {
    enum_label(raw, pb::TokenKind::as_str_name, "TOKEN_KIND_")
}

/// Whom a token is for: its tenant, its node, or the operators.
fn subject(info: &pb::TokenInfo) -> String {
    match pb::TokenKind::try_from(info.kind) {
        Ok(pb::TokenKind::Tenant) => format!("tenant {}", info.tenant),
        Ok(pb::TokenKind::Join) if info.node_id.is_empty() => "any node".to_owned(),
        Ok(pb::TokenKind::Join) => format!("node {}", info.node_id),
        _ => "operators".to_owned(),
    }
}

fn expiry(unix_ms: u64) -> String {
    if unix_ms == 0 {
        "never".to_owned()
    } else {
        super::sandbox::show::format_unix_ms(unix_ms)
    }
}

fn state(info: &pb::TokenInfo) -> String {
    if info.revoked {
        "revoked".to_owned()
    } else if !info.used_by.is_empty() {
        format!("used by {}", info.used_by)
    } else {
        "active".to_owned()
    }
}

fn table(tokens: &[pb::TokenInfo]) -> Table {
    let mut table = Table::new(&["ID", "KIND", "FOR", "EXPIRES", "STATE", "DESCRIPTION"]);
    for t in tokens {
        table.row(vec![
            t.id.clone(),
            kind_label(t.kind),
            subject(t),
            expiry(t.expires_unix_ms),
            state(t),
            t.description.clone(),
        ]);
    }
    table
}

fn token_json(t: &pb::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "kind": kind_label(t.kind),
        "tenant": t.tenant,
        "node_id": t.node_id,
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": t.expires_unix_ms,
        "revoked": t.revoked,
        "used_by": t.used_by,
        "description": t.description,
    })
}
