//! `cargo xtask bench [SECTION…]`: builds the harness in release and the
//! agent as it ships (the `dist` profile), then runs the harness's `bench`
//! (ratios against a baseline from the same run) against that agent.

use anyhow::Result;

use crate::cmd::{cargo, require_root, run, workspace_root};

pub fn bench(sections: &[String]) -> Result<()> {
    crate::setup::setup()?;
    require_root("the benchmark")?;
    crate::build::build_binaries(true, false)?;
    run(cargo().args([
        "build",
        "--locked",
        "--profile",
        "dist",
        "-p",
        "eks-pod-identity-agent",
    ]))?;
    let root = workspace_root()?;
    run(
        std::process::Command::new(root.join("target/release/bench"))
            .args(sections)
            .env(
                "EPIA_AGENT_BIN",
                root.join("target/dist/eks-pod-identity-agent"),
            ),
    )
}
