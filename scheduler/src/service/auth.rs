//! Who may call what on a replica (ARCHITECTURE.md, "Threat model").
//!
//! Two layers. Each service is wrapped in an interceptor ([`Guard`]) that looks only at the
//! connection's certificate ([`berth_net::PeerInfo`]) and refuses the wrong kind of caller
//! before any handler runs: `Peer` takes replicas in the peer list, `NodeService` takes
//! node certificates (and, for `Join`, none), `AdminService` admins and the autoscaler (and
//! clients with an admin token), `SandboxService` admins and clients with a tenant token.
//! The handlers then resolve the caller to an [`Access`] (a token is looked up in the
//! replicated state) and check it against the sandbox, node or method at hand.
//!
//! Denials are UNAUTHENTICATED (nothing or nothing valid was presented) or
//! PERMISSION_DENIED (a valid identity that may not do this), say what was missing, and are
//! counted in `berth_auth_denials_total`. A tenant asking for another tenant's sandbox gets
//! exactly the NOT_FOUND a random id gets: the handlers look sandboxes up through
//! [`Access::covers`], so another tenant's is simply not found.

use std::sync::Arc;

use tonic::{Code, Request, Status};

use berth_net::{Identity, PeerInfo, Role};

use super::metrics::Metrics;

/// Metadata key of an API token: `authorization: Bearer berth_…`.
pub const AUTHORIZATION: &str = "authorization";

/// The connection's caller, as the interceptor saw it (in each request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The replica runs insecure: everyone is an admin.
    Insecure,
    /// A TLS client without a certificate.
    Anonymous,
    /// A TLS client with this certificate identity.
    Cert(Identity),
}

/// What a resolved caller may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Everything (an admin certificate or token, or an insecure replica).
    Admin,
    /// The autoscaler: the capacity view, its lease, listing, cordoning and removing nodes.
    Autoscaler,
    /// One tenant's sandboxes.
    Tenant(String),
}

impl Access {
    /// Whether this access may act on `tenant`'s sandboxes.
    pub fn covers(&self, tenant: &str) -> bool {
        match self {
            Access::Admin => true,
            Access::Autoscaler => false,
            Access::Tenant(t) => t == tenant,
        }
    }
}

/// What the services need to issue certificates and tokens.
pub struct Security {
    /// The cluster CA with its key, when this replica signs node certificates.
    pub ca: Option<berth_net::tls::pki::Ca>,
    /// Lifetime of issued node certificates.
    pub node_cert_ttl: std::time::Duration,
    /// Longest join token lifetime.
    pub max_join_ttl_s: u64,
}

impl Security {
    /// What `[scheduler.auth]` sets, with the CA (and its key) when this replica signs.
    pub fn new(auth: &crate::config::AuthConfig, ca: Option<berth_net::tls::pki::Ca>) -> Security {
        Security {
            ca,
            node_cert_ttl: std::time::Duration::from_secs(auth.node_cert_ttl_s),
            max_join_ttl_s: auth.max_join_token_ttl_s,
        }
    }
}

impl Default for Security {
    /// The config's defaults, no CA.
    fn default() -> Security {
        Security::new(&crate::config::AuthConfig::default(), None)
    }
}

/// The interceptors of one replica's services.
#[derive(Clone)]
pub struct Guard {
    secure: bool,
    cluster_id: Arc<str>,
    metrics: Metrics,
    peers: Arc<dyn Fn() -> Vec<u64> + Send + Sync>,
}

/// The service names used in messages and the denial metric.
pub mod service {
    /// `SandboxService`.
    pub const SANDBOX: &str = "SandboxService";
    /// `AdminService`.
    pub const ADMIN: &str = "AdminService";
    /// `NodeService`.
    pub const NODE: &str = "NodeService";
    /// `Peer`.
    pub const PEER: &str = "Peer";
}

/// Counts a refusal of a `service` call with `code` in `berth_auth_denials_total`.
pub fn count_denial(metrics: &Metrics, service: &str, code: Code) {
    metrics
        .auth_denials
        .with_label_values(&[service, code_label(code)])
        .inc();
}

/// A refusal of a `service` call, counted: every denial goes through here.
pub fn denial(metrics: &Metrics, service: &str, code: Code, message: String) -> Status {
    count_denial(metrics, service, code);
    Status::new(code, message)
}

