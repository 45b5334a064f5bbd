//! Commands the state machine applies, and what each item of a command came to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use berth_proto::FieldErrors;

use crate::model::{NodeId, NodeSpec, NodeStatus, Placement, SandboxId, SandboxSpec, TenantQuota};

/// Most items in one batched command; a bigger batch is refused whole.
pub const MAX_BATCH_ITEMS: usize = 65_536;

/// Longest disconnect grace a command may ask for (one day); longer ones are cut to it.
/// A node gone longer than that is not coming back with its sandboxes intact.
pub const MAX_DISCONNECT_GRACE_MS: u64 = 24 * 3600 * 1000;

/// One replicated command. Batches carry many items and yield one outcome per item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Register a node or re-register it with a new inventory (its epoch increases).
    RegisterNode {
        /// The inventory.
        spec: NodeSpec,
    },
    /// Operator change of a node's status. `Down` turns its sandboxes Lost at once (the
    /// liveness checker uses [`Command::NodeDisconnected`] instead).
    SetNodeStatus {
        /// Node.
        node: NodeId,
        /// New status.
        status: NodeStatus,
        /// Why, for the record.
        reason: String,
    },
    /// Forget a node that holds no sandboxes.
    RemoveNode {
        /// Node.
        node: NodeId,
    },
    /// Create sandboxes, each optionally with a placement (the leader's hot path proposes
    /// both in one entry).
    SubmitSandboxes {
        /// The creates.
        items: Vec<Submission>,
    },
    /// Bind pending sandboxes.
    BindSandboxes {
        /// Sandbox and where.
        items: Vec<(SandboxId, Placement)>,
    },
    /// Record why pending sandboxes could not be placed.
    SetPendingReasons {
        /// Sandbox and reason.
        items: Vec<(SandboxId, String)>,
    },
    /// Status reported by agents (or decided by the leader, e.g. a timeout).
    UpdateSandboxes {
        /// The updates.
        items: Vec<StatusUpdate>,
    },
    /// Delete sandboxes, releasing what they hold.
    DeleteSandboxes {
        /// Ids.
        items: Vec<SandboxId>,
    },
    /// Forget terminal sandboxes that finished before a time (bounds the state's size).
    ExpireTerminal {
        /// Cut-off in ms.
        finished_before_ms: u64,
    },
    /// Record a new API or join token (its hash).
    PutToken {
        /// The record.
        token: super::tokens::TokenRecord,
    },
    /// Revoke a token.
    RevokeToken {
        /// Its id.
        id: String,
    },
    /// Use a join token for a node, at the entry's time (single use).
    UseJoinToken {
        /// Token id.
        id: String,
        /// SHA-256 of the whole token presented.
        hash: [u8; 32],
        /// The node joining.
        node: String,
    },
    /// Set or replace a tenant's quota.
    SetTenantQuota {
        /// Tenant.
        tenant: String,
        /// Quota.
        quota: TenantQuota,
    },
    /// A node's agent (re)connected: register the node as [`Command::RegisterNode`] does
    /// (Unknown sandboxes return to Scheduled or Running), make Lost every sandbox the
    /// state has Running there that the agent does not have (it restarted without it),
    /// and apply what the agent reports of the rest: its report stands (Running, Exited
    /// with its code, Failed).
    RegisterAgent {
        /// The inventory.
        spec: NodeSpec,
        /// Every sandbox the agent has, running or finished, with its state there.
        has: BTreeMap<SandboxId, StatusChange>,
    },
    /// An autoscaler takes or renews the autoscaler lease until `now + ttl_ms`, and, when
    /// it holds it, appends its latest decisions to the record `berth cluster status`
    /// shows. Only the holder may act; another instance is refused until the lease lapses.
    AutoscalerLease {
        /// Who asks (unique per autoscaler process).
        holder: String,
        /// How long the lease lasts from this command's time.
        ttl_ms: u64,
        /// Decision lines to record, oldest first.
        decisions: Vec<String>,
    },
    /// The liveness checker found a node silent past its TTL: the node is Down and its
    /// Scheduled and Running sandboxes are Unknown, keeping their resources, until
    /// `now + grace_ms` (at most [`MAX_DISCONNECT_GRACE_MS`]). A grace of 0 makes them
    /// Lost at once. A node already Down is left as it is.
    NodeDisconnected {
        /// Node.
        node: NodeId,
        /// Why, for the record.
        reason: String,
        /// How long its sandboxes stay Unknown before they are Lost.
        grace_ms: u64,
    },
    /// Pause running sandboxes: each becomes Pausing until its agent reports the snapshot
    /// taken ([`StatusChange::Paused`]). A sandbox holding GPUs is refused unless
    /// `gpu_filesystem_only` (the leader's config, carried in the entry): gVisor cannot
    /// checkpoint GPU state, so such a pause keeps files only and processes restart.
    PauseSandboxes {
        /// Ids.
        items: Vec<SandboxId>,
        /// Whether a GPU sandbox may be paused keeping its files only.
        gpu_filesystem_only: bool,
    },
    /// Put running sandboxes on standby: each is frozen in place, keeping its memory and
    /// GPUs on its node and giving back its CPU. A resume thaws it there.
    StandbySandboxes {
        /// Ids.
        items: Vec<SandboxId>,
    },
    /// Resume paused sandboxes: each becomes Pending with its snapshot, and placement
    /// prefers the snapshot's node. A Standby sandbox is thawed on its node (Scheduled
    /// there again) when the node has its CPU free.
    ResumeSandboxes {
        /// Ids.
        items: Vec<SandboxId>,
    },
    /// Unknown sandboxes whose disconnect grace has ended by this command's time become
    /// Lost. Each is re-checked: one whose node came back, or whose grace runs on, is
    /// refused and stays as it is.
    ExpireDisconnected {
        /// Sandboxes the leader saw past their grace.
        items: Vec<SandboxId>,
    },
    /// Set or replace a warm pool ([`super::pools`]); members that no longer fit it are
    /// deleted.
    SetWarmPool {
        /// Its name, unique in the cluster.
        name: String,
        /// What it keeps.
        pool: super::pools::WarmPool,
    },
    /// Delete a warm pool and its unclaimed members.
    DeleteWarmPool {
        /// Its name.
        name: String,
    },
    /// Make new members of warm pools short of their size: pool name and how many.
    RefillWarmPools {
        /// Pool and count.
        items: Vec<(String, u32)>,
    },
    /// End paused sandboxes whose snapshot is past its tenant's retention (the leader's
    /// config): each item is a sandbox and the retention in ms the leader used. Each is
    /// re-checked against this command's time; one no longer Paused (resumed, ended) or
    /// not that old is refused and stays as it is.
    ExpireSnapshots {
        /// Sandbox and the retention it is past.
        items: Vec<(SandboxId, u64)>,
    },
}

