//! Who a certificate says its holder is: a SPIFFE-style URI in its subject alternative
//! names, `spiffe://TRUST_DOMAIN/ROLE/NAME`. The trust domain is the cluster id; the role is
//! one of [`Role`]'s. A DNS name would not do: several replicas may share one host, and a
//! name carries no port.

use std::fmt;

/// What a certificate's holder is to berth.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Scheduler replica with this Raft id (`replica/1`).
    Replica(u64),
    /// Node agent of this node id (`node/gpu-7`).
    Node(String),
    /// An operator (`admin/alice`): AdminService, membership, quotas, tokens, any tenant.
    Admin(String),
    /// The autoscaler (`autoscaler/main`): the capacity view, its lease, node removal.
    Autoscaler(String),
    /// A client that acts for a tenant through an API token (`client/web-1`); the
    /// certificate alone grants nothing.
    Client(String),
    /// An external capacity provider the autoscaler calls (`provider/acme`).
    Provider(String),
}

/// A parsed identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// The cluster id.
    pub trust_domain: String,
    /// What the holder is.
    pub role: Role,
}

/// Longest name part of an identity (node ids are at most 63 characters).
const MAX_NAME: usize = 128;

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Identity {
    /// An identity in `trust_domain`.
    pub fn new(trust_domain: &str, role: Role) -> Identity {
        Identity {
            trust_domain: trust_domain.to_owned(),
            role,
        }
    }

    /// Parses `spiffe://TD/ROLE/NAME`, or says what is wrong with it.
    pub fn parse(uri: &str) -> Result<Identity, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{uri:?} is not spiffe://CLUSTER/ROLE/NAME"));
        };
        if !valid_part(td) || !valid_part(name) {
            return Err(format!(
                "{uri:?}: the cluster and name may hold only letters, digits, '-', '_' and '.'"
            ));
        }
        let role = match role {
            "replica" => Role::Replica(
                name.parse()
                    .ok()
                    .filter(|id| *id != 0)
                    .ok_or_else(|| format!("{uri:?}: a replica's name is its non-zero Raft id"))?,
            ),
            "node" => Role::Node(name.to_owned()),
            "admin" => Role::Admin(name.to_owned()),
            "autoscaler" => Role::Autoscaler(name.to_owned()),
            "client" => Role::Client(name.to_owned()),
            "provider" => Role::Provider(name.to_owned()),
            other => {
                return Err(format!(
                    "{uri:?}: unknown role {other:?} (replica, node, admin, autoscaler, client, provider)"
                ));
            }
        };
        Ok(Identity {
            trust_domain: td.to_owned(),
            role,
        })
    }

    /// The URI (`spiffe://TD/ROLE/NAME`).
    pub fn uri(&self) -> String {
        self.to_string()
    }

    /// The role's word (`replica`, `node`, ...).
    pub fn kind(&self) -> &'static str {
        match self.role {
            Role::Replica(_) => "replica",
            Role::Node(_) => "node",
            Role::Admin(_) => "admin",
            Role::Autoscaler(_) => "autoscaler",
            Role::Client(_) => "client",
            Role::Provider(_) => "provider",
        }
    }

    /// The role's word with its article, for messages: `a node`, `an admin`.
    pub fn a_kind(&self) -> String {
        let kind = self.kind();
        let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {kind}")
    }

    /// Parses the role part of a command line (`replica/1`, `node/gpu-7`, `admin/alice`).
    pub fn parse_role(trust_domain: &str, role: &str) -> Result<Identity, String> {
        Identity::parse(&format!("spiffe://{trust_domain}/{role}"))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let td = &self.trust_domain;
        match &self.role {
            Role::Replica(id) => write!(f, "spiffe://{td}/replica/{id}"),
            Role::Node(n) => write!(f, "spiffe://{td}/node/{n}"),
            Role::Admin(n) => write!(f, "spiffe://{td}/admin/{n}"),
            Role::Autoscaler(n) => write!(f, "spiffe://{td}/autoscaler/{n}"),
            Role::Client(n) => write!(f, "spiffe://{td}/client/{n}"),
            Role::Provider(n) => write!(f, "spiffe://{td}/provider/{n}"),
        }
    }
}

/// When a DER certificate starts and stops being valid (Unix seconds).
pub fn validity(der: &[u8]) -> Result<(i64, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// The identity in a DER certificate's URI SANs, and when it expires (Unix seconds).
pub fn of_certificate(der: &[u8]) -> Result<(Identity, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative names: {e}"))?
        .ok_or("the certificate has no subject alternative names (no spiffe:// identity)")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok((Identity::parse(uri)?, not_after)),
        [] => Err("the certificate has no spiffe:// URI in its subject alternative names".into()),
        _ => Err(format!(
            "the certificate names {} URIs ({}); a berth identity is exactly one",
            uris.len(),
            uris.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_bad_ones_are_named() {
        for uri in [
            "spiffe://berth-dev/replica/3",
            "spiffe://c/node/gcp-euw4-g2-0",
            "spiffe://c/admin/alice",
            "spiffe://c/autoscaler/main",
            "spiffe://c/client/web",
            "spiffe://c/provider/acme",
        ] {
            assert_eq!(Identity::parse(uri).expect(uri).uri(), uri);
        }
        for (bad, why) in [
            ("https://c/node/a", "not a spiffe:// URI"),
            ("spiffe://c/node", "not spiffe://CLUSTER/ROLE/NAME"),
            ("spiffe://c/node/a/b", "not spiffe://CLUSTER/ROLE/NAME"),
            ("spiffe://c/replica/0", "non-zero Raft id"),
            ("spiffe://c/replica/x", "non-zero Raft id"),
            ("spiffe://c/root/a", "unknown role \"root\""),
            ("spiffe://c/node/a b", "only letters"),
        ] {
            let err = Identity::parse(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
