//! The node's image cache: OCI images pulled from registries, unpacked once, shared
//! read-only by every sandbox of that image.
//!
//! On disk, under `image_cache_dir`:
//!
//! | path | what |
//! |---|---|
//! | `blobs/sha256/HEX` | a layer or config blob, kept only once its digest verified |
//! | `images/HEX/rootfs/` | the image's layers applied in order (whiteouts done) |
//! | `images/HEX/image.json` | [`ImageMeta`], written last: an image without it is not there |
//!
//! `HEX` of an image is its manifest digest, so an image is stored once however many tags
//! name it. A reference with a digest never asks the registry again; a tag already cached
//! is used as it is (Kubernetes' `IfNotPresent`). Pulls of one reference are coalesced
//! (the second waits for the first and then finds the image), at most
//! `max_concurrent_pulls` run at once, and past `image_cache_max_bytes` the least recently
//! used image no sandbox is using is evicted, with the blobs only it used.
//!
//! The other direction, a sandbox's filesystem changes as a new image (filesystem
//! snapshots): [`layer_diff`] turns its write layer into an OCI layer, and `push` sends the
//! image plus that layer to a registry.
//!
//! # Layout
//! - `registry`: the registry client (pulls), its credentials and plain-HTTP hosts.
//! - [`unpack`]: applying layers, whiteouts included.
//! - [`layer_diff`]: an overlayfs upper directory as an OCI layer.
//! - `push`: a snapshot image pushed (base layers mounted or uploaded only when missing).
//! - [`testing`]: busybox images and a real registry for the tests.

pub mod layer_diff;
mod push;
mod registry;
pub mod testing;
pub mod unpack;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use crate::metrics::AgentMetrics;
pub use push::SnapshotPush;
pub use registry::{Registry, RegistryConfig};

/// What of an image's config a sandbox runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageProcess {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    pub env: Vec<String>,
    /// `WorkingDir`; empty for `/`.
    pub working_dir: String,
    /// `User` (`name`, `uid`, `uid:gid`, `name:group`); empty for root.
    pub user: String,
}

/// `images/HEX/image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Manifest digest (`sha256:…`).
    pub digest: String,
    /// The references sandboxes named it by, as they wrote them.
    pub references: BTreeSet<String>,
    /// Layer blob digests, bottom first.
    pub layers: Vec<String>,
    /// Config blob digest.
    pub config_digest: String,
    /// The image's process settings.
    pub process: ImageProcess,
    /// Bytes on disk: the unpacked files and the blobs.
    pub size_bytes: u64,
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Manifest digest.
    pub digest: String,
    /// Its read-only root filesystem.
    pub rootfs: PathBuf,
    /// Its process settings.
    pub process: ImageProcess,
}

/// Why an image could not be had; the message names the image and the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("image {image:?}: {cause}")]
pub struct PullError {
    /// The reference as given.
    pub image: String,
    /// What went wrong.
    pub cause: String,
}

/// Image cache settings, from `[agent]`.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// Cache directory.
    pub dir: PathBuf,
    /// Size past which unused images are evicted.
    pub max_bytes: u64,
    /// Pulls at once.
    pub max_concurrent_pulls: usize,
    /// Registries that need plain HTTP or credentials.
    pub registries: Vec<RegistryConfig>,
}

struct Entry {
    meta: ImageMeta,
    last_used: u64,
}

#[derive(Default)]
struct Index {
    images: BTreeMap<String, Entry>,
    /// Normalised reference → manifest digest.
    refs: HashMap<String, String>,
    /// Sandbox → the image digest it runs on.
    pins: HashMap<String, String>,
    clock: u64,
}

impl Index {
    fn touch(&mut self, digest: &str) {
        self.clock += 1;
        if let Some(e) = self.images.get_mut(digest) {
            e.last_used = self.clock;
        }
    }

    fn total_bytes(&self) -> u64 {
        self.images.values().map(|e| e.meta.size_bytes).sum()
    }
}

