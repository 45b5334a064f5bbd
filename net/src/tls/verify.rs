//! The rustls pieces behind [`super::Tls`]: resolvers that hand out the current
//! certificate, and verifiers that check chains against the current CA (so a reload takes
//! effect on the next handshake) and the server's identity against what the client expected.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use super::{Current, Expect, current, identity};

fn unix(now_unix: i64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(now_unix.max(0) as u64))
}

/// The handshake-signature methods both verifier traits have, checked with the
/// provider's algorithms (every verifier here has a `provider` field).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Whether `leaf` (with `intermediates`) chains to `roots` at `now_unix`.
pub(super) fn chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    now_unix: i64,
) -> Result<(), rustls::Error> {
    let provider = rustls::crypto::ring::default_provider();
    let parsed = ParsedCertificate::try_from(leaf)?;
    verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        unix(now_unix),
        provider.signature_verification_algorithms.all,
    )
}

#[derive(Debug)]
struct CurrentCert(Current);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(current(&self.0).certified.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(current(&self.0).certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client certificates: chained to the current CA; optional at the TLS layer.
#[derive(Debug)]
struct ClientCerts {
    current: Current,
    provider: Arc<CryptoProvider>,
}

impl ClientCerts {
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let roots = current(&self.current).roots.clone();
        WebPkiClientVerifier::builder_with_provider(roots, self.provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))
    }
}

impl ClientCertVerifier for ClientCerts {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!();
}

/// What a client checks a server's certificate against.
#[derive(Debug)]
enum Trust {
    /// The current CA of this process's own files; the server must be `Expect`ed.
    Own(Current, Expect),
    /// A CA file alone (a process without an identity, joining); the server must be a
    /// replica.
    Join(Arc<RootCertStore>),
}

/// Server certificates: chained to the CA and naming the expected identity. Host names are
/// not checked: identities are URIs (see [`super::identity`]).
#[derive(Debug)]
struct ServerCerts {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerCerts {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (roots, own) = match &self.trust {
            Trust::Own(c, expect) => {
                let material = current(c);
                (material.roots.clone(), Some((material, expect)))
            }
            Trust::Join(roots) => (roots.clone(), None),
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let (peer, _) = identity::of_certificate(end_entity).map_err(rustls::Error::General)?;
        match own {
            Some((material, expect)) => expect
                .admits(&material.identity, &peer)
                .map_err(rustls::Error::General)?,
            None if !matches!(peer.role, super::Role::Replica(_)) => {
                return Err(rustls::Error::General(format!(
                    "the server is {peer}, not a replica"
                )));
            }
            None => {}
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

pub(super) fn server_config(current: Current, provider: Arc<CryptoProvider>) -> Arc<ServerConfig> {
    let verifier = Arc::new(ClientCerts {
        current: current.clone(),
        provider: provider.clone(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(current)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

pub(super) fn join_config(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(ServerCerts {
        trust: Trust::Join(roots),
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

pub(super) fn client_config(
    current: Current,
    provider: Arc<CryptoProvider>,
    expect: Expect,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(ServerCerts {
        trust: Trust::Own(current.clone(), expect),
        provider: provider.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(CurrentCert(current)));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}
