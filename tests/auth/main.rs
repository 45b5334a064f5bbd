//! mTLS and authorisation on a real replica process (issue #16): each refusal asserted
//! exactly, code and message. The cluster runs TLS with a local CA (`LocalCluster`).
//! `transport`: TLS itself, certificates and Raft peers; `tenants`: API tokens and tenant
//! isolation; `nodes`: node identity, status reports and joining.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod nodes;
mod rotation;
mod tenants;
mod transport;

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use berth_net::{Expect, NetConfig, Tls};
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::admin_service_client::AdminServiceClient;
use berth_scheduler::service::local_cluster::LocalCluster;

/// A certificate for `role` from the cluster's CA.
fn tls_for(cluster: &LocalCluster, role: &str) -> Tls {
    let pki = cluster.pki().expect("TLS cluster");
    Tls::load(&pki.issue(role).expect("issue"))
        .expect("load")
        .expect("secure")
}

/// A channel to the first replica with `tls` (`None`: plaintext).
fn channel(cluster: &LocalCluster, tls: Option<&Tls>) -> tonic::transport::Channel {
    let cfg = NetConfig::peer().with_tls(tls, Expect::AnyReplica);
    berth_net::channel(&cluster.members[0].address, &cfg).expect("channel")
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    r
}

fn spec(tenant: &str) -> pb::SandboxSpec {
    pb::SandboxSpec {
        tenant: tenant.into(),
        command: vec!["sleep".into(), "60".into()],
        resources: Some(pb::Resources {
            cpu_milli: 100,
            memory_mib: 64,
            gpu: None,
        }),
        ..Default::default()
    }
}

/// A new token of `kind` made with the admin certificate.
async fn token(cluster: &LocalCluster, kind: pb::TokenKind, tenant: &str, ttl_s: u64) -> String {
    token_for_node(cluster, kind, tenant, "", ttl_s).await
}

async fn token_for_node(
    cluster: &LocalCluster,
    kind: pb::TokenKind,
    tenant: &str,
    node: &str,
    ttl_s: u64,
) -> String {
    let mut admin = AdminServiceClient::new(cluster.admin_channel(&cluster.members[0].address));
    admin
        .create_token(pb::CreateTokenRequest {
            kind: kind as i32,
            tenant: tenant.into(),
            node_id: node.into(),
            ttl_s,
            ..Default::default()
        })
        .await
        .expect("create token")
        .into_inner()
        .token
}

/// The call was refused with `code` and a message containing `needle`.
fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let s = r.expect_err("must be refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "{:?} lacks {needle:?}",
        s.message()
    );
}

/// `berth_auth_denials_total` for `service` and `code` on the first replica.
fn denials(cluster: &LocalCluster, service: &str, code: &str) -> u64 {
    let text = common::metrics_at(&cluster.members[0].metrics_address);
    text.lines()
        .filter(|l| l.starts_with("berth_auth_denials_total{"))
        .filter(|l| l.contains(&format!("service=\"{service}\"")))
        .filter(|l| l.contains(&format!("code=\"{code}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Accepts any server certificate: for handshakes whose point is the server's verdict on
/// the client's certificate.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Presents the certificate in `cert`/`key` files to the first replica, bypassing every
/// client-side check (an expired certificate included), and returns how the server ended
/// the connection.
async fn server_verdict(cluster: &LocalCluster, cert: &str, key: &str) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert file")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(key).expect("key file");
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(&cluster.members[0].address)
        .await
        .expect("connect");
    let name = ServerName::try_from("berth").expect("name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    // TLS 1.3: the server judges the client's certificate after the client's Finished, so
    // its verdict arrives on the first read.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 256];
    match stream.read(&mut buf).await {
        Ok(n) => format!("the server answered {n} bytes"),
        Err(e) => e.to_string(),
    }
}
