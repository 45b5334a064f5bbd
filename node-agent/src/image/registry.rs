//! Talking to OCI registries: oci-client over rustls, plain HTTP for the registries the
//! config marks insecure, basic credentials from files the config names. Pulls are here;
//! pushes (filesystem snapshots) use the same client and credentials, in [`super::push`].

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ImageProcess;

/// One `[[agent.registries]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// `host` or `host:port`, as it appears in image references.
    pub host: String,
    /// Plain HTTP instead of HTTPS (a registry on loopback or a private network).
    pub insecure: bool,
    /// User for HTTP basic authentication; empty for anonymous.
    pub username: String,
    /// File holding the password (kept out of the config file); relative to the config.
    pub password_file: String,
}

/// Parses an image reference the way the registry client will use it.
pub(super) fn parse(reference: &str) -> Result<Reference, String> {
    reference
        .parse::<Reference>()
        .map_err(|e| format!("not a valid image reference: {e}"))
}

/// reqwest's rustls needs a process-wide provider: ring, as the rest of berth uses.
pub(crate) fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The registries the agent pulls from.
pub struct Registry {
    pub(super) client: Client,
    auth: Vec<(String, RegistryAuth)>,
}

impl Registry {
    /// A client for these registries (every other one is HTTPS and anonymous).
    pub fn new(registries: &[RegistryConfig]) -> Result<Registry, String> {
        install_crypto();
        let insecure: Vec<String> = registries
            .iter()
            .filter(|r| r.insecure)
            .map(|r| r.host.clone())
            .collect();
        let mut auth = Vec::new();
        for r in registries.iter().filter(|r| !r.username.is_empty()) {
            let password = std::fs::read_to_string(Path::new(&r.password_file))
                .map_err(|e| format!("registries {:?}: password_file: {e}", r.host))?;
            auth.push((
                r.host.clone(),
                RegistryAuth::Basic(r.username.clone(), password.trim_end().to_owned()),
            ));
        }
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        });
        Ok(Registry { client, auth })
    }

    pub(super) fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        let host = reference.resolve_registry();
        self.auth
            .iter()
            .find(|(h, _)| h == host || h == reference.registry())
            .map_or(RegistryAuth::Anonymous, |(_, a)| a.clone())
    }

    /// The manifest (an index resolved to this platform), its digest, and the config blob,
    /// whose digest is checked against the manifest.
    pub(super) async fn manifest_and_config(
        &self,
        reference: &Reference,
    ) -> Result<(OciImageManifest, String, String), String> {
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(reference, &self.auth_for(reference))
            .await
            .map_err(|e| format!("fetching the manifest: {e}"))?;
        let hex: String = Sha256::digest(config.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let actual = format!("sha256:{hex}");
        if actual != manifest.config.digest {
            return Err(format!(
                "config blob {} failed verification: its content hashes to {actual}",
                manifest.config.digest
            ));
        }
        Ok((manifest, digest, config))
    }

    /// Fetches a blob into `path` (through a `.partial` file; kept only when its digest
    /// verified). Returns its size.
    pub(super) async fn blob(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        path: &Path,
    ) -> Result<u64, String> {
        let partial = path.with_extension("partial");
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        let result = self.client.pull_blob(reference, layer, file).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(format!("fetching layer {}: {e}", layer.digest));
        }
        let size = tokio::fs::metadata(&partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        tokio::fs::rename(&partial, path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(size)
    }
}

/// The process settings of an image config blob.
pub(super) fn process_of(config: &str) -> Result<ImageProcess, String> {
    let parsed: oci_spec::image::ImageConfiguration =
        serde_json::from_str(config).map_err(|e| format!("the image config is not valid: {e}"))?;
    let Some(c) = parsed.config() else {
        return Ok(ImageProcess::default());
    };
    Ok(ImageProcess {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().unwrap_or_default(),
        user: c.user().clone().unwrap_or_default(),
    })
}
