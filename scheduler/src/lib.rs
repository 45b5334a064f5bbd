//! The berth scheduler: the replicated state machine, the placement engine, and (next) the
//! Raft driver, state-store backends and gRPC services.
//!
//! Both cores are sans-IO: no clocks, sockets, threads or global randomness. Time and seeds
//! are arguments, so the simulator and tests drive exactly the code production runs.
//!
//! # Layout
//! - [`config`]: the `[scheduler]` config section, its defaults and validation.
//! - [`model`]: nodes, GPUs, sandboxes, bindings, quotas.
//! - [`state`]: the state machine (`apply`), its commands, snapshots.
//! - [`invariants`]: the named invariant catalog, checked from scratch.
//! - [`placement`]: filters, scorers and policies that turn pending sandboxes into a plan.
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
