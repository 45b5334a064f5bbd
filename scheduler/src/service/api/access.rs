//! Resolving a request's caller to an [`Access`]: certificates by role, API tokens by
//! their hash in the replicated state (this replica's applied copy, so a revocation takes
//! effect on a follower once it has applied it, within a replication round).

use tonic::{Code, Request, Status};

use berth_net::Role;

use super::Shared;
use crate::service::Store;
use crate::service::auth::{self, Access, Caller};
use crate::state::tokens::TokenKind;

/// A token's parts: `berth_<id>_<secret>`.
pub(crate) fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("berth_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// SHA-256 of a whole token.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl<S: Store> Shared<S> {
    pub(crate) fn denied(&self, service: &str, code: Code, message: String) -> Status {
        auth::denial(self.handle.metrics(), service, code, message)
    }

    /// Who the caller of `request` is and what it may touch. `service` names the service
    /// for messages and the denial metric.
    pub(crate) async fn access<T>(
        &self,
        service: &str,
        request: &Request<T>,
    ) -> Result<Access, Status> {
        match auth::caller(request) {
            Caller::Insecure => Ok(Access::Admin),
            Caller::Anonymous => Err(self.denied(
                service,
                Code::Unauthenticated,
                format!("{service} needs a client certificate from the cluster CA"),
            )),
            Caller::Cert(id) => match id.role {
                Role::Admin(_) | Role::Replica(_) => Ok(Access::Admin),
                Role::Autoscaler(_) => Ok(Access::Autoscaler),
                Role::Client(_) => self.token_access(service, auth::bearer(request)).await,
                _ => Err(self.denied(
                    service,
                    Code::PermissionDenied,
                    format!(
                        "{id} is {} certificate; it cannot call {service}",
                        id.a_kind()
                    ),
                )),
            },
        }
    }

    async fn token_access(&self, service: &str, token: Option<String>) -> Result<Access, Status> {
        let unauthenticated = |why: String| self.denied(service, Code::Unauthenticated, why);
        let Some(token) = token else {
            return Err(unauthenticated(
                "a tenant API token is required: metadata authorization: Bearer TOKEN".into(),
            ));
        };
        let Some((id, _)) = split_token(&token) else {
            return Err(unauthenticated(
                "the API token is malformed (expected berth_ID_SECRET)".into(),
            ));
        };
        let id = id.to_owned();
        let hash = token_hash(&token);
        let lookup = id.clone();
        let record = self
            .handle
            .read(false, move |v| v.state.token(&lookup).cloned())
            .await?;
        // Unknown and wrong secrets read the same, so ids cannot be probed.
        let Some(record) = record.filter(|r| r.hash == hash) else {
            return Err(unauthenticated(format!(
                "API token {id} is not valid (unknown, or the secret is wrong)"
            )));
        };
        if record.revoked {
            return Err(unauthenticated(format!("API token {id} has been revoked")));
        }
        let now = crate::service::driver::now_ms();
        if record.expires_ms != 0 && now >= record.expires_ms {
            return Err(unauthenticated(format!(
                "API token {id} expired {} s ago",
                (now - record.expires_ms) / 1_000
            )));
        }
        match record.kind {
            TokenKind::Tenant(t) => Ok(Access::Tenant(t)),
            TokenKind::Admin => Ok(Access::Admin),
            TokenKind::Join { .. } => Err(self.denied(
                service,
                Code::PermissionDenied,
                format!("token {id} is a join token; it only joins a node (NodeService.Join)"),
            )),
        }
    }

    /// Refuses anything but an admin (certificate, token, or an insecure replica).
    pub(crate) async fn require_admin<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Status> {
        match self.access(auth::service::ADMIN, request).await? {
            Access::Admin => Ok(()),
            Access::Autoscaler => Err(self.denied(
                auth::service::ADMIN,
                Code::PermissionDenied,
                format!("the autoscaler's certificate cannot call AdminService.{method}"),
            )),
            Access::Tenant(t) => Err(self.denied(
                auth::service::ADMIN,
                Code::PermissionDenied,
                format!("a tenant token (tenant {t}) cannot call AdminService.{method}"),
            )),
        }
    }

    /// Refuses anything but an admin or the autoscaler.
    pub(crate) async fn require_operator<T>(
        &self,
        request: &Request<T>,
        method: &str,
    ) -> Result<(), Status> {
        match self.access(auth::service::ADMIN, request).await? {
            Access::Admin | Access::Autoscaler => Ok(()),
            Access::Tenant(t) => Err(self.denied(
                auth::service::ADMIN,
                Code::PermissionDenied,
                format!("a tenant token (tenant {t}) cannot call AdminService.{method}"),
            )),
        }
    }

    /// A tenant's access for SandboxService (the autoscaler has none there).
    pub(crate) async fn sandbox_access<T>(&self, request: &Request<T>) -> Result<Access, Status> {
        let access = self.access(auth::service::SANDBOX, request).await?;
        if access == Access::Autoscaler {
            return Err(self.denied(
                auth::service::SANDBOX,
                Code::PermissionDenied,
                "the autoscaler's certificate cannot call SandboxService".into(),
            ));
        }
        Ok(access)
    }
}
