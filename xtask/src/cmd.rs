//! Running commands and finding the workspace.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

/// Runs `cmd`, inheriting stdio; an error names the command and its status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn workspace_root() -> Result<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if let Ok(root) = workspace_root() {
        cmd.current_dir(root);
    }
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Commands that create namespaces, cgroups and eBPF programs need root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    Ok(())
}
