//! The berth node agent: discovers GPUs, runs the sandboxes the scheduler assigns, and
//! reports their status.
//!
//! # Layout
//! - [`config`]: the `[agent]` config section, its defaults and validation.
//! - [`static_inventory`]: static GPU inventory files (stand-ins for NVML).
//! - [`inventory`]: the node's GPUs (NVML, or a static file when there is no driver), CPU
//!   and memory, as the scheduler's `NodeInventory`.
//! - [`runtime`]: sandbox directories and the shim that runs each sandbox under `runsc`
//!   (gVisor) or as a plain process, captures its output and records how it ended.
//! - [`logs`]: `AgentService`, serving captured output to the schedulers.
//! - [`agent`]: the session loop with the scheduler leader (register, heartbeat,
//!   assignments, status, re-adoption after a restart).

pub mod agent;
pub mod config;
pub mod inventory;
pub mod logs;
pub mod runtime;
pub mod static_inventory;

pub use config::AgentConfig;
