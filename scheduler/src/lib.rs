//! The berth scheduler: the Raft replication around berth's state machine, the leader's
//! planner, and the gRPC services of a scheduler replica.
//!
//! The cores (model, state machine, invariants, placement, wire conversions) live in
//! `berth-core` and are re-exported here under their old paths. The Raft replica in
//! [`replication`] and the planner in [`leader`] are sans-IO like them: no clocks, sockets,
//! threads or global randomness. [`service`] adds the IO: the Raft thread, peer transport,
//! tonic services, node liveness, metrics.
//!
//! # Layout
//! - [`config`]: the `[scheduler]` config section, its defaults and validation.
//! - [`model`], [`state`], [`invariants`], [`placement`], [`convert`], [`testing`]:
//!   re-exported from `berth-core`.
//! - [`replication`]: one Raft replica (raft-rs over raft-engine), its codec and log
//!   store, and the deterministic chaos harness.
//! - [`leader`]: the leader's planner (view, in-flight reservations, typical workload,
//!   pending pass), which the replica calls.
//! - [`service`]: a replica as a network service and local test clusters.
//! - [`sessions`]: `[scheduler.sessions]`, the tenants' session and idle limits.

pub mod config;
pub mod leader;
pub mod replication;
pub mod service;
pub mod sessions;

pub use berth_core::{convert, invariants, model, placement, state, testing};

pub use config::SchedulerConfig;
pub use state::State;
