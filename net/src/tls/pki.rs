//! Certificates made with `rcgen`: a cluster CA, certificates it issues for an identity,
//! and the key and signing request a joining node sends. `berth dev`, `berth cert`, the
//! join flow on the replicas and the tests use it.
//!
//! Keys are ECDSA P-256. Every issued certificate carries exactly one identity URI and
//! both the server and the client extended key usage: replicas and agents are both.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::identity::Identity;

/// A certificate and its key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate (for an issued one: leaf only; the CA is distributed on its own).
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

/// A certificate authority that can issue certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

fn err(what: &str) -> impl FnOnce(rcgen::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn validity(params: &mut CertificateParams, ttl: Duration, now_unix: i64) -> Result<(), String> {
    let now = time::OffsetDateTime::from_unix_timestamp(now_unix)
        .map_err(|e| format!("the clock: {e}"))?;
    // Slack for clocks that disagree a little: a minute, or a tenth of a short lifetime
    // (so the half-life that agents renew at always lies ahead of the issuing time).
    let slack = ttl.as_secs().div_ceil(10).min(60) as i64;
    params.not_before = now - time::Duration::seconds(slack);
    params.not_after = now + time::Duration::try_from(ttl).map_err(|e| format!("ttl: {e}"))?;
    Ok(())
}

/// Seconds since the Unix epoch, for certificate validity.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn leaf_params(identity: &Identity) -> Result<CertificateParams, String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.uri());
    dn.push(DnType::OrganizationName, "berth");
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        identity
            .uri()
            .try_into()
            .map_err(|e| format!("identity {identity}: {e}"))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Ca {
    /// A new self-signed CA for `trust_domain`, valid for `ttl`.
    pub fn create(trust_domain: &str, ttl: Duration) -> Result<(Ca, String), String> {
        let key = KeyPair::generate().map_err(err("generating the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("berth CA {trust_domain}"));
        dn.push(DnType::OrganizationName, "berth");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, ttl, unix_now())?;
        let cert = params
            .self_signed(&key)
            .map_err(err("self-signing the CA"))?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
                cert_pem,
            },
            key_pem,
        ))
    }

    /// The CA in these PEM files (the certificate and its key).
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, String> {
        let cert_pem = std::fs::read_to_string(cert)
            .map_err(|e| format!("{}: cannot read: {e}", cert.display()))?;
        let key_pem = std::fs::read_to_string(key)
            .map_err(|e| format!("{}: cannot read: {e}", key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| format!("{}: not a private key: {e}", key_pem_name(key)))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| format!("{}: not a CA certificate: {e}", cert.display()))?;
        Ok(Ca { issuer, cert_pem })
    }

    /// A new key and a certificate for `identity`, valid for `ttl` from `now_unix`.
    pub fn issue(&self, identity: &Identity, ttl: Duration, now_unix: i64) -> Result<Pem, String> {
        let key = KeyPair::generate().map_err(err("generating a key"))?;
        let mut params = leaf_params(identity)?;
        validity(&mut params, ttl, now_unix)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(err("signing the certificate"))?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// A certificate for `identity` over the public key of a signing request (PEM). The
    /// request's own names are ignored: the CA decides who the holder is.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
        now_unix: i64,
    ) -> Result<String, String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("not a certificate signing request: {e}"))?;
        let mut params = leaf_params(identity)?;
        validity(&mut params, ttl, now_unix)?;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(err("signing the request"))?;
        Ok(cert.pem())
    }
}

/// A CA and the certificates it issued, as files in one directory: what `berth dev`,
/// local clusters and the tests run on. `ca.pem`/`ca.key`, then `ROLE-NAME.pem`/`.key` per
/// identity. Keys are written owner-only.
pub struct LocalPki {
    /// The directory.
    pub dir: std::path::PathBuf,
    /// The CA.
    pub ca: Ca,
    /// The trust domain (cluster id).
    pub trust_domain: String,
}

/// Lifetime of a local CA.
pub const LOCAL_CA_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3_600);
/// Lifetime of the certificates a local PKI issues.
pub const LOCAL_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3_600);

