//! `cargo xtask demo [--keep]`: setup, build, then the demo driver (the
//! test harness's `demo` binary) with the agent it just built.

use anyhow::Result;

use crate::{
    build::build_binaries,
    cmd::{require_root, run, workspace_root},
};

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
