//! Mutual TLS for every berth connection: TLS 1.3 only, rustls on ring, certificates and
//! keys from files that are re-read when they change ([`Tls`]), and SPIFFE-style identities
//! ([`identity`]) checked on both ends.
//!
//! - A server asks every client for a certificate from the cluster CA. A client without one
//!   still completes the handshake, so that `NodeService.Join` can be reached with a join
//!   token and every other call can be refused with a gRPC status that says what is missing
//!   (instead of a bare TLS alert). Which calls need which identity is the server's
//!   authorisation layer (the scheduler's `service::auth`, the agent's server).
//! - A client checks that the server's certificate chains to the CA and carries the
//!   identity it expected ([`Expect`]): a replica of this cluster, or one node.
//! - Files are polled (`reload_interval_ms`); a complete, valid new set replaces the old
//!   for new handshakes, a broken one is logged and ignored, so a half-written rotation never
//!   takes a process down. Connections already open keep the keys they were made with.

pub mod identity;
pub mod pki;
#[cfg(test)]
mod tests;
mod verify;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

use berth_proto::Validator;
pub use identity::{Identity, Role};

/// `[*.tls]` of a component's config: its certificate, key and the CA it trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM bundle of the CA certificates peers' certificates must chain to.
    pub ca: String,
    /// PEM certificate (chain, leaf first) naming this process's identity.
    pub cert: String,
    /// PEM private key of `cert` (PKCS#8, SEC1 or PKCS#1).
    pub key: String,
    /// Run without TLS and without authentication: anyone who reaches a port is an admin.
    /// For a laptop only; the process says so loudly when it starts.
    pub insecure: bool,
    /// How often the files are checked for a rotation.
    pub reload_interval_ms: u64,
}

impl Default for TlsSettings {
    fn default() -> TlsSettings {
        TlsSettings {
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            insecure: false,
            reload_interval_ms: 1_000,
        }
    }
}

impl TlsSettings {
    /// Settings naming these three files.
    pub fn files(ca: &Path, cert: &Path, key: &Path) -> TlsSettings {
        TlsSettings {
            ca: ca.display().to_string(),
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            ..TlsSettings::default()
        }
    }

    /// No TLS, no authentication.
    pub fn insecure() -> TlsSettings {
        TlsSettings {
            insecure: true,
            ..TlsSettings::default()
        }
    }

    /// Checks the settings and the files they name: each readable, the key matching the
    /// certificate, the certificate current, chaining to `ca` and naming one identity.
    /// Returns the identity (`None` when insecure).
    pub fn validate(&self, v: &mut Validator) -> Option<Identity> {
        if self.insecure {
            for (field, value) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
                v.check(value.is_empty(), field, || {
                    "must be empty with insecure = true".into()
                });
            }
            return None;
        }
        v.check(
            (100..=3_600_000).contains(&self.reload_interval_ms),
            "reload_interval_ms",
            || format!("{} is outside 100..=3600000", self.reload_interval_ms),
        );
        let mut complete = true;
        for (field, value) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if value.is_empty() {
                v.error(
                    field,
                    "missing: name a PEM file (berth cert issue makes one), or set \
                     insecure = true to run without TLS and authentication",
                );
                complete = false;
            }
        }
        if !complete {
            return None;
        }
        match Material::load(self, crate::tls::pki::unix_now()) {
            Ok(m) => Some(m.identity.clone()),
            Err(LoadError { field, message }) => {
                v.error(field, message);
                None
            }
        }
    }
}

/// A file problem, naming the settings field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// `ca`, `cert` or `key`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One consistent set of what the files hold.
#[derive(Debug)]
pub(crate) struct Material {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) certified: Arc<CertifiedKey>,
    pub(crate) identity: Identity,
    pub(crate) not_after: i64,
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| LoadError {
        field,
        message: format!("{path}: cannot read: {e}"),
    })
}

fn certs(
    field: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| LoadError {
            field,
            message: format!("{path}: not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(LoadError {
            field,
            message: format!("{path}: holds no certificate"),
        });
    }
    Ok(certs)
}

/// The CA certificates in the PEM file at `path` (the `ca` field).
fn roots(path: &str) -> Result<RootCertStore, LoadError> {
    let mut roots = RootCertStore::empty();
    for c in certs("ca", path, &read("ca", path)?)? {
        roots.add(c).map_err(|e| LoadError {
            field: "ca",
            message: format!("{path}: not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

impl Material {
    fn load(s: &TlsSettings, now_unix: i64) -> Result<Material, LoadError> {
        let provider = provider();
        let roots = roots(&s.ca)?;
        let chain = certs("cert", &s.cert, &read("cert", &s.cert)?)?;
        let key_pem = read("key", &s.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| LoadError {
            field: "key",
            message: format!("{}: not a PEM private key: {e}", s.key),
        })?;
        let certified =
            CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| LoadError {
                field: "key",
                message: format!("{}: does not match the certificate {}: {e}", s.key, s.cert),
            })?;
        let (identity, not_after) =
            identity::of_certificate(&chain[0]).map_err(|message| LoadError {
                field: "cert",
                message: format!("{}: {message}", s.cert),
            })?;
        if not_after <= now_unix {
            return Err(LoadError {
                field: "cert",
                message: format!(
                    "{}: expired {} s ago (identity {identity})",
                    s.cert,
                    now_unix - not_after
                ),
            });
        }
        let roots = Arc::new(roots);
        verify::chain(&chain[0], &chain[1..], &roots, now_unix).map_err(|e| LoadError {
            field: "cert",
            message: format!("{}: does not chain to the CA in {}: {e}", s.cert, s.ca),
        })?;
        Ok(Material {
            roots,
            certified: Arc::new(certified),
            identity,
            not_after,
        })
    }
}

/// What the three files looked like when last read: a change to any reloads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Stamp(Vec<Option<(SystemTime, u64, u64)>>);

fn stamp(s: &TlsSettings) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    Stamp(
        [&s.ca, &s.cert, &s.key]
            .iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
            })
            .collect(),
    )
}

type Current = Arc<RwLock<Arc<Material>>>;

fn current(c: &Current) -> Arc<Material> {
    c.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// A process's TLS: its identity and the CA, reloaded when the files change. Cheap to
/// clone; every clone sees a reload.
#[derive(Clone)]
pub struct Tls(Arc<Inner>);

struct Inner {
    settings: TlsSettings,
    current: Current,
    stamp: std::sync::Mutex<Stamp>,
    server: Arc<ServerConfig>,
    provider: Arc<CryptoProvider>,
    reloads: AtomicU64,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity().uri())
            .field("cert", &self.0.settings.cert)
            .finish()
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Tls) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for Tls {}

/// Which identity a client accepts from the server it dials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expect {
    /// Any replica of this cluster (clients, agents, the autoscaler, replicas dialling
    /// peers whose id they do not know).
    AnyReplica,
    /// The agent of this node.
    Node(String),
    /// Any certificate from the CA in this trust domain (an external provider).
    AnyIdentity,
}

