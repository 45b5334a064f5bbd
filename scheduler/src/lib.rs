//! The berth scheduler: the replicated state machine, the placement engine, the Raft driver,
//! the state-store backends and the gRPC services.
//!
//! Built so far: the configuration. The state machine and placement engine come with issue
//! #3, replication and the services with issue #4.
//!
//! # Layout
//! - [`config`]: the `[scheduler]` config section, its defaults and validation.

pub mod config;

pub use config::SchedulerConfig;
