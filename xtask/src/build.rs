//! The binaries the demo, the bench and the integration tests run.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::cmd::{cargo, run, workspace_root};

/// The agent built with another kernel ABI (`--features abi-variant`: a
/// different map layout), for the test that upgrades across an ABI change.
pub const ABI_VARIANT_BINARY: &str = "eks-pod-identity-agent-abi-variant";

const AGENT: &str = "eks-pod-identity-agent";

/// `cargo build --locked` with `args`.
fn cargo_build(args: &[&str]) -> Result<()> {
    run(cargo().args(["build", "--locked"]).args(args))
}

/// The agent and the harness's binaries (demo, bench, pod client), debug;
/// with `abi_variant`, also [`ABI_VARIANT_BINARY`].
pub fn build_binaries(abi_variant: bool) -> Result<()> {
    if abi_variant {
        // First: it leaves its binary at the agent's path, which the
        // normal build below puts back.
        cargo_build(&["-p", AGENT, "--features", "abi-variant"])?;
        let dir = workspace_root()?.join("target/debug");
        let (built, variant) = (dir.join(AGENT), dir.join(ABI_VARIANT_BINARY));
        std::fs::copy(&built, &variant)
            .with_context(|| format!("copy {} to {}", built.display(), variant.display()))?;
    }
    cargo_build(&["-p", AGENT, "-p", "integration-tests", "--bins"])
}

/// The harness's binaries in release and the agent as it ships (the `dist`
/// profile), for the bench; returns the agent's path.
pub fn build_for_bench() -> Result<PathBuf> {
    cargo_build(&["-p", "integration-tests", "--bins", "--release"])?;
    cargo_build(&["-p", AGENT, "--profile", "dist"])?;
    Ok(workspace_root()?.join("target/dist").join(AGENT))
}
