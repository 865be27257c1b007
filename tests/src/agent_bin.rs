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
    // target/<profile>/deps/<test> → target/<profile>/eks-pod-identity-agent
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable is not in target/<profile>/deps")?;
    let bin = profile_dir.join("eks-pod-identity-agent");
    ensure!(
        bin.is_file(),
        "{} missing: build it first (`cargo build -p eks-pod-identity-agent`; `cargo xtask test` does)",
        bin.display()
    );
    Ok(bin)
}