impl Expect {
    fn admits(&self, own: &Identity, peer: &Identity) -> Result<(), String> {
        if peer.trust_domain != own.trust_domain {
            return Err(format!(
                "the server is {peer}, of cluster {:?}, not {:?}",
                peer.trust_domain, own.trust_domain
            ));
        }
        let ok = match (self, &peer.role) {
            (Expect::AnyReplica, Role::Replica(_)) => true,
            (Expect::Node(n), Role::Node(m)) => n == m,
            (Expect::AnyIdentity, _) => true,
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the server is {peer}; expected {}",
                self.describe(own)
            ))
        }
    }

    fn describe(&self, own: &Identity) -> String {
        match self {
            Expect::AnyReplica => format!("a replica (spiffe://{}/replica/N)", own.trust_domain),
            Expect::Node(n) => format!("spiffe://{}/node/{n}", own.trust_domain),
            Expect::AnyIdentity => "any identity of the cluster".into(),
        }
    }
}

impl Tls {
    /// Loads the files `settings` names; `Ok(None)` when insecure.
    pub fn load(settings: &TlsSettings) -> Result<Option<Tls>, LoadError> {
        if settings.insecure {
            return Ok(None);
        }
        let stamp_now = stamp(settings);
        let material = Arc::new(Material::load(settings, pki::unix_now())?);
        let current: Current = Arc::new(RwLock::new(material));
        let provider = provider();
        let server = verify::server_config(current.clone(), provider.clone());
        Ok(Some(Tls(Arc::new(Inner {
            settings: settings.clone(),
            current,
            stamp: std::sync::Mutex::new(stamp_now),
            server,
            provider,
            reloads: AtomicU64::new(0),
        }))))
    }

    /// This process's identity (as of the last reload).
    pub fn identity(&self) -> Identity {
        current(&self.0.current).identity.clone()
    }

    /// When the current certificate expires (Unix seconds).
    pub fn not_after(&self) -> i64 {
        current(&self.0.current).not_after
    }

    /// When the current certificate starts and stops being valid (Unix seconds).
    pub fn validity(&self) -> (i64, i64) {
        let m = current(&self.0.current);
        m.certified
            .cert
            .first()
            .and_then(|c| identity::validity(c).ok())
            .unwrap_or((0, m.not_after))
    }

    /// How many times new files were taken.
    pub fn reloads(&self) -> u64 {
        self.0.reloads.load(Ordering::Relaxed)
    }

    /// Re-reads the files if they changed. `Ok(true)`: new ones are in use.
    pub fn reload_if_changed(&self) -> Result<bool, LoadError> {
        let now = stamp(&self.0.settings);
        {
            let last = self
                .0
                .stamp
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last == now {
                return Ok(false);
            }
        }
        let material = Material::load(&self.0.settings, pki::unix_now())?;
        *self
            .0
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
        *self
            .0
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(material);
        self.0.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Polls the files every `reload_interval_ms` until every clone is dropped.
    pub fn spawn_reloader(&self) {
        let weak = Arc::downgrade(&self.0);
        let every = Duration::from_millis(self.0.settings.reload_interval_ms.max(100));
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let tls = Tls(inner);
                match tls.reload_if_changed() {
                    Ok(true) => {
                        failing = false;
                        tracing::info!(
                            identity = %tls.identity(),
                            cert = %tls.0.settings.cert,
                            not_after = tls.not_after(),
                            "tls: new certificate files in use"
                        );
                    }
                    Ok(false) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "tls: changed files are not usable yet; keeping the previous ones");
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// The server side: TLS 1.3, h2, a client certificate asked for (not required, see the
    /// module doc), this process's current certificate.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.0.server.clone()
    }

    /// The client side for dialling a server that must be `expect`.
    pub fn client_config(&self, expect: Expect) -> Arc<ClientConfig> {
        verify::client_config(self.0.current.clone(), self.0.provider.clone(), expect)
    }
}

/// A client config for a process without a certificate: the server must chain to the CA
/// in `ca` and be a replica (of any cluster: the joining node learns its cluster from the
/// certificate it is issued).
pub fn join_client_config(ca: &Path) -> Result<Arc<ClientConfig>, LoadError> {
    let roots = roots(&ca.display().to_string())?;
    Ok(verify::join_config(Arc::new(roots), provider()))
}

/// A client's TLS for one kind of server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The process's credentials.
    pub tls: Tls,
    /// Who the server must be.
    pub expect: Expect,
}