/// The node's image cache (cheap to clone).
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    registry: Registry,
    pulls: Semaphore,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    index: Mutex<Index>,
    metrics: Arc<AgentMetrics>,
    /// Bumped whenever the set of cached images changes (the inventory reports them).
    changed: watch::Sender<u64>,
}

fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

impl ImageStore {
    /// Opens (or creates) the cache and loads what it holds.
    pub fn open(settings: ImageSettings, metrics: Arc<AgentMetrics>) -> io::Result<ImageStore> {
        fs::create_dir_all(settings.dir.join("blobs/sha256"))?;
        fs::create_dir_all(settings.dir.join("images"))?;
        let _ = fs::remove_dir_all(settings.dir.join("trash"));
        let mut index = Index::default();
        let mut found: Vec<(std::time::SystemTime, ImageMeta)> = Vec::new();
        for entry in fs::read_dir(settings.dir.join("images"))?.flatten() {
            let path = entry.path().join("image.json");
            let Ok(bytes) = fs::read(&path) else {
                // A pull that did not finish: its directory goes.
                let _ = fs::remove_dir_all(entry.path());
                continue;
            };
            if let Ok(meta) = serde_json::from_slice::<ImageMeta>(&bytes) {
                let at = fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                found.push((at, meta));
            }
        }
        found.sort_by_key(|(at, _)| *at);
        for (_, meta) in found {
            index.clock += 1;
            for r in &meta.references {
                if let Ok(parsed) = registry::parse(r) {
                    index.refs.insert(parsed.whole(), meta.digest.clone());
                }
            }
            index.images.insert(
                meta.digest.clone(),
                Entry {
                    meta,
                    last_used: index.clock,
                },
            );
        }
        metrics.image_cache_bytes.set(index.total_bytes() as i64);
        metrics.image_cache_images.set(index.images.len() as i64);
        let registry = Registry::new(&settings.registries).map_err(io::Error::other)?;
        Ok(ImageStore {
            inner: Arc::new(Inner {
                dir: settings.dir,
                max_bytes: settings.max_bytes,
                registry,
                pulls: Semaphore::new(settings.max_concurrent_pulls.max(1)),
                inflight: Mutex::default(),
                index: Mutex::new(index),
                metrics,
                changed: watch::channel(0).0,
            }),
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner
            .index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Ticks whenever the set of cached images changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// The references of the cached images, for the inventory (at most `limit`, most
    /// recently used first).
    pub fn references(&self, limit: usize) -> Vec<String> {
        let index = self.index();
        let mut entries: Vec<&Entry> = index.images.values().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        let mut out: Vec<String> = Vec::new();
        for e in entries {
            for r in &e.meta.references {
                if out.len() < limit && !out.contains(r) {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    /// Bytes the cache holds.
    pub fn size_bytes(&self) -> u64 {
        self.index().total_bytes()
    }

    /// The cached image a reference names, without asking any registry.
    /// Pins it for `sandbox` under the same lock, so no concurrent eviction takes it.
    fn cached(&self, key: &str, digest: Option<&str>, sandbox: &str) -> Option<Image> {
        let mut index = self.index();
        let digest = match digest {
            Some(d) => d.to_owned(),
            None => index.refs.get(key)?.clone(),
        };
        let entry = index.images.get(&digest)?;
        let image = Image {
            digest: digest.clone(),
            rootfs: self.image_dir(&digest).join("rootfs"),
            process: entry.meta.process.clone(),
        };
        index.touch(&digest);
        index.pins.insert(sandbox.to_owned(), digest);
        Some(image)
    }

    fn image_dir(&self, digest: &str) -> PathBuf {
        self.inner
            .dir
            .join("images")
            .join(hex_of(digest).unwrap_or("invalid"))
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner
            .dir
            .join("blobs/sha256")
            .join(hex_of(digest).unwrap_or("invalid"))
    }

    /// The image a reference names, pulled if this node does not have it, and pinned for
    /// `sandbox` until [`ImageStore::unpin`].
    pub async fn ensure(&self, reference: &str, sandbox: &str) -> Result<Image, PullError> {
        let fail = |cause: String| PullError {
            image: reference.to_owned(),
            cause,
        };
        let parsed = registry::parse(reference).map_err(|e| fail(e.to_string()))?;
        let key = parsed.whole();
        if let Some(hit) = self.cached(&key, parsed.digest(), sandbox) {
            self.inner.metrics.image_cache_hits.inc();
            return Ok(hit);
        }
        // One pull per reference at a time; whoever waited finds it cached.
        let gate = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            inflight.entry(key.clone()).or_default().clone()
        };
        let _turn = gate.lock().await;
        if let Some(hit) = self.cached(&key, parsed.digest(), sandbox) {
            self.inner.metrics.image_cache_hits.inc();
            return Ok(hit);
        }
        self.inner.metrics.image_cache_misses.inc();
        let _permit = self
            .inner
            .pulls
            .acquire()
            .await
            .map_err(|_| fail("the agent is shutting down".into()))?;
        self.inner.metrics.pulls_in_flight.inc();
        let result = self.pull(reference, &parsed, sandbox).await;
        self.inner.metrics.pulls_in_flight.dec();
        self.inner
            .metrics
            .pulls
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        self.inner
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        result.map_err(fail)
    }

    async fn pull(
        &self,
        reference: &str,
        parsed: &oci_client::Reference,
        sandbox: &str,
    ) -> Result<Image, String> {
        let (manifest, digest, config) = self.inner.registry.manifest_and_config(parsed).await?;
        if hex_of(&digest).is_none() {
            return Err(format!("the registry gave manifest digest {digest:?}"));
        }
        if self.index().images.contains_key(&digest) {
            // Another tag of an image this node has.
            self.record_reference(&digest, reference, parsed)?;
            return self
                .cached(&parsed.whole(), Some(&digest), sandbox)
                .ok_or_else(|| "the image was evicted while it was being pulled".to_owned());
        }
        let process = registry::process_of(&config)?;
        let mut layers = Vec::new();
        let mut blob_bytes = config.len() as u64;
        for layer in &manifest.layers {
            let compression = unpack::Compression::of_media_type(&layer.media_type)?;
            let path = self.blob_path(&layer.digest);
            if hex_of(&layer.digest).is_none() {
                return Err(format!("layer digest {:?} is not sha256", layer.digest));
            }
            if !path.exists() {
                let fetched = self.inner.registry.blob(parsed, layer, &path).await?;
                self.inner.metrics.pull_bytes.inc_by(fetched);
            }
            blob_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            layers.push((layer.digest.clone(), path, compression));
        }
        let config_path = self.blob_path(&manifest.config.digest);
        fs::write(&config_path, config.as_bytes())
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        // Unpack off the async threads: a large image takes seconds of disk work.
        let image_dir = self.image_dir(&digest);
        let partial = image_dir.with_extension("partial");
        let meta = ImageMeta {
            digest: digest.clone(),
            references: [reference.to_owned()].into(),
            layers: layers.iter().map(|(d, _, _)| d.clone()).collect(),
            config_digest: manifest.config.digest.clone(),
            process: process.clone(),
            size_bytes: 0,
        };
        let meta = tokio::task::spawn_blocking(move || {
            unpack_image(&partial, &image_dir, &layers, meta, blob_bytes)
        })
        .await
        .map_err(|e| format!("unpacking: {e}"))??;
        {
            let mut index = self.index();
            index.refs.insert(parsed.whole(), digest.clone());
            index.clock += 1;
            let clock = index.clock;
            index.images.insert(
                digest.clone(),
                Entry {
                    meta,
                    last_used: clock,
                },
            );
            index.pins.insert(sandbox.to_owned(), digest.clone());
        }
        self.evict_past_limit(&digest);
        self.inner.changed.send_modify(|g| *g += 1);
        Ok(Image {
            rootfs: self.image_dir(&digest).join("rootfs"),
            digest,
            process,
        })
    }

    fn record_reference(
        &self,
        digest: &str,
        reference: &str,
        parsed: &oci_client::Reference,
    ) -> Result<(), String> {
        let meta = {
            let mut index = self.index();
            index.refs.insert(parsed.whole(), digest.to_owned());
            let Some(entry) = index.images.get_mut(digest) else {
                return Ok(());
            };
            if !entry.meta.references.insert(reference.to_owned()) {
                return Ok(());
            }
            entry.meta.clone()
        };
        let path = self.image_dir(digest).join("image.json");
        let bytes = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
        crate::runtime::write_atomic(&path, &bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.inner.changed.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Marks an image as used by a sandbox (it is not evicted while pinned).
    pub fn pin(&self, sandbox: &str, digest: &str) {
        let mut index = self.index();
        index.pins.insert(sandbox.to_owned(), digest.to_owned());
        index.touch(digest);
    }

    /// The sandbox no longer uses its image.
    pub fn unpin(&self, sandbox: &str) {
        self.index().pins.remove(sandbox);
    }

    /// Evicts least recently used unpinned images until the cache fits (never `keep`).
    fn evict_past_limit(&self, keep: &str) {
        loop {
            let victim = {
                let mut index = self.index();
                if index.total_bytes() <= self.inner.max_bytes {
                    break;
                }
                let pinned: BTreeSet<&String> = index.pins.values().collect();
                let Some(digest) = index
                    .images
                    .iter()
                    .filter(|(d, _)| d.as_str() != keep && !pinned.contains(d))
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(d, _)| d.clone())
                else {
                    tracing::warn!(
                        bytes = index.total_bytes(),
                        limit = self.inner.max_bytes,
                        "image cache is over its limit, but every other image is in use"
                    );
                    break;
                };
                let Some(entry) = index.images.remove(&digest) else {
                    break;
                };
                index.refs.retain(|_, d| *d != digest);
                let still_used: BTreeSet<String> = index
                    .images
                    .values()
                    .flat_map(|e| e.meta.layers.iter().chain([&e.meta.config_digest]))
                    .cloned()
                    .collect();
                (entry.meta, still_used)
            };
            let (meta, still_used) = victim;
            tracing::info!(image = %meta.digest, references = ?meta.references, bytes = meta.size_bytes, "evicting image");
            let trash = self.inner.dir.join("trash");
            let _ = fs::create_dir_all(&trash);
            let dir = self.image_dir(&meta.digest);
            let gone = trash.join(hex_of(&meta.digest).unwrap_or("invalid"));
            if fs::rename(&dir, &gone).is_ok() {
                let _ = fs::remove_dir_all(&gone);
            }
            for blob in meta.layers.iter().chain([&meta.config_digest]) {
                if !still_used.contains(blob) {
                    let _ = fs::remove_file(self.blob_path(blob));
                }
            }
            self.inner.metrics.image_evictions.inc();
        }
        let index = self.index();
        self.inner
            .metrics
            .image_cache_bytes
            .set(index.total_bytes() as i64);
        self.inner
            .metrics
            .image_cache_images
            .set(index.images.len() as i64);
    }
}

/// Applies the layers into `partial/rootfs`, writes `image.json`, and renames `partial` to
/// `dir` (a crash leaves a `.partial` that the next start removes).
fn unpack_image(
    partial: &Path,
    dir: &Path,
    layers: &[(String, PathBuf, unpack::Compression)],
    mut meta: ImageMeta,
    blob_bytes: u64,
) -> Result<ImageMeta, String> {
    let _ = fs::remove_dir_all(partial);
    let rootfs = partial.join("rootfs");
    fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
    let mut bytes = 0;
    for (digest, blob, compression) in layers {
        bytes += unpack::apply_layer(&rootfs, blob, *compression)
            .map_err(|e| format!("unpacking layer {digest}: {e}"))?;
    }
    meta.size_bytes = bytes + blob_bytes;
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
    crate::runtime::write_atomic(&partial.join("image.json"), &json)
        .map_err(|e| format!("writing image.json: {e}"))?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(partial, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(meta)
}
