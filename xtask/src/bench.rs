//! `cargo xtask bench`: builds release binaries and runs the harness's
//! `bench` (ratios against a baseline from the same run).

use anyhow::{Result, bail};

use crate::cmd::{cargo, is_root, run, workspace_root};

pub fn bench() -> Result<()> {
    crate::setup::setup()?;
    if !is_root() {
        bail!("the benchmark attaches eBPF programs and creates namespaces: run it as root");
    }
    run(cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "eks-pod-identity-agent",
        "-p",
        "integration-tests",
        "--bins",
    ]))?;
    run(&mut std::process::Command::new(
        workspace_root()?.join("target/release/bench"),
    ))
}
