//! Waiting on conditions with generous deadlines — never fixed sleeps: the
//! machine is small and shared.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

/// Polls `check` until it holds or `deadline` passes.
pub fn wait_for(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let end = Instant::now() + deadline;
    while !check()? {
        ensure!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `["a", "b"]` → owned arguments.
pub fn args(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}
