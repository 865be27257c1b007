//! Privileged tests need root (netns, cgroup v2, BPF). Outside CI they skip
//! with a loud message; under `CI=true` they must run, so they fail instead.

/// Whether the privileged test may run. Panics under CI when it cannot.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: needs root (netns, cgroup v2, eBPF) and CI=true forbids skipping");
    }
    eprintln!(
        "SKIPPED {test}: needs root (netns, cgroup v2, eBPF); run `cargo xtask test` as root"
    );
    false
}
