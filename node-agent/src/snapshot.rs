//! `AgentService.SnapshotSandbox`: a sandbox's filesystem changes pushed as a new image,
//! its own image plus one layer (issue #17's filesystem snapshots).
//!
//! 1. The sandbox must be on this node, Running, Standby or Paused, and have an image.
//! 2. Its write layer is made consistent. gVisor's gofer filesystem writes `write(2)` data
//!    straight to the host file unless the range is already in the sentry's page cache
//!    (pages read through the cache, or a memory-mapped file without a host mapping); those
//!    pages are marked dirty and written back on `fsync`, `sync`, eviction or checkpoint.
//!    So for a Running sandbox the helper calls `sync(2)` inside
//!    ([`berth_sandboxd::wire::ToHelper::Sync`]) and answers once it returns. A Paused
//!    sandbox is complete: `runsc checkpoint` wrote every dirty page back before saving. A
//!    Standby sandbox is frozen and cannot be asked: its layer is read as it stands, which
//!    lacks only dirty cached pages (rare: the writes of memory-mapped files).
//! 3. `fs/upper` becomes a gzip tar with OCI whiteouts ([`crate::image::layer_diff`]) in a
//!    scratch directory under the image cache, on the blocking pool, at most
//!    `snapshot_max_bytes` of files.
//! 4. The image and the layer are pushed ([`crate::image::ImageStore::push_snapshot`]).
//!
//! Where: `<snapshot_repository>/<tenant>/<sandbox id>:<unix ms>`, or a reference the
//! caller gives under `<snapshot_repository>/<tenant>/`. The node's registry credentials
//! are the operator's, so a tenant may not name any other place with them.
//!
//! Bounds: one snapshot per sandbox at a time (a second is FAILED_PRECONDITION), and
//! [`MAX_CONCURRENT`] per node (more wait), so snapshots cannot take the node's disk and
//! CPUs from its sandboxes. None of it runs on the session loop, so heartbeats go on.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::snapshot_sandbox_progress::Message;
use berth_sandboxd::wire::{FromHelper, ToHelper};

use crate::image::layer_diff::{self, DiffError};
use crate::image::{ImageStore, SnapshotPush};
use crate::runtime::{LocalState, Runtime, unix_ms, valid_sandbox_id};

/// Snapshots taken at once on one node: each reads a whole write layer and compresses it.
pub const MAX_CONCURRENT: usize = 2;
/// How long the helper's `sync(2)` may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// The answer of `SnapshotSandbox`: phases, then the result.
pub type Progress = ReceiverStream<Result<pb::SnapshotSandboxProgress, Status>>;

/// One snapshot being taken.
struct Job {
    id: String,
    launch: crate::launch::Launch,
    /// Ask the helper to sync first (a Running sandbox with a helper).
    flush: bool,
    target: String,
    started_ms: u64,
    work: PathBuf,
}

/// Snapshot settings, from `[agent]`.
#[derive(Debug, Clone)]
pub struct SnapshotSettings {
    /// `host[:port]/path` new images go under; empty for none (snapshots refused).
    pub repository: String,
    /// Most bytes of files in one snapshot's layer, before compression.
    pub max_bytes: u64,
    /// Scratch directory for layers being made.
    pub work_dir: PathBuf,
}

/// Takes snapshots of this node's sandboxes (cheap to clone).
#[derive(Clone)]
pub struct Snapshots {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Runtime,
    images: ImageStore,
    settings: SnapshotSettings,
    busy: Mutex<HashSet<String>>,
    slots: Semaphore,
}

/// Marks a sandbox as being snapshotted until dropped.
struct Busy(Arc<Inner>, String);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
    }
}

