//! berth's sans-IO cores, shared by the scheduler, the autoscaler and the simulator.
//!
//! Nothing here reads a clock, touches a socket, starts a thread or draws from a global
//! RNG: time and seeds are arguments, so the simulator, the chaos harness and tests drive
//! exactly the code production runs. The crate has no Raft and no gRPC server, so the
//! autoscaler and the simulator can use the model and the placer without linking either.
//!
//! # Layout
//! - [`model`]: nodes, GPUs, sandboxes, bindings, quotas.
//! - [`state`]: the state machine (`apply`), its commands, snapshots.
//! - [`invariants`]: the named invariant catalog, checked from scratch.
//! - [`placement`]: filters, scorers and policies that turn pending sandboxes into a plan.
//! - [`convert`]: the `berth.v1` wire messages to and from the model, with field paths in
//!   every error.
//! - [`testing`]: small fixtures and a checked `apply` for tests, benches and the simulator.

pub mod convert;
pub mod invariants;
pub mod model;
pub use berth_proto::network;
pub mod placement;
pub mod state;
pub mod testing;

pub use state::State;
