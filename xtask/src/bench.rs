//! `cargo xtask bench [SECTION…]`: builds the harness in release and the
//! agent as it ships (the `dist` profile), then runs the harness's `bench`
//! (ratios against a baseline from the same run) against that agent.

use anyhow::Result;

use crate::cmd::{require_root, run, workspace_root};

pub fn bench(sections: &[String]) -> Result<()> {
    crate::setup::setup()?;
    require_root("the benchmark")?;
    let agent = crate::build::build_for_bench()?;
    run(
        std::process::Command::new(workspace_root()?.join("target/release/bench"))
            .args(sections)
            .env("EPIA_AGENT_BIN", agent),
    )
}
