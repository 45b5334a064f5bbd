//! The berth autoscaler: a pure scaling policy and the providers that carry its decisions
//! out.
//!
//! Built so far: the configuration and the scale-down rule. Scale-up, providers and the
//! process come with the rest of issue #6.
//!
//! # Layout
//! - [`config`]: the `[autoscaler]` config section, its defaults and validation.
//! - [`policy`]: the pure decision functions.

pub mod config;
pub mod controller;
pub mod metrics;
pub mod policy;
pub mod provider;

pub use config::AutoscalerConfig;
