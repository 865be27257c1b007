//! A cluster with its agent running: the real agent binary serving the
//! cluster's node, with helpers that run pod processes against it and read
//! what it recorded (audit events, metrics).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::{
    agent_bin::built_binary,
    agent_proc::{AgentProcess, scrape_metrics},
    cluster::{Cluster, Who},
    netns::Netns,
    pod::{pod_command, sdk_credentials},
};

/// The agent first (dropped first), then the cluster it serves.
pub struct Served {
    pub agent: AgentProcess,
    pub cluster: Cluster,
}

impl std::ops::Deref for Served {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Served {
    /// A new cluster for node `node`, served by an agent in attribution
    /// `mode` with `extra` arguments.
    pub fn start(node: &str, mode: &str, extra: &[&str]) -> Result<Served> {
        let cluster = Cluster::new(node)?;
        let agent = AgentProcess::start(&cluster.node.netns, &cluster.agent_args(mode, extra))?;
        Ok(Served { agent, cluster })
    }

    pub fn token_file(&self, token: &str) -> Result<PathBuf> {
        self.dir.file("token-", token)
    }

    /// A `pod-client` placed in `cgroup` and `netns`.
    pub fn pod_client(&self, cgroup: &Path, netns: &Netns) -> Result<Command> {
        pod_command(&built_binary("pod-client")?, cgroup, netns)
    }

    /// The real SDK provider in a process placed in `cgroup` and `netns`.
    pub fn sdk_in(&self, cgroup: &Path, netns: &Netns, uri: &str, token: &str) -> Result<Output> {
        let file = self.token_file(token)?;
        sdk_credentials(&mut self.pod_client(cgroup, netns)?, uri, &file)
            .output()
            .context("run pod-client")
    }

    pub fn sdk(&self, who: Who, uri: &str, token: &str) -> Result<Output> {
        let (cgroup, netns) = self.placement(who);
        self.sdk_in(cgroup, netns, uri, token)
    }

    pub fn sdk_ok(&self, who: Who, uri: &str, token: &str) -> Result<Value> {
        let out = self.sdk(who, uri, token)?;
        ensure!(
            out.status.success(),
            "SDK failed: {}\nagent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent.logs()
        );
        serde_json::from_slice(&out.stdout).context("pod-client output")
    }

    /// The audit file once it holds every event the running agent emitted
    /// (after the lines earlier agents left).
    pub fn audit_trail(&self) -> Result<String> {
        self.cluster
            .audit_trail_after(self.agent.audit_bytes_at_start())
    }

    /// Audit events so far.
    pub fn audit(&self) -> Result<Vec<Value>> {
        self.audit_trail()?
            .lines()
            .map(|l| serde_json::from_str(l).context("audit line"))
            .collect()
    }

    /// Audit events of requests not served (any decision but `allow`).
    pub fn refused(&self) -> Result<Vec<Value>> {
        Ok(self
            .audit()?
            .into_iter()
            .filter(|e| e["decision"] != "allow")
            .collect())
    }

    pub fn last_audit(&self) -> Result<Value> {
        self.audit()?.pop().context("no audit event")
    }

    pub fn metrics(&self) -> Result<String> {
        scrape_metrics(&self.node.netns)
    }

    /// `count` raw requests from a pod process (`pod-client http-get`).
    pub fn burst(&self, who: Who, addr: SocketAddr, token: &str, count: u32) -> Result<Child> {
        let (cgroup, netns) = self.placement(who);
        let file = self.token_file(token)?;
        self.pod_client(cgroup, netns)?
            .args([
                "http-get",
                &addr.to_string(),
                &file.to_string_lossy(),
                &count.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn pod-client http-get")
    }
}
