//! `berth cert …`: a CA and the certificates it issues, as files, for operators without a
//! CA of their own (the same code `berth dev` runs). `ca.key` is the cluster's root of trust:
//! keep it owner-only on the replicas (they sign joining nodes' certificates with it), or
//! off them entirely if nodes are issued certificates by hand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use berth_net::Identity;
use berth_net::tls::identity::validity;
use berth_net::tls::pki::{LOCAL_CERT_TTL, LocalPki, unix_now};

use super::parse_duration;
use crate::exit::EXIT_FAILURE;

/// Certificate commands.
#[derive(Debug, Subcommand)]
pub(crate) enum CertCommand {
    /// Create a CA for a cluster: DIR/ca.pem (give it to everyone) and DIR/ca.key (owner-only).
    Ca {
        /// Directory for the CA's files (created).
        #[arg(long)]
        dir: PathBuf,
        /// The cluster's trust domain, the host part of every spiffe:// identity.
        #[arg(long)]
        cluster: String,
    },
    /// Issue a certificate and key for an identity: replica/ID, node/NODE_ID, admin/NAME,
    /// client/NAME, autoscaler/NAME or provider/NAME. Writes DIR/ROLE-NAME.pem and .key.
    Issue {
        /// The CA's directory (from `berth cert ca`).
        #[arg(long)]
        dir: PathBuf,
        /// Who the certificate is for, e.g. node/gpu-7.
        identity: String,
        /// Lifetime (default 365d).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Also write a CLI credentials file naming the CA, certificate and key (for
        /// admin/NAME and client/NAME identities; use with --credentials or put it at
        /// ~/.config/berth/credentials.toml).
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
    /// Print a certificate file's identity and validity.
    Show {
        /// PEM certificate files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

impl CertCommand {
    pub(crate) fn run(self) -> ExitCode {
        let result = match self {
            CertCommand::Ca { dir, cluster } => create_ca(&dir, &cluster),
            CertCommand::Issue {
                dir,
                identity,
                ttl,
                credentials,
            } => issue(&dir, &identity, ttl, credentials.as_deref()),
            CertCommand::Show { files } => files.iter().try_for_each(|f| show(f)),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("berth cert: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

fn create_ca(dir: &std::path::Path, cluster: &str) -> Result<(), String> {
    // The trust domain must make valid identities.
    Identity::parse_role(cluster, "admin/x").map_err(|e| format!("--cluster: {e}"))?;
    if dir.join("ca.key").exists() {
        return Err(format!(
            "{} already holds a CA (ca.key); refusing to replace the cluster's root of trust",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pki = LocalPki::create(dir, cluster)?;
    println!("CA certificate: {}", pki.ca_path().display());
    println!(
        "CA key:         {} (owner-only; the replicas' auth.ca_key, nowhere else)",
        pki.ca_key_path().display()
    );
    Ok(())
}

fn issue(
    dir: &std::path::Path,
    role: &str,
    ttl: Option<Duration>,
    credentials: Option<&std::path::Path>,
) -> Result<(), String> {
    let pki = LocalPki::open(dir)?;
    let identity = Identity::parse_role(&pki.trust_domain, role)?;
    let settings = pki.issue_identity(&identity, ttl.unwrap_or(LOCAL_CERT_TTL), unix_now())?;
    println!("identity:    {identity}");
    println!("certificate: {}", settings.cert);
    println!("key:         {} (owner-only)", settings.key);
    println!("ca:          {}", settings.ca);
    if let Some(path) = credentials {
        crate::credentials::CredentialsFile::for_files(&settings.ca, &settings.cert, &settings.key)
            .write(path)?;
        println!("credentials: {}", path.display());
    }
    Ok(())
}

fn show(file: &std::path::Path) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_file(file)
        .map_err(|e| format!("{}: not a PEM certificate: {e}", file.display()))?;
    let (not_before, not_after) = validity(&der).map_err(|e| format!("{}: {e}", file.display()))?;
    let identity = berth_net::tls::identity::of_certificate(&der)
        .map_or_else(|e| format!("none ({e})"), |(id, _)| id.to_string());
    let now = unix_now();
    let state = if now > not_after {
        "EXPIRED"
    } else if now < not_before {
        "not yet valid"
    } else {
        "valid"
    };
    let at = |s: i64| super::sandbox::show::format_unix_ms(u64::try_from(s).unwrap_or(0) * 1000);
    println!(
        "{}: {identity}, {state}, from {} to {}",
        file.display(),
        at(not_before),
        at(not_after)
    );
    Ok(())
}
