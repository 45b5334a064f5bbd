//! Generates the `berth.v1` Rust code from `proto/berth/v1/*.proto`.
//!
//! Always uses the protoc shipped in the `protoc-bin-vendored` crate, never one on PATH, so
//! the build is the same on a fresh machine with no protobuf-compiler installed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/berth/v1/types.proto",
    "proto/berth/v1/sandbox.proto",
    "proto/berth/v1/node.proto",
    "proto/berth/v1/admin.proto",
    "proto/berth/v1/peer.proto",
    "proto/berth/v1/agent.proto",
    "proto/berth/v1/provider.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // No `Client::connect(addr)` helpers: NodeService's RPC is itself named `Connect`,
        // and callers build a `tonic::transport::Channel` themselves anyway (they need its
        // timeouts and the leader-redirect logic).
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("berth_v1_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
