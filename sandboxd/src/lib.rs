//! berth's helper inside every sandbox (`berth-sandboxd`), as E2B's `envd` is in theirs: the
//! sandbox's first process, which runs the sandbox's command (if any) and serves exec and
//! file calls on a Unix socket that the node agent reaches through gVisor's `--host-uds`.
//! One connection is one call; see [`wire`] for the protocol and its limits, [`paths`] for
//! how file paths are kept inside the sandbox's root.

pub mod paths;
pub mod wire;

/// Where the helper's directory is mounted inside a sandbox (read-only).
pub const BIN_DIR: &str = "/.berth/bin";
/// Where the socket's directory is mounted inside a sandbox.
pub const RUN_DIR: &str = "/.berth/run";
/// The helper's file name.
pub const BINARY: &str = "berth-sandboxd";
/// The socket's file name in its directory.
pub const SOCKET: &str = "sandboxd.sock";