/// The bearer token in a request's metadata, if any.
pub fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get(AUTHORIZATION)?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

/// The caller the interceptor recorded (`Insecure` if none did, e.g. in unit tests that
/// call handlers directly).
pub fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or(Caller::Insecure)
}

impl Guard {
    /// Guards for a replica of `cluster_id`; `secure` when it serves TLS; `peers` lists
    /// the current members' ids.
    pub fn new(
        secure: bool,
        cluster_id: &str,
        metrics: Metrics,
        peers: Arc<dyn Fn() -> Vec<u64> + Send + Sync>,
    ) -> Guard {
        Guard {
            secure,
            cluster_id: cluster_id.into(),
            metrics,
            peers,
        }
    }

    /// Counts and returns a denial.
    pub fn deny(&self, service: &str, code: Code, message: String) -> Status {
        denial(&self.metrics, service, code, message)
    }

    fn identity(
        &self,
        service: &'static str,
        request: &mut Request<()>,
    ) -> Result<Option<Identity>, Status> {
        if !self.secure {
            request.extensions_mut().insert(Caller::Insecure);
            return Ok(None);
        }
        let info = request.extensions().get::<PeerInfo>().cloned();
        let Some(info) = info else {
            return Err(self.deny(
                service,
                Code::Unauthenticated,
                "the connection is not TLS".into(),
            ));
        };
        if !info.tls {
            return Err(self.deny(
                service,
                Code::Unauthenticated,
                "this replica requires TLS and the connection is plaintext \
                 (connect with the cluster CA and a certificate; --insecure is only for \
                 clusters that run with tls.insecure)"
                    .into(),
            ));
        }
        if let Some(problem) = info.identity_problem {
            return Err(self.deny(
                service,
                Code::Unauthenticated,
                format!("the client certificate names no berth identity: {problem}"),
            ));
        }
        let Some(id) = info.identity else {
            request.extensions_mut().insert(Caller::Anonymous);
            return Ok(None);
        };
        if id.trust_domain != *self.cluster_id {
            return Err(self.deny(
                service,
                Code::PermissionDenied,
                format!(
                    "{id} belongs to cluster {:?}; this is cluster {:?}",
                    id.trust_domain, self.cluster_id
                ),
            ));
        }
        request.extensions_mut().insert(Caller::Cert(id.clone()));
        Ok(Some(id))
    }

    fn no_certificate(&self, service: &'static str) -> Status {
        self.deny(
            service,
            Code::Unauthenticated,
            format!(
                "{service} needs a client certificate from the cluster CA \
                 (berth cert issue, or berth dev's credentials file)"
            ),
        )
    }

    fn wrong_kind(&self, service: &'static str, id: &Identity, allowed: &str) -> Status {
        self.deny(
            service,
            Code::PermissionDenied,
            format!(
                "{id} is {} certificate; {service} takes {allowed}",
                id.a_kind()
            ),
        )
    }

    /// `SandboxService`: admins, and clients that carry a token.
    pub fn sandbox(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let s = service::SANDBOX;
        match self.identity(s, &mut request)? {
            None if !self.secure => Ok(request),
            None => Err(self.no_certificate(s)),
            Some(id) => match id.role {
                // Replicas ask the leader for usage figures; they hold the whole state anyway.
                Role::Admin(_) | Role::Replica(_) => Ok(request),
                Role::Client(_) if bearer(&request).is_some() => Ok(request),
                Role::Client(_) => Err(self.deny(
                    s,
                    Code::Unauthenticated,
                    "a tenant API token is required: metadata authorization: Bearer TOKEN \
                     (berth token create --tenant T; the CLI's --token or BERTH_TOKEN)"
                        .into(),
                )),
                _ => Err(self.wrong_kind(s, &id, "admin and client certificates")),
            },
        }
    }

    /// `AdminService`: admins, the autoscaler, and clients with an (admin) token.
    pub fn admin(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let s = service::ADMIN;
        match self.identity(s, &mut request)? {
            None if !self.secure => Ok(request),
            None => Err(self.no_certificate(s)),
            Some(id) => match id.role {
                Role::Admin(_) | Role::Autoscaler(_) => Ok(request),
                Role::Client(_) if bearer(&request).is_some() => Ok(request),
                Role::Client(_) => Err(self.deny(
                    s,
                    Code::Unauthenticated,
                    "AdminService needs an admin certificate or an admin token \
                     (metadata authorization: Bearer TOKEN)"
                        .into(),
                )),
                _ => Err(self.wrong_kind(
                    s,
                    &id,
                    "admin and autoscaler certificates, or a client with an admin token",
                )),
            },
        }
    }

