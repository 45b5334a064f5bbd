//! The node's inventory as the agent registers it, kept fresh off the session loop: NVML
//! (or the static file) re-read on a timer on the blocking pool, the cached images re-listed
//! whenever the image cache changes. Sessions watch the result and re-register on change.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use berth_proto::pb::v1 as pb;

use crate::config::AgentConfig;
use crate::image::ImageStore;
use crate::inventory::{self, GpuSource};

/// Cached images listed in the inventory (the scheduler's limit on `cached_images`).
const MAX_CACHED_IMAGES_REPORTED: usize = 256;

/// Keeps the node's inventory fresh off the session loop: NVML is re-read every
/// `inventory_refresh_s` on the blocking pool, and the cached images are re-listed whenever
/// the image cache changes.
pub fn spawn(
    cfg: &AgentConfig,
    gpus: GpuSource,
    first: inventory::Inventory,
    advertised: &str,
    images: ImageStore,
) -> watch::Receiver<pb::NodeInventory> {
    let runtime = inventory::runtime_identity(cfg);
    let build = {
        let cfg = cfg.clone();
        let advertised = advertised.to_owned();
        let images = images.clone();
        move |inv: &inventory::Inventory| {
            let mut pb = inventory::to_pb(&cfg, inv, &advertised, &runtime);
            pb.cached_images = images.references(MAX_CACHED_IMAGES_REPORTED);
            pb
        }
    };
    let (tx, rx) = watch::channel(build(&first));
    let refresh_every = Duration::from_secs(cfg.inventory_refresh_s.max(1));
    let gpus = Arc::new(std::sync::Mutex::new(gpus));
    tokio::spawn(async move {
        let mut last = first;
        let mut cached = images.subscribe();
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
        loop {
            tokio::select! {
                _ = refresh.tick() => {
                    let gpus = gpus.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        gpus.lock().unwrap_or_else(std::sync::PoisonError::into_inner).read()
                    })
                    .await;
                    match read {
                        Ok(Ok(inv)) => last = inv,
                        Ok(Err(e)) => tracing::warn!(error = %e, "inventory refresh failed; keeping the last one"),
                        Err(_) => {}
                    }
                }
                changed = cached.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let fresh = build(&last);
            tx.send_if_modified(|current| {
                if *current == fresh {
                    false
                } else {
                    tracing::info!("inventory changed; re-registering it");
                    *current = fresh;
                    true
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}
