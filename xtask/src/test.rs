//! `cargo xtask test`: the project's one test command (CI runs exactly this).
//!
//! setup → fmt check → clippy (-D warnings) → every test, the privileged
//! ones included (they need root; under CI=true they fail rather than skip).

use std::time::Instant;

use anyhow::{Result, bail};

use crate::cmd::{cargo, in_ci, is_root, run};

pub fn test(extra: &[String]) -> Result<()> {
    let started = Instant::now();
    crate::setup::setup()?;
    if !is_root() {
        if in_ci() {
            bail!("CI=true: the privileged tests (netns, cgroup v2, eBPF) must run, and need root");
        }
        eprintln!(
            "test: not root — the privileged tests will be SKIPPED (run as root to execute them)"
        );
    }
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("ABI unit tests (agent-ebpf, host build of its lib)");
    run(cargo().args([
        "test",
        "--locked",
        "-p",
        "agent-ebpf",
        "--lib",
        "--features",
        "user",
    ]))?;
    step("workspace tests (default members)");
    run(cargo().args(["test", "--locked"]).args(extra))?;
    eprintln!("test: all green in {:.0?}", started.elapsed());
    Ok(())
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}
