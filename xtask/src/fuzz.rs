//! `cargo xtask fuzz [TARGET] [--time S]`: coverage-guided fuzzing of what
//! hostile input reaches (cargo-fuzz, libFuzzer), each target for S seconds,
//! then a table of executions and coverage per target.
//!
//! Targets (in `fuzz/fuzz_targets/`): the token claims parser, the cgroup
//! path → pod resolver, the saved-SYN stamp parser, and the credential
//! listener's HTTP request path. Committed seeds live in `fuzz/corpus/`;
//! what a run discovers goes to `target/fuzz-corpus/` (not committed), and
//! a crash leaves its input in `fuzz/artifacts/` and fails the command.
//!
//! Built without a sanitizer (`-s none`): the code is safe Rust, and the
//! instrumented build is slow enough on two cores already.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, run, workspace_root};

pub const TARGETS: [&str; 4] = ["token_claims", "cgroup_path", "saved_syn", "http_request"];

/// What one target's run did.
struct Outcome {
    target: &'static str,
    runs: u64,
    seconds: u64,
    coverage: String,
}

/// Fuzzes `only` (or every target) for `seconds` each.
pub fn fuzz(only: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<&'static str> = match only {
        Some(name) => vec![
            *TARGETS
                .iter()
                .find(|t| **t == name)
                .with_context(|| format!("no fuzz target {name:?}; targets: {TARGETS:?}"))?,
        ],
        None => TARGETS.to_vec(),
    };
    let root = workspace_root()?;
    let fuzz_dir = root.join("fuzz");
    eprintln!("fuzz: building the instrumented targets (a few minutes the first time)");
    run(fuzz_cargo(&fuzz_dir).args(["fuzz", "build", "-s", "none"]))?;
    let mut outcomes = Vec::new();
    for target in targets {
        let found = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&found)?;
        let mut child = fuzz_cargo(&fuzz_dir)
            .args(["fuzz", "run", "-s", "none", target])
            .arg(&found)
            .arg(fuzz_dir.join("corpus").join(target))
            .args(["--", &format!("-max_total_time={seconds}")])
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn cargo fuzz run {target}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut outcome = Outcome {
            target,
            runs: 0,
            seconds: 0,
            coverage: String::new(),
        };
        let mut tail = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            // "Done 4955558 runs in 11 second(s)"
            if let Some(rest) = line.strip_prefix("Done ") {
                let mut words = rest.split_whitespace();
                outcome.runs = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                outcome.seconds = words.nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
            }
            if let Some(at) = line.find("cov: ") {
                outcome.coverage = line[at..]
                    .split("exec/s")
                    .next()
                    .unwrap_or("")
                    .trim()
                    .into();
            }
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
        let status = child.wait()?;
        if !status.success() {
            bail!(
                "fuzz target {target} failed ({status}); the input is in fuzz/artifacts/{target}/:\n{}",
                tail.join("\n")
            );
        }
        eprintln!(
            "fuzz: {target}: {} runs in {} s ({})",
            outcome.runs, outcome.seconds, outcome.coverage
        );
        outcomes.push(outcome);
    }
    println!(
        "\n{:<14} {:>12} {:>8} {:>12}  coverage",
        "target", "runs", "seconds", "runs/s"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>12} {:>8} {:>12}  {}",
            o.target,
            o.runs,
            o.seconds,
            o.runs / o.seconds.max(1),
            o.coverage
        );
    }
    Ok(())
}

/// cargo in `fuzz/`, allowed the unstable flags cargo-fuzz passes on a
/// stable toolchain (the build script still limits the eBPF build's own).
fn fuzz_cargo(dir: &std::path::Path) -> Command {
    let mut cmd = cargo();
    cmd.current_dir(dir).env("RUSTC_BOOTSTRAP", "1");
    cmd
}
