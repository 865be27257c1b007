//! "Pod" processes: a child that joins its pod's cgroup and then its pod's
//! network namespace before exec, as a container's process would be placed.
//!
//! cgroup membership is per process, so a pod client must be its own
//! process. It joins its cgroup through an fd opened before fork, so the
//! network namespace it has entered by then does not matter.

use std::{
    fs::OpenOptions,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

use crate::netns::Netns;

/// A command that will run `program` inside `cgroup` and `netns` (the node's
/// namespace for a hostNetwork pod). Always a namespace the test made: a
/// test process never talks to the link-local addresses of the real host.
pub fn pod_command(program: &Path, cgroup: &Path, netns: &Netns) -> Result<Command> {
    let procs: OwnedFd = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?
        .into();
    let mut cmd = netns.command(program)?;
    // SAFETY: only write(2), async-signal-safe, on an O_CLOEXEC fd opened
    // before fork. (Runs after the setns; the fd still names the cgroup.)
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Makes `cmd` (a `pod-client`) fetch credentials the way an AWS SDK in a
/// pod does: only the webhook's environment, nothing else from ours.
pub fn sdk_credentials<'a>(
    cmd: &'a mut Command,
    full_uri: &str,
    token_file: &Path,
) -> &'a mut Command {
    sdk_env(cmd.arg("sdk-credentials"), full_uri, token_file)
}

/// Gives `cmd` exactly the environment the webhook gives a pod's SDK.
pub fn sdk_env<'a>(cmd: &'a mut Command, full_uri: &str, token_file: &Path) -> &'a mut Command {
    cmd.env_clear()
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri)
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file)
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// Waits for a `pod-client` and parses the last line it printed as JSON
/// (its tally or answer); its failure, with what it said, is the error.
pub fn finish(child: std::process::Child, what: &str) -> Result<serde_json::Value> {
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{what}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{what}: output {stdout:?}"))
}

/// The first line a running `pod-client` printed (it says it is ready),
/// read byte by byte so what follows stays in the pipe for [`finish`].
pub fn first_line(child: &mut std::process::Child, what: &str) -> Result<String> {
    use std::io::Read as _;
    let stdout = child.stdout.as_mut().context("stdout not piped")?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        ensure!(
            stdout.read(&mut byte)? == 1,
            "{what} ended before its first line"
        );
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}
