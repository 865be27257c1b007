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

/// The preamble of every privileged test: returns `Ok(())` early when
/// [`privileged_or_skip`] says so, naming the enclosing test itself so the
/// skip message can never drift from the test's name.
#[macro_export]
macro_rules! require_privilege {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            ::std::any::type_name::<T>()
        }
        let path = name_of(here);
        let path = path.strip_suffix("::here").unwrap_or(path);
        let test = path.rsplit("::").next().unwrap_or(path);
        if !$crate::privilege::privileged_or_skip(test) {
            return Ok(());
        }
    }};
}

/// `nobody`: the unprivileged node user the attack tests run as.
pub const NOBODY: u32 = 65534;
