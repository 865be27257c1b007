//! Named network namespaces (`/run/netns/NAME`), removed on drop.
//!
//! Entered with `setns` on an fd, never `ip netns exec`: that remounts /sys
//! and hides the cgroup2 mount (docs/architecture.md §8).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::names;

pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Netns> {
        let name = names::unique(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    pub fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("open {}", self.path()))
    }

    /// `ip -n NAME ARGS…`: the harness may use iproute2 to build topologies
    /// (only the agent itself must speak netlink).
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Writes a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run_in(|| std::fs::write(&path, value).with_context(|| format!("write {path}")))
    }

    /// A command that runs `program` inside this namespace (setns between
    /// fork and exec; the cgroup2 mount stays visible, unlike `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let ns: std::os::fd::OwnedFd = self.open()?.into();
        let mut cmd = Command::new(program);
        // SAFETY: only setns, async-signal-safe, on an fd opened before fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a fresh thread that has joined this namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let file = self.open()?;
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&file)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }
}

/// Moves the calling thread into the network namespace behind `fd`.
pub fn enter(fd: &impl AsFd) -> Result<()> {
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(fd.as_fd().as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawn {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