impl Command {
    /// Number of items; a non-batch command counts as one.
    pub fn items(&self) -> usize {
        match self {
            Command::SubmitSandboxes { items } => items.len(),
            Command::BindSandboxes { items } => items.len(),
            Command::SetPendingReasons { items } => items.len(),
            Command::UpdateSandboxes { items } => items.len(),
            Command::DeleteSandboxes { items } => items.len(),
            Command::ExpireDisconnected { items } => items.len(),
            Command::PauseSandboxes { items, .. } => items.len(),
            Command::ResumeSandboxes { items } => items.len(),
            Command::StandbySandboxes { items } => items.len(),
            Command::RefillWarmPools { items } => items.len(),
            Command::ExpireSnapshots { items } => items.len(),
            Command::RegisterAgent { has, .. } => has.len().max(1),
            Command::AutoscalerLease { decisions, .. } => decisions.len().max(1),
            _ => 1,
        }
    }
}

/// One create, from the API to the log: the API makes it with no placement, the leader's
/// planner adds one when the sandbox fits now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    /// Idempotency key, unique per tenant.
    pub request_id: String,
    /// Spec.
    pub spec: SandboxSpec,
    /// Where to bind it right away, if the leader placed it.
    pub placement: Option<Placement>,
}

impl Submission {
    /// A create not placed yet.
    pub fn new(request_id: String, spec: SandboxSpec) -> Submission {
        Submission {
            request_id,
            spec,
            placement: None,
        }
    }
}

