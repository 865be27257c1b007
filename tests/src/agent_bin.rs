//! Locating the agent binary under test.
//!
//! Cargo builds a dependency's library, not its binaries, for another
//! package's tests, so `cargo xtask test` builds the agent first; the
//! harness finds it next to the test executable (or at `EPIA_AGENT_BIN`).

use std::path::PathBuf;

use anyhow::{Context as _, Result, ensure};

pub fn agent_binary() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("EPIA_AGENT_BIN") {
        return Ok(PathBuf::from(explicit));
    }
    built_binary("eks-pod-identity-agent")
}

/// A binary of this workspace in `target/<profile>/`, found from the
/// running executable (a test in `deps/`, or a binary next to it).
pub fn built_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable without a directory")?;
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let bin = profile_dir.join(name);
    ensure!(
        bin.is_file(),
        "{} missing: build it first (`cargo build --bins`; `cargo xtask test` and `demo` do)",
        bin.display()
    );
    Ok(bin)
}
