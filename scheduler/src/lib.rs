//! The berth scheduler: the replicated state machine, the placement engine, the Raft
//! replication around them, and the gRPC services of a scheduler replica.
//!
//! The cores (state machine, placement, and the Raft replica in [`replication`]) are
//! sans-IO: no clocks, sockets, threads or global randomness. Time and seeds are arguments,
//! so the simulator, the chaos harness and tests drive exactly the code production runs.
//! [`service`] adds the IO: the Raft thread, peer transport, tonic services, node
//! liveness, metrics.
//!
//! # Layout
//! - [`config`]: the `[scheduler]` config section, its defaults and validation.
//! - [`model`]: nodes, GPUs, sandboxes, bindings, quotas.
//! - [`state`]: the state machine (`apply`), its commands, snapshots.
//! - [`invariants`]: the named invariant catalog, checked from scratch.
//! - [`placement`]: filters, scorers and policies that turn pending sandboxes into a plan.
//! - [`replication`]: one Raft replica (raft-rs over raft-engine), its codec and log
//!   store, and the deterministic chaos harness.
//! - [`service`]: a replica as a network service, its client and local test clusters.
//! - [`testing`]: small fixtures and a checked `apply` for tests, benches and the simulator.

pub mod config;
pub mod invariants;
pub mod model;
pub mod placement;
pub mod replication;
pub mod service;
pub mod state;
pub mod testing;

pub use config::SchedulerConfig;
pub use state::State;
