//! Starting assigned sandboxes off the session loop.
//!
//! Each assignment becomes a task: pull its image (the image cache bounds and coalesces
//! pulls), resolve its process from the spec and the image, then wait for one of
//! `max_concurrent_starts` start slots, launch its shim, and hold the slot until the runtime
//! runs the sandbox (the shim's `started`) or it ended. Work beyond the slots queues here;
//! the session loop only hands assignments over and never waits on any of it, so heartbeats
//! go out on time however many sandboxes arrive at once. A sandbox that cannot be started
//! (a pull failure, nothing to run) is recorded as failed in its directory, where the
//! monitor picks it up and reports it like any other ending.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tonic::transport::Channel;

use berth_proto::pb::v1::node_service_client::NodeServiceClient;

use crate::image::ImageStore;
use crate::launch::{self, Launch};
use crate::metrics::AgentMetrics;
use crate::runtime::Runtime;

/// How long a start slot is held at most while the runtime boots a sandbox.
const START_SLOT_LIMIT: Duration = Duration::from_secs(60);
/// How often a start in flight is looked at.
const START_POLL: Duration = Duration::from_millis(20);

/// An assignment as the starter takes it: the launch with the spec's command and env still
/// unresolved against the image.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// Everything but the resolved process.
    pub launch: Launch,
    /// The spec's command (may be empty when the image has one).
    pub command: Vec<String>,
    /// The spec's env.
    pub env: BTreeMap<String, String>,
    /// A resume onto this node of a sandbox paused on another: its snapshot is fetched
    /// before the shim starts, and the shim restores it.
    pub snapshot_from: Option<SnapshotSource>,
}

/// Where a resumed sandbox's snapshot comes from: the holder, through the scheduler.
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// The session's client of the scheduler leader.
    pub client: NodeServiceClient<Channel>,
    /// This node.
    pub node_id: String,
    /// The node holding it.
    pub holder: String,
    /// Its size as the holder reported it.
    pub bytes: u64,
}

/// Hands assignments to start tasks (cheap to clone).
#[derive(Clone)]
pub struct Starter {
    runtime: Runtime,
    images: ImageStore,
    metrics: Arc<AgentMetrics>,
    slots: Arc<Semaphore>,
    /// Sandboxes handed over and not yet started (or failed).
    pending: Arc<Mutex<HashSet<String>>>,
    /// Sandboxes the scheduler stopped while they waited.
    cancelled: Arc<Mutex<BTreeMap<String, String>>>,
    /// Tells the monitor to look now (a start settled: its report need not wait a tick).
    settled: Option<Arc<tokio::sync::Notify>>,
}

impl Starter {
    /// A starter with `max_starts` start slots.
    pub fn new(
        runtime: Runtime,
        images: ImageStore,
        metrics: Arc<AgentMetrics>,
        max_starts: usize,
    ) -> Starter {
        Starter {
            runtime,
            images,
            metrics,
            slots: Arc::new(Semaphore::new(max_starts.max(1))),
            pending: Arc::default(),
            cancelled: Arc::default(),
            settled: None,
        }
    }

    /// The same, nudging `monitor` each time a start or resume settles.
    pub fn nudging(mut self, monitor: Arc<tokio::sync::Notify>) -> Starter {
        self.settled = Some(monitor);
        self
    }

