//! `AdminService`'s token calls: create (the secret is made here from the OS RNG, returned
//! once, and only its SHA-256 is proposed), revoke, list.

use tonic::{Request, Response, Status};

use berth_proto::pb::v1 as pb;

use super::access::token_hash;
use super::{AdminApi, only_outcome};
use crate::service::{ServiceError, Store};
use crate::state::tokens::{DESCRIPTION_LEN, TokenKind, TokenRecord};
use crate::state::{Command, ItemOutcome};

/// Default lifetime of a join token.
const JOIN_TOKEN_DEFAULT_TTL_S: u64 = 3_600;
/// Longest lifetime of an API token (0 asks for none).
const MAX_API_TOKEN_TTL_S: u64 = 10 * 365 * 24 * 3_600;

fn random_hex(bytes: usize) -> Result<String, ServiceError> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| ServiceError::Internal("the OS random generator failed".into()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A record as the API shows it.
pub(crate) fn info(t: &TokenRecord) -> pb::TokenInfo {
    let (kind, tenant, node_id) = match &t.kind {
        TokenKind::Tenant(tenant) => (pb::TokenKind::Tenant, tenant.clone(), String::new()),
        TokenKind::Admin => (pb::TokenKind::Admin, String::new(), String::new()),
        TokenKind::Join { node } => (
            pb::TokenKind::Join,
            String::new(),
            node.clone().unwrap_or_default(),
        ),
    };
    pb::TokenInfo {
        id: t.id.clone(),
        kind: kind as i32,
        tenant,
        node_id,
        created_unix_ms: t.created_ms,
        expires_unix_ms: t.expires_ms,
        revoked: t.revoked,
        used_by: t.used_by.clone().unwrap_or_default(),
        description: t.description.clone(),
    }
}

impl<S: Store> AdminApi<S> {
    pub(super) async fn create_token_call(
        &self,
        request: Request<pb::CreateTokenRequest>,
        max_join_ttl_s: u64,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.require_admin(&request, "CreateToken").await?;
        let req = request.into_inner();
        let kind = match pb::TokenKind::try_from(req.kind) {
            Ok(pb::TokenKind::Tenant) => {
                let mut v = berth_proto::Validator::new();
                v.identifier("tenant", &req.tenant, crate::model::limits::TENANT_LEN);
                v.finish().map_err(ServiceError::from)?;
                TokenKind::Tenant(req.tenant.clone())
            }
            Ok(pb::TokenKind::Admin) => TokenKind::Admin,
            Ok(pb::TokenKind::Join) => {
                if !req.node_id.is_empty() {
                    super::check_node_id("node_id", &req.node_id)?;
                }
                TokenKind::Join {
                    node: (!req.node_id.is_empty()).then(|| req.node_id.clone()),
                }
            }
            _ => {
                return Err(ServiceError::invalid(
                    "kind",
                    format!(
                        "{} is not TOKEN_KIND_TENANT, TOKEN_KIND_ADMIN or TOKEN_KIND_JOIN",
                        req.kind
                    ),
                )
                .into());
            }
        };
        if !matches!(kind, TokenKind::Tenant(_)) && !req.tenant.is_empty() {
            return Err(ServiceError::invalid("tenant", "is only for TOKEN_KIND_TENANT").into());
        }
        if !matches!(kind, TokenKind::Join { .. }) && !req.node_id.is_empty() {
            return Err(ServiceError::invalid("node_id", "is only for TOKEN_KIND_JOIN").into());
        }
        if req.description.len() > DESCRIPTION_LEN {
            return Err(ServiceError::invalid(
                "description",
                format!("{} bytes; at most {DESCRIPTION_LEN}", req.description.len()),
            )
            .into());
        }
        let ttl_s = match (&kind, req.ttl_s) {
            (TokenKind::Join { .. }, 0) => JOIN_TOKEN_DEFAULT_TTL_S.min(max_join_ttl_s),
            (TokenKind::Join { .. }, t) if t > max_join_ttl_s => {
                return Err(ServiceError::invalid(
                    "ttl_s",
                    format!(
                        "{t} is above this cluster's limit for join tokens \
                         ({max_join_ttl_s} s, scheduler.auth.max_join_token_ttl_s)"
                    ),
                )
                .into());
            }
            (_, t) if t > MAX_API_TOKEN_TTL_S => {
                return Err(ServiceError::invalid(
                    "ttl_s",
                    format!("{t} is above {MAX_API_TOKEN_TTL_S}"),
                )
                .into());
            }
            (_, t) => t,
        };
        let id = random_hex(8)?;
        let token = format!("berth_{id}_{}", random_hex(24)?);
        let now = crate::service::driver::now_ms();
        let record = TokenRecord {
            id: id.clone(),
            kind,
            hash: token_hash(&token),
            created_ms: now,
            expires_ms: if ttl_s == 0 { 0 } else { now + ttl_s * 1_000 },
            revoked: false,
            used_by: None,
            description: req.description,
        };
        let result = self
            .handle
            .command(Command::PutToken {
                token: record.clone(),
            })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(ServiceError::Rejected(r).into());
        }
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            info: Some(info(&record)),
        }))
    }

    pub(super) async fn revoke_token_call(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        self.require_admin(&request, "RevokeToken").await?;
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(ServiceError::missing("id").into());
        }
        let result = self
            .handle
            .command(Command::RevokeToken { id: id.clone() })
            .await?;
        if let ItemOutcome::Rejected(r) = only_outcome(result.outcomes)? {
            return Err(Status::not_found(format!("id: {r}")));
        }
        let record = self
            .handle
            .read(false, move |v| v.state.token(&id).map(info))
            .await?;
        record
            .map(Response::new)
            .ok_or_else(|| Status::internal("the revoked token is gone"))
    }

    pub(super) async fn list_tokens_call(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.require_admin(&request, "ListTokens").await?;
        let tokens = self
            .handle
            .read(super::linearizable(&request), |v| {
                v.state.tokens().values().map(info).collect()
            })
            .await?;
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }
}
