//! A sandbox in the replicated state: its lifecycle state, where it is placed and bound,
//! and the snapshot it was paused to.

use serde::{Deserialize, Serialize};

use berth_proto::GpuModelName;

use super::{NodeId, SandboxId, SandboxSpec};

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxState {
    /// Waiting for placement.
    Pending,
    /// Bound to a node; not yet reported running.
    Scheduled,
    /// Running on its node.
    Running,
    /// Its process ended.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// Could not run, or was stopped by berth.
    Failed {
        /// Why.
        reason: String,
    },
    /// Its node went down.
    Lost {
        /// Why.
        reason: String,
    },
    /// Its node stopped heartbeating while it was Scheduled or Running (Nomad's
    /// disconnected client). It keeps its CPU, memory and GPUs until its node reports
    /// again, when the agent's report stands, or until `lost_after_ms`, when it is Lost.
    Unknown {
        /// Why (its node's down reason).
        reason: String,
        /// When its node was marked down (ms since the unix epoch, the entry's clock).
        since_ms: u64,
        /// When it becomes Lost unless its node reports first.
        lost_after_ms: u64,
        /// Whether it had been reported running (otherwise it was Scheduled): what it
        /// returns to when its node registers again.
        was_running: bool,
    },
    /// Asked to pause: its agent is checkpointing it. It holds what Running holds until the
    /// agent reports the snapshot taken.
    Pausing,
    /// Checkpointed to its node's disk ([`Sandbox::snapshot`] says where): it holds no CPU,
    /// memory or GPU, and resumes through placement, preferring the snapshot's node.
    Paused,
    /// Frozen in place (standby): it keeps its memory and GPUs on its node but no CPU (its
    /// node's `standby` set says so), and resumes there, thawed, in milliseconds.
    Standby {
        /// When it was frozen (the entry's clock): `standby_pause_after_ms` counts from here.
        since_ms: u64,
    },
}

impl SandboxState {
    /// Exited, Failed or Lost.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            SandboxState::Exited { .. } | SandboxState::Failed { .. } | SandboxState::Lost { .. }
        )
    }

    /// Scheduled, Running, Unknown, Pausing or Standby: holds resources on a node (a
    /// Standby sandbox its memory and GPUs only).
    pub fn holds_resources(&self) -> bool {
        matches!(
            self,
            SandboxState::Scheduled
                | SandboxState::Running
                | SandboxState::Unknown { .. }
                | SandboxState::Pausing
                | SandboxState::Standby { .. }
        )
    }

    /// Stable short name for metrics and counters.
    pub fn name(&self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Scheduled => "scheduled",
            SandboxState::Running => "running",
            SandboxState::Exited { .. } => "exited",
            SandboxState::Failed { .. } => "failed",
            SandboxState::Lost { .. } => "lost",
            SandboxState::Unknown { .. } => "unknown",
            SandboxState::Pausing => "pausing",
            SandboxState::Paused => "paused",
            SandboxState::Standby { .. } => "standby",
        }
    }
}

/// Where a sandbox is placed: the output of placement, re-checked by `apply`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// Node.
    pub node: NodeId,
    /// The node epoch the plan was made against; a re-registered node rejects it.
    pub epoch: u64,
    /// Index of the GPU request option used (0 when CPU-only).
    pub option: u32,
    /// Bound GPU indices (empty when CPU-only).
    pub gpu_indices: Vec<u32>,
    /// Milli-GPU taken on each bound GPU.
    pub gpu_milli_per_gpu: u32,
}

/// A sandbox's binding once `apply` accepted a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The placement.
    pub placement: Placement,
    /// Model of the bound GPUs.
    pub gpu_model: Option<GpuModelName>,
    /// Revision at which it was bound.
    pub bound_revision: u64,
}

/// A sandbox in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    /// Id.
    pub id: SandboxId,
    /// Client idempotency key.
    pub request_id: String,
    /// Spec.
    pub spec: SandboxSpec,
    /// State.
    pub state: SandboxState,
    /// Binding while Scheduled, Running or Unknown (kept, for the record, once terminal).
    pub binding: Option<Binding>,
    /// Why it is still Pending, from the last placement attempt.
    pub pending_reason: Option<String>,
    /// Revision of the command that created it (quota checks use it).
    pub created_revision: u64,
    /// Times (ms since the unix epoch, as proposed by the leader).
    pub created_ms: u64,
    /// When bound.
    pub scheduled_ms: Option<u64>,
    /// When reported running.
    pub started_ms: Option<u64>,
    /// When it became terminal.
    pub finished_ms: Option<u64>,
    /// The checkpoint it was paused to, while Paused or resuming from it (Pending or
    /// Scheduled with a snapshot restore from it); cleared once it runs again.
    pub snapshot: Option<SnapshotRecord>,
    /// What its last bind said beyond the placement: for a resume, whether snapshot
    /// affinity was hit, and why not when it was missed.
    pub placement_note: Option<String>,
    /// The warm pool it is a member of, until a create claims it.
    pub pool: Option<String>,
}

/// How a pause was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotMode {
    /// Memory and files (`runsc checkpoint`): processes continue where they were.
    Memory,
    /// Files only, for sandboxes gVisor cannot checkpoint (GPUs): processes restart.
    FilesystemOnly,
}

/// Where a paused sandbox's snapshot lives, as its agent reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The node holding it.
    pub node: NodeId,
    /// That node's runtime when it took it ([`NodeSpec::runtime`]): where it may be restored.
    pub runtime: String,
    /// Its size on that node's disk.
    pub bytes: u64,
    /// When it was recorded (the entry's clock).
    pub taken_ms: u64,
    /// What it holds.
    pub mode: SnapshotMode,
}
