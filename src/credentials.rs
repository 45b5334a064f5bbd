//! The CLI's credentials: a TOML file naming the CA, a client certificate and key, and
//! optionally an API token, as `berth dev` writes one (`credentials.toml` in its data
//! directory) and `berth cert issue --credentials` does for operators.
//!
//! Where the CLI looks, first found wins: `--credentials` / `BERTH_CREDENTIALS`, then
//! `./berth-data/dev/credentials.toml` (a `berth dev` started here), then
//! `~/.config/berth/credentials.toml`. `--token` / `BERTH_TOKEN` replaces the file's token;
//! `--insecure` talks plaintext to a cluster that runs without TLS.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use berth_net::client::Credentials;
use berth_net::{Tls, TlsSettings};

/// A credentials file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialsFile {
    /// PEM of the cluster CA.
    pub(crate) ca: String,
    /// PEM client certificate (an `admin/NAME` or `client/NAME` identity).
    pub(crate) cert: String,
    /// Its key.
    pub(crate) key: String,
    /// An API token (tenant or admin), optional.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) token: String,
}

/// The default places, in order.
fn defaults() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("berth-data/dev/credentials.toml")];
    if let Some(home) = std::env::var_os("HOME") {
        paths.push(Path::new(&home).join(".config/berth/credentials.toml"));
    }
    paths
}

impl CredentialsFile {
    /// Reads and parses `path`; relative paths inside are relative to the file.
    pub(crate) fn load(path: &Path) -> Result<CredentialsFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("credentials {}: cannot read: {e}", path.display()))?;
        let mut file: CredentialsFile =
            toml::from_str(&text).map_err(|e| format!("credentials {}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        for p in [&mut file.ca, &mut file.cert, &mut file.key] {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = dir.join(p.as_str()).display().to_string();
            }
        }
        Ok(file)
    }

    /// A file naming these PEM files by absolute path (so it can be used from any
    /// directory), without a token.
    pub(crate) fn for_files(ca: &str, cert: &str, key: &str) -> CredentialsFile {
        let absolute = |p: &str| {
            std::path::absolute(p).map_or_else(|_| p.to_owned(), |a| a.display().to_string())
        };
        CredentialsFile {
            ca: absolute(ca),
            cert: absolute(cert),
            key: absolute(key),
            token: String::new(),
        }
    }

    /// Writes it (owner-only: it may hold a token).
    pub(crate) fn write(&self, path: &Path) -> Result<(), String> {
        let text = toml::to_string(self).map_err(|e| e.to_string())?;
        berth_net::tls::pki::write_private(path, &text)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// The credentials a cluster command uses.
pub(crate) fn resolve(
    explicit: Option<&Path>,
    token: Option<&str>,
    insecure: bool,
) -> Result<Credentials, String> {
    let token = token.filter(|t| !t.is_empty()).map(str::to_owned);
    if insecure {
        return Ok(Credentials { tls: None, token });
    }
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => defaults()
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                "no credentials: pass --credentials FILE (or BERTH_CREDENTIALS), start \
                 `berth dev` here (it writes berth-data/dev/credentials.toml), or put one at \
                 ~/.config/berth/credentials.toml; --insecure talks to a cluster without TLS"
                    .to_owned()
            })?,
    };
    let file = CredentialsFile::load(&path)?;
    let settings = TlsSettings {
        ca: file.ca.clone(),
        cert: file.cert.clone(),
        key: file.key.clone(),
        ..TlsSettings::default()
    };
    let tls = Tls::load(&settings).map_err(|e| format!("credentials {}: {e}", path.display()))?;
    let token = token.or_else(|| (!file.token.is_empty()).then(|| file.token.clone()));
    Ok(Credentials { tls, token })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_written_from_relative_paths_loads_from_anywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = CredentialsFile::for_files("pki/ca.pem", "pki/admin.pem", "pki/admin.key");
        assert!(Path::new(&file.ca).is_absolute(), "{file:?}");
        let path = dir.path().join("sub/credentials.toml");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        file.write(&path).expect("write");
        // Loading does not re-root absolute paths under the file's directory.
        assert_eq!(CredentialsFile::load(&path).expect("load"), file);
        // A relative path written by hand is relative to the file.
        std::fs::write(
            &path,
            "ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"c.key\"\n",
        )
        .expect("w");
        let loaded = CredentialsFile::load(&path).expect("load");
        assert_eq!(
            Path::new(&loaded.ca),
            dir.path().join("sub/ca.pem").as_path()
        );
    }
}
