//! `cargo xtask demo [--keep]`: setup, build, then the demo driver (the
//! test harness's `demo` binary) with the agent it just built.

use anyhow::Result;

use crate::cmd::{cargo, require_root, run, workspace_root};

pub fn demo(keep: bool) -> Result<()> {
    crate::setup::setup()?;
    require_root("the demo")?;
    build_binaries(false)?;
    let demo = workspace_root()?.join("target/debug/demo");
    let mut cmd = std::process::Command::new(demo);
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd)
}

/// The agent and the harness's binaries (demo, bench, pod client), as the
/// demo, the bench and the integration tests run them.
pub fn build_binaries(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--locked",
        "-p",
        "eks-pod-identity-agent",
        "-p",
        "integration-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}