/// A sandbox status change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// Sandbox.
    pub sandbox: SandboxId,
    /// The node reporting it; a report from another node is stale.
    pub node: NodeId,
    /// What happened.
    pub change: StatusChange,
}

/// The changes an agent can report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusChange {
    /// It started.
    Running,
    /// It exited.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// It failed to start or was killed (timeout, OOM).
    Failed {
        /// Why.
        reason: String,
    },
    /// It is frozen in place (standby), as it was asked to be.
    Standby,
    /// It was checkpointed to the node's disk (asked to, or after its idle time).
    Paused {
        /// The snapshot's size on disk.
        bytes: u64,
        /// What the snapshot holds.
        mode: crate::model::SnapshotMode,
    },
    /// Its pause could not be carried out; it runs on.
    PauseFailed {
        /// Why, for the record.
        reason: String,
    },
}

/// What one item of a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// A sandbox was created; `bound` when its placement was accepted too.
    Created {
        /// New id.
        id: SandboxId,
        /// Whether it is Scheduled.
        bound: bool,
        /// Why its placement was refused, when one was given and refused.
        bind_rejected: Option<Rejection>,
    },
    /// A warm pool's ready member was claimed for the create: it existed before it.
    Claimed {
        /// The member, now the create's sandbox.
        id: SandboxId,
        /// The pool it came from.
        pool: String,
    },
    /// The request id was seen before; this is the original sandbox.
    Duplicate {
        /// The original.
        id: SandboxId,
    },
    /// Done.
    Applied,
    /// Refused; nothing changed for this item.
    Rejected(Rejection),
}

