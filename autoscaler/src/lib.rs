//! The berth autoscaler: a pure scaling policy and the providers that carry its decisions
//! out.
//!
//! # Layout
//! - [`config`]: the `[autoscaler]` config section, its defaults and validation.
//! - [`policy`]: the pure decision functions: one round's scale-ups and removals
//!   ([`policy::decide`]), the caps ([`policy::limits`]), idle-node removal
//!   ([`policy::scale_down`]). Time and seeds are passed in.
//! - [`provider`]: the [`provider::Provider`] trait and its implementations (local agent
//!   processes, a seeded simulated cloud, Kubernetes Cluster API, external gRPC).
//! - [`controller`]: the loop around the policy: the lease, reading the scheduler and the
//!   providers, carrying decisions out, recording them.
//! - [`round`]: decide, scale up, and decide again after a refusal: the part of a round the
//!   controller and the simulator share.
//! - [`metrics`]: the Prometheus metrics the controller keeps.
//! - [`testing`]: node-group fixtures for tests.

pub mod config;
pub mod controller;
pub mod metrics;
pub mod policy;
pub mod provider;
pub mod round;
pub mod testing;

pub use config::AutoscalerConfig;
