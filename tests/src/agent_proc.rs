//! The real agent binary running `server` inside a test's node namespace,
//! with its JSON logs captured; killed on drop.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, ExitStatus},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{agent_bin::agent_binary, http, netns::Netns, wait::wait_for};

pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    probe: std::net::SocketAddr,
    netns_path: String,
    /// Bytes its `--audit-log` held when it started (earlier agents' lines).
    audit_bytes_at_start: u64,
}

/// Environment of the agent under test: static signing credentials and a
/// region, so the SDK's default chains never look beyond the process (no
/// instance metadata, no config files).
pub const AGENT_ENV: &[(&str, &str)] = &[
    ("AWS_REGION", "us-west-2"),
    ("AWS_ACCESS_KEY_ID", "AKIDNODETEST"),
    ("AWS_SECRET_ACCESS_KEY", "node-secret-for-signing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/dev/null"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
];

impl AgentProcess {
    /// Runs `server ARGS` inside `netns` and waits until /readyz says 200.
    pub fn start(netns: &Netns, args: &[String]) -> Result<AgentProcess> {
        Self::start_with_caps(netns, args, None)
    }

    /// Like [`start`](Self::start), with exactly the capabilities `caps`
    /// (as a container runtime grants them), if given.
    pub fn start_with_caps(
        netns: &Netns,
        args: &[String],
        caps: Option<&[String]>,
    ) -> Result<AgentProcess> {
        let mut agent = Self::spawn(netns, args, caps)?;
        agent.wait_ready(netns)?;
        Ok(agent)
    }

    /// Like [`start`](Self::start), with `env` on top of [`AGENT_ENV`].
    pub fn start_with_env(
        netns: &Netns,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        let mut agent = Self::spawn_with_env(netns, args, None, env)?;
        agent.wait_ready(netns)?;
        Ok(agent)
    }

    /// Starts the server without waiting for readiness.
    pub fn spawn(netns: &Netns, args: &[String], caps: Option<&[String]>) -> Result<AgentProcess> {
        Self::spawn_with_env(netns, args, caps, &[])
    }

    /// Starts the server with `env` on top of [`AGENT_ENV`], without waiting.
    pub fn spawn_with_env(
        netns: &Netns,
        args: &[String],
        caps: Option<&[String]>,
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        Self::spawn_binary(&agent_binary()?, netns, args, caps, env)
    }

    /// Starts `binary` (another build of the agent) as the server, without
    /// waiting.
    pub fn spawn_binary(
        binary: &std::path::Path,
        netns: &Netns,
        args: &[String],
        caps: Option<&[String]>,
        env: &[(&str, &str)],
    ) -> Result<AgentProcess> {
        let log =
            std::env::temp_dir().join(format!("epia-agent-{}.log", crate::names::unique_id()));
        let log_file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = netns.command(binary)?;
        cmd.arg("server").args(args);
        // The node's pin directory and handover socket, unless the test
        // chose its own.
        let given = |flag: &str| flag_value(args, flag).is_some();
        if !given("--bpf-pin-dir") {
            cmd.arg("--bpf-pin-dir").arg(netns.pin_dir());
        }
        if !given("--handover-socket") {
            cmd.arg("--handover-socket").arg(netns.handover_socket());
        }
        // A stopped agent waits for no successor unless the test says so.
        if !given("--successor-wait") {
            cmd.args(["--successor-wait", "0s"]);
        }
        cmd.env_clear()
            .envs(AGENT_ENV.iter().copied())
            .envs(env.iter().copied())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            // Logs go to stdout (as the reference's); errors before the
            // logger exists to stderr: one file for both.
            .stdout(log_file.try_clone().context("clone the log file")?)
            .stderr(log_file);
        if let Some(caps) = caps {
            crate::caps::restrict_to(&mut cmd, caps)?;
        }
        // Its length, not its lines: after a load run the file holds
        // millions of them, and reading it would be most of a start.
        let audit_bytes_at_start = flag_value(args, "--audit-log")
            .and_then(|path| std::fs::metadata(path).ok())
            .map_or(0, |meta| meta.len());
        let child = cmd.spawn().context("spawn the agent")?;
        let probe_port = flag_value(args, "--probe-port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(2703);
        Ok(AgentProcess {
            child,
            log,
            probe: ([127, 0, 0, 1], probe_port).into(),
            netns_path: netns.path(),
            audit_bytes_at_start,
        })
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Result<ExitStatus> {
        let mut exited = None;
        let child = &mut self.child;
        let waited = wait_for("the agent to exit", within, || {
            exited = child.try_wait()?;
            Ok(exited.is_some())
        });
        waited.with_context(|| format!("agent logs:\n{}", self.logs()))?;
        exited.context("agent exit status")
    }

    /// Waits (bounded) until the agent has logged `text`; fails early if
    /// it exits.
    pub fn wait_for_log(&mut self, text: &str, within: Duration) -> Result<()> {
        let log = self.log.clone();
        let child = &mut self.child;
        let waited = wait_for(&format!("the agent to log {text:?}"), within, || {
            if let Some(status) = child.try_wait()? {
                bail!("agent exited ({status})");
            }
            Ok(std::fs::read_to_string(&log).is_ok_and(|l| l.contains(text)))
        });
        waited.with_context(|| format!("agent logs:\n{}", self.logs()))
    }

    fn wait_ready(&mut self, netns: &Netns) -> Result<()> {
        let probe = self.probe;
        let child = &mut self.child;
        let waited = wait_for("agent readiness", Duration::from_secs(60), || {
            if let Some(status) = child.try_wait()? {
                bail!("agent exited before ready ({status})");
            }
            Ok(netns
                .run_in(|| http::request(probe, "GET", "/readyz", &[("Host", "localhost")]))
                .is_ok_and(|r| r.status == 200))
        });
        waited.with_context(|| format!("agent logs:\n{}", self.logs()))
    }

    /// Bytes its `--audit-log` held when it started.
    pub fn audit_bytes_at_start(&self) -> u64 {
        self.audit_bytes_at_start
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The namespace the agent runs in (`/run/netns/…`).
    pub fn netns_path(&self) -> &str {
        &self.netns_path
    }

    /// SIGKILL, as a crash: nothing of the agent's own shutdown runs.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.child.kill().context("SIGKILL the agent")?;
        Ok(self.child.wait()?)
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub fn terminate(&mut self, within: Duration) -> Result<ExitStatus> {
        self.sigterm();
        self.wait_exit(within)
    }

    /// SIGTERM, without waiting: what the kubelet sends to stop a pod.
    pub fn sigterm(&self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }
}

/// The value `args` give `flag`, as `--flag value` or `--flag=value`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(flag)?.strip_prefix('=')
        }
    })
}

/// `GET path` on the agent's localhost `port` (probes, metrics) from
/// inside `netns`, the node's namespace.
pub fn get_local(netns: &Netns, port: u16, path: &str) -> Result<http::Reply> {
    netns.run_in(|| {
        http::request(
            ([127, 0, 0, 1], port).into(),
            "GET",
            path,
            &[("Host", "localhost")],
        )
    })
}

/// `/metrics` of the agent running in `netns` (default port).
pub fn scrape_metrics(netns: &Netns) -> Result<String> {
    Ok(get_local(netns, 2705, "/metrics")?.body)
}

/// Runs `init` (default flags) in `netns`: what the DaemonSet's init
/// container does before the server starts.
pub fn init_node(netns: &Netns) -> Result<()> {
    let out = netns
        .command(agent_binary()?)?
        .arg("init")
        .output()
        .context("run agent init")?;
    if !out.status.success() {
        bail!(
            "agent init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("agent logs ({}):\n{}", self.log.display(), self.logs());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
