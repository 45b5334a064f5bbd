//! The berth autoscaler: a pure scaling policy and the providers that carry its decisions
//! out.
//!
//! Built so far: the configuration. The policy, providers and the process come with issue #6.
//!
//! # Layout
//! - [`config`]: the `[autoscaler]` config section, its defaults and validation.

pub mod config;

pub use config::AutoscalerConfig;
