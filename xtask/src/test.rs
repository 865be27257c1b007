//! `cargo xtask test`: the project's one test command (CI runs exactly this).
//!
//! setup → fmt check → clippy (-D warnings) → every test, the privileged
//! ones included (they need root; under CI=true they fail rather than skip)
//! → a short run of every fuzz target → the demo.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, in_ci, is_root, run};

/// Seconds each fuzz target runs in the test command: enough to catch a
/// regression on the committed seeds and a little beyond.
const FUZZ_SECONDS: u64 = 10;

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
    run(cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]))?;
    step("cargo clippy -D warnings");
    run(cargo().args([
        "clippy",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut tally = Tally::default();
    step("ABI unit tests (agent-ebpf, host build of its lib)");
    tally.run(cargo().args([
        "test",
        "--locked",
        "-p",
        "agent-ebpf",
        "--lib",
        "--features",
        "user",
    ]))?;
    step("binaries (the integration tests and the demo run them)");
    crate::build::build_binaries(true)?;
    step("workspace tests (default members)");
    tally.run(cargo().args(["test", "--locked"]).args(extra))?;
    step("fuzz targets, a short run each (`cargo xtask fuzz` for longer)");
    crate::fuzz::fuzz(None, FUZZ_SECONDS)?;
    if is_root() {
        step("demo (so the README's first command cannot rot)");
        run(&mut std::process::Command::new(
            crate::cmd::workspace_root()?.join("target/debug/demo"),
        ))?;
    }
    eprintln!("test: all green in {:.0?}", started.elapsed());
    // One closing line over every test binary (cargo prints one per binary,
    // the last of which is often an empty doc-test run).
    println!("{} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Sums cargo's per-binary `test result:` lines while passing output through.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    fn run(&mut self, cmd: &mut Command) -> Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                self.passed += count(rest, "passed");
                self.failed += count(rest, "failed");
            }
        }
        let status = child.wait()?;
        if !status.success() {
            println!("{} passed, {} failed", self.passed, self.failed.max(1));
            bail!("{cmd:?} failed: {status}");
        }
        Ok(())
    }
}

/// The number before `label` in `ok. 3 passed; 0 failed; …`.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn step(what: &str) {
    eprintln!("\n==> {what}");
}