/// Whether `tenant` can be one path component of a repository name.
fn path_component(tenant: &str) -> bool {
    let b = tenant.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Where a snapshot goes: `reference` checked against the tenant's part of `repository`,
/// or the default name.
pub fn target(
    repository: &str,
    tenant: &str,
    sandbox_id: &str,
    reference: &str,
    now_ms: u64,
) -> Result<String, Status> {
    if !path_component(tenant) {
        return Err(Status::invalid_argument(format!(
            "tenant: {tenant:?} cannot name a repository path component (lowercase letters, \
             digits, '.', '_', '-')"
        )));
    }
    let prefix = format!("{repository}/{tenant}/");
    let chosen = if reference.is_empty() {
        format!("{prefix}{sandbox_id}:{now_ms}")
    } else {
        reference.to_owned()
    };
    let parsed = berth_proto::image::ImageReference::parse(&chosen)
        .map_err(|why| Status::invalid_argument(format!("reference: {why}")))?;
    if parsed.digest.is_some() {
        return Err(Status::invalid_argument(
            "reference: a snapshot is pushed to a tag, not a digest (its digest is answered)",
        ));
    }
    if parsed.tag.is_none() {
        return Err(Status::invalid_argument(format!(
            "reference: {chosen:?} has no tag; name one (`{prefix}NAME:TAG`)"
        )));
    }
    if !chosen.starts_with(&prefix) {
        return Err(Status::invalid_argument(format!(
            "reference: {chosen:?} is outside this tenant's part of the snapshot repository; \
             name it `{prefix}NAME:TAG`"
        )));
    }
    Ok(chosen)
}

impl Snapshots {
    /// Snapshots of `runtime`'s sandboxes, built on `images`' cache and registries.
    pub fn new(runtime: Runtime, images: ImageStore, settings: SnapshotSettings) -> Snapshots {
        // Layers of snapshots cut short by a restart.
        let _ = std::fs::remove_dir_all(&settings.work_dir);
        Snapshots {
            inner: Arc::new(Inner {
                runtime,
                images,
                settings,
                busy: Mutex::default(),
                slots: Semaphore::new(MAX_CONCURRENT),
            }),
        }
    }

    /// `AgentService.SnapshotSandbox`: checks the request, then takes the snapshot on its
    /// own task, streaming phases and the result. The caller going away stops it.
    pub async fn snapshot(&self, req: pb::AgentSnapshotRequest) -> Result<Progress, Status> {
        let started_ms = unix_ms();
        let inner = &*self.inner;
        let id = req.sandbox_id;
        if !valid_sandbox_id(&id) {
            return Err(Status::invalid_argument(format!(
                "sandbox_id: {id:?} is not a sandbox id"
            )));
        }
        if inner.settings.repository.is_empty() {
            return Err(Status::failed_precondition(
                "this node has no snapshot repository ([agent] snapshot_repository); \
                 filesystem snapshots need one",
            ));
        }
        let target = target(
            &inner.settings.repository,
            &req.tenant,
            &id,
            &req.reference,
            started_ms,
        )?;
        let runtime = inner.runtime.clone();
        let lookup = id.clone();
        let sandbox = tokio::task::spawn_blocking(move || runtime.inspect(&lookup))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| {
                Status::not_found(format!("sandbox_id: this node has no sandbox {id}"))
            })?;
        if let LocalState::Finished(_) = sandbox.state {
            return Err(Status::failed_precondition(format!(
                "sandbox_id: {id} has ended; only a running, standby or paused sandbox can be \
                 snapshotted"
            )));
        }
        let launch = sandbox.launch;
        if launch.image.is_empty() || launch.image_digest.is_empty() {
            return Err(Status::failed_precondition(format!(
                "sandbox_id: {id} has no image (it runs on the host's root); only a sandbox \
                 created from an image can be snapshotted"
            )));
        }
        if !inner
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone())
        {
            return Err(Status::failed_precondition(format!(
                "sandbox_id: a snapshot of {id} is already being taken; retry when it ends"
            )));
        }
        let busy = Busy(self.inner.clone(), id.clone());
        let flush = sandbox.state == LocalState::Running && launch.sandboxd_dir.is_some();
        let job = Job {
            work: inner.settings.work_dir.join(format!("{id}-{started_ms}")),
            id,
            launch,
            flush,
            target,
            started_ms,
        };
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                () = tx.closed() => None,
                r = this.take(&job, &tx) => Some(r),
            };
            let _ = tokio::fs::remove_dir_all(&job.work).await;
            drop(busy);
            match result {
                None => {
                    tracing::info!(sandbox = %job.id, "snapshot cancelled: its caller went away")
                }
                Some(Err(s)) => {
                    tracing::warn!(sandbox = %job.id, error = %s.message(), "snapshot failed");
                    let _ = tx.send(Err(s)).await;
                }
                Some(Ok(done)) => {
                    tracing::info!(sandbox = %job.id, reference = %done.reference, digest = %done.digest, layer_bytes = done.layer_bytes, "sandbox filesystem snapshot pushed");
                    let _ = tx
                        .send(Ok(pb::SnapshotSandboxProgress {
                            message: Some(Message::Done(done)),
                        }))
                        .await;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Flushes, writes the layer, pushes; sends each phase as it starts.
    async fn take(
        &self,
        job: &Job,
        tx: &mpsc::Sender<Result<pb::SnapshotSandboxProgress, Status>>,
    ) -> Result<pb::SnapshotSandboxResponse, Status> {
        let phase = |name: &str| {
            Ok(pb::SnapshotSandboxProgress {
                message: Some(Message::Phase(name.to_owned())),
            })
        };
        let inner = &*self.inner;
        let _slot = inner
            .slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        let dir = inner.runtime.dir(&job.id);
        if job.flush {
            let _ = tx.send(phase("flushing")).await;
            sync_caches(&dir, &job.id).await?;
        }
        let upper = dir.join("fs/upper");
        if !upper.is_dir() {
            return Err(Status::failed_precondition(format!(
                "sandbox_id: {} has no write layer on this node ({})",
                job.id,
                upper.display()
            )));
        }
        let _ = tx.send(phase("writing the layer")).await;
        tokio::fs::create_dir_all(&job.work)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", job.work.display())))?;
        let (out, limit) = (job.work.join("layer.tar.gz"), inner.settings.max_bytes);
        let id = job.id.clone();
        let layer =
            tokio::task::spawn_blocking(move || layer_diff::write_layer(&upper, &out, limit))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| match e {
                    DiffError::TooLarge { .. } => {
                        Status::resource_exhausted(format!("sandbox_id: {id}: {e}"))
                    }
                    DiffError::Io(why) => {
                        Status::internal(format!("reading the write layer of {id}: {why}"))
                    }
                })?;
        let _ = tx.send(phase("pushing")).await;
        let digest = inner
            .images
            .push_snapshot(SnapshotPush {
                base_reference: &job.launch.image,
                base_digest: &job.launch.image_digest,
                target: &job.target,
                layer: &layer,
                created_by: format!("berth sandbox snapshot {}", job.id),
                work_dir: &job.work,
            })
            .await
            .map_err(|why| {
                Status::unavailable(format!("pushing the snapshot to {}: {why}", job.target))
            })?;
        Ok(pb::SnapshotSandboxResponse {
            reference: job.target.clone(),
            digest,
            layer_bytes: layer.size,
            uncompressed_bytes: layer.file_bytes,
            base_reference: job.launch.image.clone(),
            base_digest: job.launch.image_digest.clone(),
            entries: layer.entries,
            took_ms: unix_ms().saturating_sub(job.started_ms),
        })
    }
}

