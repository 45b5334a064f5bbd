//! Builds the sandbox helper (`berth-sandboxd`, crate `sandboxd/`) as a static executable
//! (glibc with `+crt-static`) for the agent to carry: sandboxes run images with no libc, and
//! the musl target cannot be fetched here. It is a separate cargo invocation with its own
//! target directory under OUT_DIR, joined to this build's jobserver.

use std::path::PathBuf;
use std::process::Command;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name} for build scripts"))
}

fn main() {
    println!("cargo:rerun-if-changed=../sandboxd/src");
    println!("cargo:rerun-if-changed=../sandboxd/Cargo.toml");
    let out = PathBuf::from(env("OUT_DIR"));
    let target = env("TARGET");
    let workspace = PathBuf::from(env("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = out.join("sandboxd-target");
    let status = Command::new(env("CARGO"))
        .current_dir(&workspace)
        .args(["build", "--release", "--locked", "-p", "berth-sandboxd"])
        .args(["--bin", "berth-sandboxd", "--target", &target])
        .arg("--target-dir")
        .arg(&target_dir)
        // Not clippy's driver or this build's flags: a plain static build of the helper.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .status()
        .expect("running cargo for berth-sandboxd");
    assert!(status.success(), "building berth-sandboxd failed");
    let built = target_dir
        .join(&target)
        .join("release")
        .join("berth-sandboxd");
    std::fs::copy(&built, out.join("berth-sandboxd")).expect("copying berth-sandboxd");
}
