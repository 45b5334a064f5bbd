//! The berth node agent: discovers GPUs, runs the sandboxes the scheduler assigns, and
//! reports their status.
//!
//! Built so far: the configuration and static inventory files. Inventory (NVML and static files), runtimes (gVisor
//! `runsc`, plain process) and the reconcile loop come with issue #5.
//!
//! # Layout
//! - [`config`]: the `[agent]` config section, its defaults and validation.
//! - [`static_inventory`]: static GPU inventory files (stand-ins for NVML).

pub mod config;
pub mod static_inventory;

pub use config::AgentConfig;
