//! `cargo xtask bench`: builds release binaries and runs the harness's
//! `bench` (ratios against a baseline from the same run).

use anyhow::Result;

use crate::cmd::{require_root, run, workspace_root};

pub fn bench(sections: &[String]) -> Result<()> {
    crate::setup::setup()?;
    require_root("the benchmark")?;
    crate::build::build_binaries(true, false)?;
    run(std::process::Command::new(workspace_root()?.join("target/release/bench")).args(sections))
}
