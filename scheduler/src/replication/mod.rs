//! Replication: the scheduler state machine made highly available with Raft.
//!
//! - [`replica`]: one replica, sans-IO: raft-rs `RawNode`, the state machine, and the
//!   leader's planner ([`crate::leader`]). Production and the harness run the same code.
//! - [`log_store`]: the in-memory log raft-rs reads, and the [`log_store::Durable`] trait.
//! - [`engine`]: the production durable store on raft-engine.
//! - [`harness`]: a deterministic cluster with a seeded faulty network (`harness/network.rs`)
//!   and crashes, and clients that retry (`harness/clients.rs`).
//! - [`codec`]: what berth puts in entries and snapshots.
//! - [`slog_bridge`]: raft-rs logs through slog; this forwards it to tracing.

pub mod codec;
pub mod engine;
pub mod harness;
pub mod log_store;
pub mod replica;
pub mod slog_bridge;

pub use codec::ProposalId;
pub use replica::{
    Applied, MembershipChange, Output, ProposeError, RaftStatus, Replica, ReplicaConfig,
};