/// Asks the sandbox's helper to `sync(2)`, so gVisor's cached writes reach `fs/upper`.
async fn sync_caches(dir: &std::path::Path, id: &str) -> Result<(), Status> {
    let call = async {
        let (mut tx, mut rx) = crate::sandboxd::connect(dir, id).await?;
        tx.send(&ToHelper::Sync).await?;
        match rx.recv().await? {
            Some(FromHelper::Synced) => Ok(()),
            Some(FromHelper::Error { kind, message }) => {
                Err(crate::sandboxd::status(kind, message))
            }
            other => Err(Status::unavailable(format!(
                "the sandbox's helper answered {other:?} to a sync"
            ))),
        }
    };
    match tokio::time::timeout(SYNC_TIMEOUT, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(s)) => Err(Status::new(
            s.code(),
            format!(
                "flushing the file caches of {id} before reading its write layer: {}",
                s.message()
            ),
        )),
        Err(_) => Err(Status::unavailable(format!(
            "flushing the file caches of {id}: no answer in {} s",
            SYNC_TIMEOUT.as_secs()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_stay_in_the_tenant_s_part_of_the_repository() {
        let repo = "127.0.0.1:5000/snapshots";
        let t =
            |tenant: &str, reference: &str| target(repo, tenant, "sbx-0000000001", reference, 42);
        assert_eq!(
            t("acme", "").expect("default"),
            "127.0.0.1:5000/snapshots/acme/sbx-0000000001:42"
        );
        assert_eq!(
            t("acme", "127.0.0.1:5000/snapshots/acme/dev:v1").expect("chosen"),
            "127.0.0.1:5000/snapshots/acme/dev:v1"
        );
        for (tenant, reference, says) in [
            ("acme", "127.0.0.1:5000/snapshots/other/dev:v1", "outside"),
            ("acme", "127.0.0.1:5000/snapshots/acme-x/dev:v1", "outside"),
            ("acme", "ghcr.io/acme/dev:v1", "outside"),
            ("acme", "127.0.0.1:5000/snapshots/acme/dev", "no tag"),
            ("acme", "127.0.0.1:5000/snapshots/acme/Dev:v1", "reference:"),
            ("Acme", "", "tenant:"),
            ("../x", "", "tenant:"),
        ] {
            let err = t(tenant, reference).expect_err(reference);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{reference}");
            assert!(
                err.message().contains(says),
                "{reference}: {}",
                err.message()
            );
        }
        let digest = format!(
            "127.0.0.1:5000/snapshots/acme/dev@sha256:{}",
            "a".repeat(64)
        );
        assert!(
            t("acme", &digest)
                .expect_err("digest")
                .message()
                .contains("digest")
        );
    }
}
