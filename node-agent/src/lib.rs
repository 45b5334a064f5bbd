//! The berth node agent: discovers GPUs, runs the sandboxes the scheduler assigns, and
//! reports their status.
//!
//! # Layout
//! - [`config`]: the `[agent]` config section, its defaults and validation.
//! - [`static_inventory`]: static GPU inventory files (stand-ins for NVML).
//! - [`inventory`]: the node's GPUs (NVML, or a static file when there is no driver), CPU
//!   and memory, as the scheduler's `NodeInventory`.
//! - [`nvml`]: the NVML side of the inventory: devices, XID health, their wire form.
//! - [`inventory_feed`]: the registered inventory kept fresh off the session loop.
//! - [`image`]: the image cache (pulls with oci-client, layers unpacked once, LRU).
//! - [`launch`]: what a sandbox runs, from its spec and its image's config.
//! - [`bundle`]: a sandbox's overlay root and its OCI runtime bundle.
//! - [`cgroups`]: CPU and memory limits on cgroup v1 and v2, and usage read back.
//! - [`network`]: a sandbox's network namespace, veth pair and nftables rules.
//! - [`shim`]: the per-sandbox shim (`berth agent-shim`).
//! - [`shim_command`]: the runsc (or plain process) command lines a shim runs.
//! - [`checkpoint`]: pausing a sandbox to disk (`runsc checkpoint`) and resuming it.
//! - [`freezer`]: standby: a sandbox frozen in place by the cgroup freezer, and thawed.
//! - [`standby`]: the agent's freezes and thaws, in order on one thread.
//! - [`runtime`]: the agent's handle on sandbox directories (start, stop, scan, remove).
//! - [`transfer`]: a paused sandbox's snapshot, sent to or fetched from another node.
//! - [`snapshot`]: a sandbox's filesystem changes pushed as a new image.
//! - [`starter`]: starting assignments off the session loop, with bounded pulls and starts.
//! - [`monitor`]: watching the sandboxes off the session loop.
//! - [`metrics`]: the agent's Prometheus metrics.
//! - [`usage`]: sandboxes' CPU and memory use, sampled from their cgroups.
//! - [`sandboxd`]: the helper inside every sandbox: its binary, and calls to it.
//! - [`logs`], [`calls`], [`service`]: `AgentService` — captured output, and exec and file
//!   calls into sandboxes — served to the schedulers.
//! - [`assignment`]: what an assignment becomes (the shim's launch, the network plan).
//! - [`identity`]: the node's certificate: joining with a join token when it has none,
//!   renewing at half its lifetime.
//! - [`reports`]: sandboxes' local states as the status reports a session sends.
//! - [`agent`]: the session loop with the scheduler leader (register, heartbeat,
//!   assignments, status, re-adoption after a restart).

pub mod agent;
pub mod assignment;
pub mod bundle;
pub mod calls;
pub mod cgroups;
pub mod checkpoint;
pub mod config;
pub mod freezer;
pub mod identity;
pub mod image;
pub mod inventory;
pub mod inventory_feed;
pub mod launch;
pub mod logs;
pub mod metrics;
pub mod monitor;
pub mod network;
pub mod nvml;
pub mod reports;
pub mod runtime;
pub mod sandboxd;
pub mod service;
pub mod shim;
pub mod shim_command;
pub mod snapshot;
pub mod standby;
pub mod starter;
pub mod static_inventory;
pub mod transfer;
pub mod usage;

pub use config::AgentConfig;