impl LocalPki {
    /// A new CA for `trust_domain` in `dir` (created).
    pub fn create(dir: &Path, trust_domain: &str) -> Result<LocalPki, String> {
        let (ca, key) = Ca::create(trust_domain, LOCAL_CA_TTL)?;
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |e: std::io::Error| format!("{p}: {e}")
        };
        write_public(&dir.join("ca.pem"), &ca.cert_pem).map_err(io(&dir.join("ca.pem")))?;
        write_private(&dir.join("ca.key"), &key).map_err(io(&dir.join("ca.key")))?;
        Ok(LocalPki {
            dir: dir.to_path_buf(),
            ca,
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The CA already in `dir` (`ca.pem` and `ca.key`); its trust domain is read from the
    /// CA's name (`berth CA <trust domain>`, as `create` writes it).
    pub fn open(dir: &Path) -> Result<LocalPki, String> {
        let ca = Ca::load(&dir.join("ca.pem"), &dir.join("ca.key"))?;
        let trust_domain = ca_trust_domain(&ca.cert_pem)
            .map_err(|e| format!("{}: {e}", dir.join("ca.pem").display()))?;
        Ok(LocalPki {
            dir: dir.to_path_buf(),
            ca,
            trust_domain,
        })
    }

    /// The CA certificate's path.
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA key's path.
    pub fn ca_key_path(&self) -> std::path::PathBuf {
        self.dir.join("ca.key")
    }

    /// The file stem of an identity's certificate and key (`replica-1`, `node-gpu-7`).
    pub fn stem(identity: &Identity) -> String {
        let uri = identity.uri();
        let path = uri.rsplitn(3, '/').collect::<Vec<_>>();
        format!(
            "{}-{}",
            path.get(1).unwrap_or(&"x"),
            path.first().unwrap_or(&"x")
        )
    }

    /// Issues a certificate for `role` (`replica/1`, `admin/dev`) and writes it; returns
    /// the settings naming the files.
    pub fn issue(&self, role: &str) -> Result<super::TlsSettings, String> {
        let identity = Identity::parse_role(&self.trust_domain, role)?;
        self.issue_identity(&identity, LOCAL_CERT_TTL, unix_now())
    }

    /// Issues a certificate for `identity` valid for `ttl` from `now_unix` (a past
    /// `now_unix` makes an expired one, for tests) and writes it.
    pub fn issue_identity(
        &self,
        identity: &Identity,
        ttl: Duration,
        now_unix: i64,
    ) -> Result<super::TlsSettings, String> {
        let pem = self.ca.issue(identity, ttl, now_unix)?;
        let stem = LocalPki::stem(identity);
        let cert = self.dir.join(format!("{stem}.pem"));
        let key = self.dir.join(format!("{stem}.key"));
        write_private(&key, &pem.key).map_err(|e| format!("{}: {e}", key.display()))?;
        write_public(&cert, &pem.cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        Ok(super::TlsSettings::files(&self.ca_path(), &cert, &key))
    }
}

fn key_pem_name(path: &Path) -> String {
    path.display().to_string()
}

/// The trust domain in a berth CA certificate's common name (`berth CA <trust domain>`).
fn ca_trust_domain(cert_pem: &str) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::*;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default();
    cn.strip_prefix("berth CA ")
        .filter(|td| !td.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("not a berth CA (its name is {cn:?}, not \"berth CA <cluster>\")"))
}

/// A new key and a signing request for it (both PEM): what a joining node sends.
pub fn signing_request(identity: &Identity) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(err("generating a key"))?;
    // A request carries only the name asked for; the CA sets usages and validity.
    let mut params = CertificateParams::default();
    params.distinguished_name = leaf_params(identity)?.distinguished_name;
    params.subject_alt_names = leaf_params(identity)?.subject_alt_names;
    let csr = params
        .serialize_request(&key)
        .map_err(err("making the signing request"))?;
    let csr_pem = csr.pem().map_err(err("encoding the signing request"))?;
    Ok((key.serialize_pem(), csr_pem))
}

/// Writes `text` to `path` readable by its owner only (keys, tokens), replacing it in one
/// rename so a reader never sees half a file.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    write_with_mode(path, text, 0o600)
}

/// Writes `text` to `path` (certificates), replacing it in one rename.
pub fn write_public(path: &Path, text: &str) -> std::io::Result<()> {
    write_with_mode(path, text, 0o644)
}

fn write_with_mode(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity::{Role, of_certificate};

    #[test]
    fn a_ca_issues_and_signs_requests_for_the_identity_it_chooses() {
        let (ca, _key) = Ca::create("c1", Duration::from_secs(3_600)).expect("ca");
        let id = Identity::new("c1", Role::Node("n1".into()));
        let pem = ca
            .issue(&id, Duration::from_secs(60), unix_now())
            .expect("issue");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(pem.cert.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        let (got, not_after) = of_certificate(&der).expect("identity");
        assert_eq!(got, id);
        assert!(not_after > unix_now() && not_after <= unix_now() + 61);
        // The half-life agents renew at lies well ahead even for the shortest lifetime
        // (backdating a full minute would put it at the issuing time: a renewal storm).
        let (not_before, _) = crate::tls::identity::validity(&der).expect("validity");
        let renew_at = not_before + (not_after - not_before) / 2;
        assert!(renew_at >= unix_now() + 20, "{not_before}..{not_after}");

        // A request that asks for another name gets the identity the CA gave.
        let (_key, csr) =
            signing_request(&Identity::new("c1", Role::Admin("x".into()))).expect("csr");
        let cert = ca
            .sign_request(&csr, &id, Duration::from_secs(60), unix_now())
            .expect("sign");
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        assert_eq!(of_certificate(&der).expect("identity").0, id);
        assert!(
            ca.sign_request("junk", &id, Duration::from_secs(1), 0)
                .is_err()
        );
    }
}
