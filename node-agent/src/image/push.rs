//! Pushing a filesystem snapshot: the sandbox's image plus one layer, as a new image in a
//! registry, with the same client, credentials and plain-HTTP rules as pulls.
//!
//! 1. The base image's manifest and config are read from its registry **by digest** (the
//!    digest the sandbox runs on, so a tag moved since is not followed).
//! 2. The config gains the layer's diff id in `rootfs.diff_ids` and an entry in `history`
//!    (one per base layer is added first when the base has none). When the base config's
//!    diff ids do not match its layers (some tools leave them empty) they are recomputed
//!    from the node's copies of the layers, so the new image is valid as a whole.
//! 3. Base layers go to the target repository only when it lacks them: oci-client's
//!    `push` re-uploads every layer it is given without asking, so berth asks first
//!    (`blob_exists`, a HEAD), then tries a cross-repository mount when both live on one
//!    registry (`mount_blob`, no bytes moved), and only then uploads the node's cached copy
//!    (fetched from the base's registry first when the cache no longer has it).
//! 4. The new layer is streamed from its file in 4 MiB pieces (`push_blob_stream`), never
//!    held in memory whole; then the config; then an OCI manifest whose bytes berth
//!    serialises itself, so the digest it answers with is the one the registry stores.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_client::Reference;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{self as media, OciDescriptor, OciImageManifest};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::ReceiverStream;

use super::layer_diff::LayerFile;
use super::{ImageStore, registry, unpack};

/// Piece size of a streamed blob upload (oci-client's own chunk size).
const PUSH_PIECE: usize = 4 << 20;

/// What to push.
pub struct SnapshotPush<'a> {
    /// The sandbox's image reference, as its spec named it.
    pub base_reference: &'a str,
    /// The manifest digest it runs on.
    pub base_digest: &'a str,
    /// Where to push (`REPOSITORY:TAG`).
    pub target: &'a str,
    /// The new layer.
    pub layer: &'a LayerFile,
    /// The history entry's `created_by`.
    pub created_by: String,
    /// A scratch directory for base layers the cache no longer has.
    pub work_dir: &'a Path,
}

