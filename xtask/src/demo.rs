//! `cargo xtask demo [--keep]`: setup, build, then the demo driver (the
//! test harness's `demo` binary) with the agent it just built.

use anyhow::Result;

use crate::cmd::{cargo, require_root, run, workspace_root};

pub fn demo(keep: bool) -> Result<()> {
    crate::setup::setup()?;
    require_root("the demo")?;
    build_binaries()?;
    let demo = workspace_root()?.join("target/debug/demo");
    let mut cmd = std::process::Command::new(demo);
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd)
}

/// The agent, the demo driver and the pod client, as the demo and the
/// integration tests run them.
pub fn build_binaries() -> Result<()> {
    run(cargo().args([
        "build",
        "--locked",
        "-p",
        "eks-pod-identity-agent",
        "-p",
        "integration-tests",
        "--bins",
    ]))
}