    /// `NodeService`: node certificates; no certificate only for `Join` (checked there).
    pub fn node(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let s = service::NODE;
        match self.identity(s, &mut request)? {
            None => Ok(request),
            Some(id) => match id.role {
                Role::Node(_) | Role::Admin(_) => Ok(request),
                _ => Err(self.wrong_kind(s, &id, "node certificates")),
            },
        }
    }

    /// `Peer`: replicas in the current peer list.
    pub fn peer(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let s = service::PEER;
        match self.identity(s, &mut request)? {
            None if !self.secure => Ok(request),
            None => Err(self.no_certificate(s)),
            Some(id) => match id.role {
                Role::Replica(n) => {
                    let peers = (self.peers)();
                    if peers.contains(&n) {
                        Ok(request)
                    } else {
                        let list: Vec<String> = peers.iter().map(u64::to_string).collect();
                        Err(self.deny(
                            s,
                            Code::PermissionDenied,
                            format!(
                                "{id}: replica {n} is not in this cluster's peer list ({})",
                                list.join(", ")
                            ),
                        ))
                    }
                }
                _ => Err(self.wrong_kind(s, &id, "replica certificates")),
            },
        }
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::NotFound => "not_found",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> Guard {
        Guard::new(true, "local", Metrics::new(), Arc::new(|| vec![1, 2, 3]))
    }

    fn request_from(identity: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(PeerInfo {
            remote: None,
            tls: true,
            identity: identity.map(|i| Identity::parse(i).expect("identity")),
            identity_problem: None,
        });
        r
    }

    fn refusal(r: Result<Request<()>, Status>) -> (Code, String) {
        let s = r.expect_err("refused");
        (s.code(), s.message().to_owned())
    }

    #[test]
    fn another_clusters_identity_is_refused_by_every_guard() {
        let g = guard();
        let other = Some("spiffe://other/admin/x");
        let expected = (
            Code::PermissionDenied,
            "spiffe://other/admin/x belongs to cluster \"other\"; this is cluster \"local\""
                .to_owned(),
        );
        assert_eq!(refusal(g.admin(request_from(other))), expected);
        assert_eq!(refusal(g.sandbox(request_from(other))), expected);
        assert_eq!(refusal(g.node(request_from(other))), expected);
        let peer = Some("spiffe://other/replica/2");
        assert_eq!(
            refusal(g.peer(request_from(peer))).1,
            "spiffe://other/replica/2 belongs to cluster \"other\"; this is cluster \"local\""
        );
        // The same identities in this cluster pass.
        assert!(
            g.admin(request_from(Some("spiffe://local/admin/x")))
                .is_ok()
        );
        assert!(
            g.peer(request_from(Some("spiffe://local/replica/2")))
                .is_ok()
        );
    }

    #[test]
    fn a_certificate_without_an_identity_and_a_plaintext_connection_are_refused() {
        let g = guard();
        let mut r = Request::new(());
        r.extensions_mut().insert(PeerInfo {
            tls: true,
            identity_problem: Some("no URI SAN".into()),
            ..PeerInfo::default()
        });
        let (code, message) = refusal(g.admin(r));
        assert_eq!(code, Code::Unauthenticated);
        assert!(
            message.contains("names no berth identity: no URI SAN"),
            "{message}"
        );
        let mut r = Request::new(());
        r.extensions_mut().insert(PeerInfo::default());
        let (code, message) = refusal(g.sandbox(r));
        assert_eq!(code, Code::Unauthenticated);
        assert!(
            message.starts_with("this replica requires TLS"),
            "{message}"
        );
        // Every refusal was counted.
        let counted: u64 = [service::ADMIN, service::SANDBOX]
            .iter()
            .map(|s| {
                g.metrics
                    .auth_denials
                    .with_label_values(&[*s, "unauthenticated"])
                    .get()
            })
            .sum();
        assert_eq!(counted, 2);
    }
}