fn sha256(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// The diff id (digest of the uncompressed tar) of a layer blob on disk.
fn diff_id_of(blob: &Path, media_type: &str) -> Result<String, String> {
    let compression = unpack::Compression::of_media_type(media_type)?;
    let file = io::BufReader::new(fs::File::open(blob).map_err(|e| e.to_string())?);
    let mut reader: Box<dyn Read> = match compression {
        unpack::Compression::None => Box::new(file),
        unpack::Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}"))
}

/// How many diff ids a config lists.
fn diff_id_count(config: &Value) -> usize {
    config["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len)
}

/// The base config with one more layer: `base_diff_ids` (when given) replace the base's,
/// then `layer_diff_id` is appended, and `history` gains an entry.
pub(super) fn extended_config(
    mut config: Value,
    base_layers: usize,
    base_diff_ids: Option<Vec<String>>,
    layer_diff_id: &str,
    created_by: &str,
) -> Result<Vec<u8>, String> {
    let obj = config
        .as_object_mut()
        .ok_or("the base image's config is not a JSON object")?;
    let rootfs = obj
        .entry("rootfs")
        .or_insert_with(|| json!({"type": "layers", "diff_ids": []}));
    let mut ids: Vec<Value> = match base_diff_ids {
        Some(ids) => ids.into_iter().map(Value::String).collect(),
        None => rootfs["diff_ids"].as_array().cloned().unwrap_or_default(),
    };
    ids.push(Value::String(layer_diff_id.to_owned()));
    rootfs["diff_ids"] = Value::Array(ids);
    rootfs["type"] = json!("layers");
    let ours = json!({"created_by": created_by, "comment": "berth sandbox snapshot"});
    match obj.get_mut("history").and_then(Value::as_array_mut) {
        Some(history) => history.push(ours),
        None => {
            let mut history: Vec<Value> = (0..base_layers)
                .map(|_| json!({"comment": "base image layer"}))
                .collect();
            history.push(ours);
            obj.insert("history".into(), Value::Array(history));
        }
    }
    serde_json::to_vec(&config).map_err(|e| e.to_string())
}

/// A base layer's media type in an OCI manifest (Docker's names the same formats).
fn oci_media_type(media_type: &str) -> String {
    match media_type {
        media::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE => media::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
        media::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE => media::IMAGE_LAYER_MEDIA_TYPE.into(),
        other => other.into(),
    }
}

impl ImageStore {
    /// Pushes the sandbox's image plus `push.layer` to `push.target`; returns the new
    /// manifest's digest.
    pub async fn push_snapshot(&self, push: SnapshotPush<'_>) -> Result<String, String> {
        let base = registry::parse(push.base_reference)?;
        let source = Reference::with_digest(
            base.registry().to_owned(),
            base.repository().to_owned(),
            push.base_digest.to_owned(),
        );
        let target = registry::parse(push.target)?;
        let registry = &self.inner.registry;
        let (manifest, _, config) = registry
            .manifest_and_config(&source)
            .await
            .map_err(|e| format!("reading the base image {source}: {e}"))?;
        let config: Value = serde_json::from_str(&config)
            .map_err(|e| format!("the base image's config is not valid JSON: {e}"))?;
        let base_diff_ids = if diff_id_count(&config) == manifest.layers.len() {
            None
        } else {
            let mut ids = Vec::new();
            for layer in &manifest.layers {
                let local = self.local_blob(&source, layer, push.work_dir).await?;
                let media_type = layer.media_type.clone();
                let id = tokio::task::spawn_blocking(move || diff_id_of(&local, &media_type))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("reading base layer {}: {e}", layer.digest))?;
                ids.push(id);
            }
            Some(ids)
        };
        let config = extended_config(
            config,
            manifest.layers.len(),
            base_diff_ids,
            &push.layer.diff_id,
            &push.created_by,
        )?;

        registry
            .client
            .store_auth_if_needed(target.resolve_registry(), &registry.auth_for(&target))
            .await;
        for layer in &manifest.layers {
            self.ensure_blob(&target, &source, layer, push.work_dir)
                .await?;
        }
        self.push_file(
            &target,
            &push.layer.path,
            &push.layer.digest,
            push.layer.size,
        )
        .await?;
        let config_digest = sha256(&config);
        let config_size = config.len() as i64;
        registry
            .client
            .push_blob(&target, config, &config_digest)
            .await
            .map_err(|e| format!("pushing the config to {target}: {e}"))?;

        let mut layers: Vec<OciDescriptor> = manifest
            .layers
            .iter()
            .map(|l| OciDescriptor {
                media_type: oci_media_type(&l.media_type),
                ..l.clone()
            })
            .collect();
        layers.push(OciDescriptor {
            media_type: media::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
            digest: push.layer.digest.clone(),
            size: push.layer.size as i64,
            ..OciDescriptor::default()
        });
        let annotations = BTreeMap::from([
            (
                "org.opencontainers.image.base.name".to_owned(),
                push.base_reference.to_owned(),
            ),
            (
                "org.opencontainers.image.base.digest".to_owned(),
                push.base_digest.to_owned(),
            ),
        ]);
        let new = OciImageManifest {
            schema_version: 2,
            media_type: Some(media::OCI_IMAGE_MEDIA_TYPE.into()),
            config: OciDescriptor {
                media_type: media::IMAGE_CONFIG_MEDIA_TYPE.into(),
                digest: config_digest,
                size: config_size,
                ..OciDescriptor::default()
            },
            layers,
            annotations: Some(annotations),
            ..OciImageManifest::default()
        };
        let body = serde_json::to_vec(&new).map_err(|e| e.to_string())?;
        let digest = sha256(&body);
        let content_type = media::OCI_IMAGE_MEDIA_TYPE
            .parse()
            .map_err(|e| format!("{e}"))?;
        registry
            .client
            .push_manifest_raw(&target, body, content_type)
            .await
            .map_err(|e| format!("pushing the manifest to {target}: {e}"))?;
        Ok(digest)
    }

    /// A base layer on this node's disk: the cache's copy, or one fetched into `work`.
    async fn local_blob(
        &self,
        source: &Reference,
        layer: &OciDescriptor,
        work: &Path,
    ) -> Result<PathBuf, String> {
        let cached = self.blob_path(&layer.digest);
        if cached.exists() {
            return Ok(cached);
        }
        let hex = super::hex_of(&layer.digest)
            .ok_or_else(|| format!("layer digest {:?} is not sha256", layer.digest))?;
        let path = work.join(hex);
        if !path.exists() {
            self.inner.registry.blob(source, layer, &path).await?;
        }
        Ok(path)
    }

    /// Makes sure the target repository has a base layer: there already, mounted from the
    /// base's repository, or uploaded.
    async fn ensure_blob(
        &self,
        target: &Reference,
        source: &Reference,
        layer: &OciDescriptor,
        work: &Path,
    ) -> Result<(), String> {
        let client = &self.inner.registry.client;
        if client
            .blob_exists(target, &layer.digest)
            .await
            .unwrap_or(false)
        {
            return Ok(());
        }
        if target.resolve_registry() == source.resolve_registry()
            && target.repository() != source.repository()
        {
            match client.mount_blob(target, source, &layer.digest).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(layer = %layer.digest, error = %e, "cross-repository mount refused; uploading")
                }
            }
        }
        let local = self.local_blob(source, layer, work).await?;
        let size = fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
        self.push_file(target, &local, &layer.digest, size).await
    }

    /// Streams a file to the target repository as the blob `digest`.
    async fn push_file(
        &self,
        target: &Reference,
        path: &Path,
        digest: &str,
        size: u64,
    ) -> Result<(), String> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, OciDistributionError>>(2);
        let file_path = path.to_path_buf();
        // A blocking reader feeds the upload; it stops when the upload drops the receiver.
        tokio::task::spawn_blocking(move || {
            let failed = |e: io::Error| {
                Err(OciDistributionError::GenericError(Some(format!(
                    "{}: {e}",
                    file_path.display()
                ))))
            };
            let mut file = match fs::File::open(&file_path) {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.blocking_send(failed(e));
                    return;
                }
            };
            loop {
                let mut piece = vec![0u8; PUSH_PIECE];
                match file.read(&mut piece) {
                    Ok(0) => return,
                    Ok(n) => {
                        piece.truncate(n);
                        if tx.blocking_send(Ok(bytes::Bytes::from(piece))).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(failed(e));
                        return;
                    }
                }
            }
        });
        self.inner
            .registry
            .client
            .push_blob_stream(target, ReceiverStream::new(rx), digest, Some(size))
            .await
            .map(|_| ())
            .map_err(|e| format!("pushing blob {digest} to {target}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_gains_the_layer_and_a_history_entry() {
        let base = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]},
            "history": [{"created_by": "ADD rootfs"}],
        });
        let out = extended_config(base.clone(), 1, None, "sha256:bb", "snapshot of sbx-1")
            .expect("config");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["rootfs"]["diff_ids"], json!(["sha256:aa", "sha256:bb"]));
        assert_eq!(v["history"][1]["created_by"], "snapshot of sbx-1");
        assert_eq!(v["config"]["Env"], json!(["PATH=/bin"]));

        // Diff ids that do not match the layers are replaced; missing history is made.
        let mut bare = base;
        bare["rootfs"]["diff_ids"] = json!([]);
        bare.as_object_mut().expect("object").remove("history");
        let out = extended_config(bare, 1, Some(vec!["sha256:cc".into()]), "sha256:bb", "x")
            .expect("config");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["rootfs"]["diff_ids"], json!(["sha256:cc", "sha256:bb"]));
        assert_eq!(v["history"].as_array().map(Vec::len), Some(2));
        assert!(extended_config(json!([1]), 0, None, "sha256:bb", "x").is_err());
    }
}
