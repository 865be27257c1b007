//! Named network namespaces (`/run/netns/NAME`), removed on drop.
//!
//! Entered with `setns` on an fd, never `ip netns exec`: that remounts /sys
//! and hides the cgroup2 mount (docs/architecture.md §8).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
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

    /// Where the agents of this namespace — a test's node — pin their
    /// kernel programs: one directory per node, as `/sys/fs/bpf/...` is on a
    /// real node, so successive agents adopt each other's programs.
    /// Removed with the namespace.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(PIN_ROOT).join(&self.name)
    }

    /// The node's handover socket (a directory per node, removed with it).
    pub fn handover_socket(&self) -> PathBuf {
        PathBuf::from(HANDOVER_ROOT)
            .join(&self.name)
            .join("handover.sock")
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

/// bpffs directory holding every test node's pins.
const PIN_ROOT: &str = "/sys/fs/bpf/epia-test";
/// Directory holding every test node's handover socket.
const HANDOVER_ROOT: &str = "/run/epia-test";

impl Drop for Netns {
    fn drop(&mut self) {
        // Pins left by an agent that was killed, and the handover socket.
        for dir in [
            self.pin_dir(),
            PathBuf::from(HANDOVER_ROOT).join(&self.name),
        ] {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("cleanup: {}: {e}", dir.display());
            }
        }
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