    /// Starts a sandbox unless it is already here or on its way. Never blocks.
    pub fn submit(&self, request: StartRequest) {
        let id = request.launch.sandbox_id.clone();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if pending.contains(&id)
                || self
                    .runtime
                    .dir(&id)
                    .join(crate::runtime::files::LAUNCH)
                    .exists()
            {
                return;
            }
            pending.insert(id.clone());
        }
        self.metrics.starts_queued.inc();
        let this = self.clone();
        tokio::spawn(async move {
            let arrived = Instant::now();
            this.start(request, arrived).await;
            this.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
            this.cancelled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Resumes a sandbox paused on this node, in a start slot like a start. One that is
    /// not paused here (its directory is gone) is recorded as failed; one already running
    /// again (the assignment delivered twice) is left alone.
    pub fn resume(&self, launch: Launch) {
        let id = launch.sandbox_id.clone();
        if !self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone())
        {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let arrived = Instant::now();
            if let Ok(_slot) = this.slots.acquire().await {
                let runtime = this.runtime.clone();
                let (rid, epoch) = (id.clone(), launch.epoch);
                let resumed =
                    tokio::task::spawn_blocking(move || runtime.resume(&rid, epoch)).await;
                match resumed {
                    Ok(Ok(true)) => {
                        tracing::info!(sandbox = %id, "sandbox resuming from its snapshot");
                        this.metrics.starts_in_flight.inc();
                        this.hold_until_settled(&id).await;
                        this.metrics.starts_in_flight.dec();
                        this.metrics
                            .resume_seconds
                            .observe(arrived.elapsed().as_secs_f64());
                    }
                    Ok(Ok(false))
                        if this
                            .runtime
                            .dir(&id)
                            .join(crate::runtime::files::LAUNCH)
                            .exists() => {}
                    Ok(Ok(false)) => {
                        this.fail(&launch, "its snapshot is not on this node any more".into())
                            .await;
                    }
                    Ok(Err(e)) => {
                        this.fail(&launch, format!("the agent could not resume it: {e}"))
                            .await;
                    }
                    Err(e) => {
                        this.fail(&launch, format!("the agent could not resume it: {e}"))
                            .await;
                    }
                }
            }
            this.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Holds the caller's start slot while the runtime boots the sandbox (bounded).
    async fn hold_until_settled(&self, id: &str) {
        let deadline = Instant::now() + START_SLOT_LIMIT;
        loop {
            let runtime = self.runtime.clone();
            let check = id.to_owned();
            let settled = tokio::task::spawn_blocking(move || runtime.start_settled(&check))
                .await
                .unwrap_or(true);
            if settled || Instant::now() > deadline {
                if let Some(n) = &self.settled {
                    n.notify_one();
                }
                return;
            }
            tokio::time::sleep(START_POLL).await;
        }
    }

    /// Whether a sandbox is waiting here to start.
    pub fn is_pending(&self, id: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }

    /// The scheduler stopped a sandbox: if it has not started yet, it never will.
    pub fn cancel(&self, id: &str, reason: &str) {
        if self.is_pending(id) {
            self.cancelled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.to_owned(), reason.to_owned());
        }
    }

    fn cancelled(&self, id: &str) -> Option<String> {
        self.cancelled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    async fn fail(&self, launch: &Launch, reason: String) {
        tracing::warn!(sandbox = %launch.sandbox_id, %reason, "sandbox could not be started");
        self.metrics.starts.with_label_values(&["error"]).inc();
        let runtime = self.runtime.clone();
        let launch = launch.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = runtime.record_failure(&launch, &reason) {
                tracing::warn!(sandbox = %launch.sandbox_id, error = %e, "could not record the failure");
            }
        })
        .await;
    }

    async fn start(&self, request: StartRequest, arrived: Instant) {
        let StartRequest {
            mut launch,
            command,
            env,
            snapshot_from,
        } = request;
        let id = launch.sandbox_id.clone();
        let image = if launch.image.is_empty() {
            None
        } else {
            match self.images.ensure(&launch.image, &id).await {
                Ok(image) => Some(image),
                Err(e) => {
                    self.metrics.starts_queued.dec();
                    return self.fail(&launch, format!("pulling {e}")).await;
                }
            }
        };
        // A keep-alive sandbox given no command runs nothing of the image's: the helper alone
        // keeps it up (the image's env, working directory and user still apply to execs).
        let bare = launch.keep_alive && command.is_empty();
        let placeholder = ["berth-keep-alive".to_owned()];
        let process = launch::resolve(
            if bare { &placeholder } else { &command },
            &env,
            image.as_ref(),
        )
        .map(|mut p| {
            if bare {
                p.argv.clear();
            }
            p
        });
        let process = match process {
            Ok(p) => p,
            Err(reason) => {
                self.metrics.starts_queued.dec();
                self.images.unpin(&id);
                return self.fail(&launch, reason).await;
            }
        };
        launch.command = process.argv;
        launch.env = process.env;
        launch.workdir = process.workdir;
        launch.uid = process.uid;
        launch.gid = process.gid;
        if let Some(image) = &image {
            launch.image_digest = image.digest.clone();
            launch.rootfs = Some(image.rootfs.clone());
        }
        if let Some(mut from) = snapshot_from {
            let dir = self.runtime.dir(&id);
            let fetched =
                crate::transfer::fetch(&mut from.client, &id, &from.node_id, from.bytes, &dir)
                    .await;
            match fetched {
                Ok(bytes) => {
                    tracing::info!(sandbox = %id, holder = %from.holder, bytes, "fetched the snapshot of a sandbox resuming here");
                }
                Err(why) => {
                    self.metrics.starts_queued.dec();
                    self.images.unpin(&id);
                    return self
                        .fail(
                            &launch,
                            format!("resuming from node {}: {why}", from.holder),
                        )
                        .await;
                }
            }
        }
        let Ok(_slot) = self.slots.acquire().await else {
            return;
        };
        self.metrics.starts_queued.dec();
        if let Some(reason) = self.cancelled(&id) {
            self.images.unpin(&id);
            return self
                .fail(&launch, format!("terminated before it started: {reason}"))
                .await;
        }
        self.metrics.starts_in_flight.inc();
        let runtime = self.runtime.clone();
        let spawn = {
            let launch = launch.clone();
            tokio::task::spawn_blocking(move || runtime.start(&launch)).await
        };
        match spawn {
            Ok(Ok(_)) => {
                tracing::info!(sandbox = %id, image = %launch.image, gpus = launch.gpu_uuids.len(), "sandbox starting");
            }
            Ok(Err(e)) => {
                self.metrics.starts_in_flight.dec();
                return self
                    .fail(&launch, format!("the agent could not start it: {e}"))
                    .await;
            }
            Err(e) => {
                self.metrics.starts_in_flight.dec();
                return self
                    .fail(&launch, format!("the agent could not start it: {e}"))
                    .await;
            }
        }
        if let Some(reason) = self.cancelled(&id) {
            let _ = self
                .runtime
                .terminate(&id, Duration::from_secs(10), &reason);
        }
        // Hold the slot while the runtime boots it: that is the costly part of a start.
        self.hold_until_settled(&id).await;
        self.metrics.starts_in_flight.dec();
        self.metrics.starts.with_label_values(&["ok"]).inc();
        self.metrics
            .start_seconds
            .observe(arrived.elapsed().as_secs_f64());
    }
}