/// Why `apply` refused an item. The message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    /// The spec breaks a bound or rule; every bad field with its path.
    #[error("invalid spec: {}", .0.one_line())]
    InvalidSpec(FieldErrors),
    /// The batch is above [`MAX_BATCH_ITEMS`].
    #[error("batch of {0} items is above the limit of {MAX_BATCH_ITEMS}")]
    BatchTooLarge(usize),
    /// Tenant at its concurrent-sandbox quota.
    #[error("tenant {tenant} is at its quota of {max} concurrent sandboxes")]
    ConcurrencyQuota {
        /// Tenant.
        tenant: String,
        /// Its quota.
        max: u32,
    },
    /// Tenant at its GPU quota for a model.
    #[error("tenant {tenant} would hold {would_hold} milli-GPUs of {model}; its quota is {max}")]
    GpuQuota {
        /// Tenant.
        tenant: String,
        /// Model.
        model: String,
        /// Usage after the bind.
        would_hold: u64,
        /// Quota.
        max: u64,
    },
    /// No such node.
    #[error("node {0} is not registered")]
    UnknownNode(String),
    /// The plan was made against an older registration of the node.
    #[error("node {node} is at epoch {current}; the placement was made for epoch {planned}")]
    StaleEpoch {
        /// Node.
        node: String,
        /// Epoch in the plan.
        planned: u64,
        /// Current epoch.
        current: u64,
    },
    /// The node is cordoned, draining or down.
    #[error("node {node} is {status:?}")]
    NodeNotReady {
        /// Node.
        node: String,
        /// Status.
        status: NodeStatus,
    },
    /// Not enough CPU or memory left.
    #[error("node {node} has {free} {resource} free; the sandbox needs {need}")]
    Insufficient {
        /// Node.
        node: String,
        /// "cpu_milli" or "memory_mib".
        resource: &'static str,
        /// Free.
        free: u64,
        /// Needed.
        need: u64,
    },
    /// A GPU in the plan does not exist, is unhealthy, is too small, is listed twice, or
    /// has too little free.
    #[error("node {node} GPU {index}: {why}")]
    Gpu {
        /// Node.
        node: String,
        /// GPU index.
        index: u32,
        /// What is wrong.
        why: String,
    },
    /// The plan does not match the request (option index, count, milli, model).
    #[error("placement does not match the request: {0}")]
    PlanMismatch(String),
    /// The node does not satisfy a hard constraint of the sandbox.
    #[error("node {node} breaks a constraint: {why}")]
    Constraint {
        /// Node.
        node: String,
        /// Which.
        why: String,
    },
    /// No such sandbox.
    #[error("sandbox {0} does not exist")]
    UnknownSandbox(SandboxId),
    /// The sandbox is not in a state that allows this.
    #[error("sandbox {id} is {state}; {what} is not allowed")]
    InvalidTransition {
        /// Sandbox.
        id: SandboxId,
        /// Its state name.
        state: &'static str,
        /// The attempted change.
        what: &'static str,
    },
    /// A status report from a node the sandbox is not bound to.
    #[error("sandbox {id} is not bound to node {node}")]
    NotBoundHere {
        /// Sandbox.
        id: SandboxId,
        /// Reporting node.
        node: String,
    },
    /// An Unknown sandbox's disconnect grace has not ended yet.
    #[error("sandbox {id} stays Unknown until {lost_after_ms} ms; its grace has not ended")]
    GraceNotOver {
        /// Sandbox.
        id: SandboxId,
        /// When it may be Lost.
        lost_after_ms: u64,
    },
    /// A down node must re-register to become Ready.
    #[error("node {0} is down; it becomes ready by registering again")]
    MustReregister(String),
    /// Another autoscaler holds the lease.
    #[error("the autoscaler lease is held by {holder} until {expires_ms} ms")]
    LeaseHeld {
        /// Its holder.
        holder: String,
        /// When it lapses unless renewed.
        expires_ms: u64,
    },
    /// A token operation was refused.
    #[error("{0}")]
    Token(String),
    /// A node holding sandboxes cannot be removed.
    #[error("node {node} still holds {count} sandboxes; drain it first")]
    NodeNotEmpty {
        /// Node.
        node: String,
        /// Sandboxes on it.
        count: usize,
    },
    /// gVisor cannot checkpoint GPU state, and the filesystem-only pause is off.
    #[error(
        "sandbox {0} holds GPUs, and gVisor cannot checkpoint GPU state (nvproxy has no save/restore); \
         an operator can allow a filesystem-only pause ([scheduler.sessions] gpu_pause_filesystem_only = true), \
         which keeps its files and restarts its processes on resume"
    )]
    GpuPause(SandboxId),
    /// The sandbox's node runs the process runtime, which has no checkpoint.
    #[error(
        "sandbox {0} runs on node {1}, whose agent uses the process runtime (no isolation and \
         no checkpoint); pause needs a gvisor node"
    )]
    NoCheckpoint(SandboxId, NodeId),
    /// A pause would take the node past its snapshot disk budget.
    #[error(
        "node {node} holds {used} bytes of snapshots and pauses under way, of its budget of \
         {budget} ([agent] snapshot_disk_budget_bytes); pausing sandbox {id} needs about {need} \
         more: resume or delete paused sandboxes there, or raise the budget"
    )]
    SnapshotBudget {
        /// Sandbox.
        id: SandboxId,
        /// Its node.
        node: NodeId,
        /// Bytes kept and promised there.
        used: u64,
        /// This pause's estimate (its memory).
        need: u64,
        /// The node's budget.
        budget: u64,
    },
    /// The sandbox is an unclaimed member of a warm pool: only a matching create takes it.
    #[error(
        "sandbox {0} is a member of warm pool {1}, kept warm until a matching create claims it; \
         delete the pool or change its size instead"
    )]
    PoolMember(SandboxId, String),
    /// A Standby sandbox thaws on its own node, which has not the CPU free for it now.
    #[error(
        "sandbox {id} is on standby on node {node}, which has {free} milli-CPU free and it \
         needs {need} to run again; retry when the node has room, or pause it to disk so \
         it can resume elsewhere"
    )]
    NoRoomToThaw {
        /// Sandbox.
        id: SandboxId,
        /// Its node.
        node: NodeId,
        /// CPU free there.
        free: u64,
        /// CPU it needs.
        need: u64,
    },
    /// A snapshot expiry for a sandbox whose snapshot is younger than the retention.
    #[error("sandbox {id}'s snapshot, taken at {taken_ms} ms, is kept for {retention_ms} ms")]
    SnapshotKept {
        /// Sandbox.
        id: SandboxId,
        /// When its snapshot was taken.
        taken_ms: u64,
        /// The retention asked for (0 = kept forever).
        retention_ms: u64,
    },
}
