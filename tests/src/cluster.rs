//! A small cluster on one machine: a node namespace owned by the agent's
//! `init`, pod A (systemd cgroup driver, own network namespace over a veth)
//! and pod B (cgroupfs driver, hostNetwork) in a private cgroup subtree, a
//! fake EKS Auth with `default/app-a → role-a` and `default/app-b → role-b`,
//! and the test issuer. The agent itself is started by the user, with
//! [`Cluster::agent_args`].
//!
//! Fields are declared in drop order: upstream, pod network, node, cgroups.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;

use crate::{
    agent_proc::{init_node, scrape_metrics},
    cgroups::{CgroupTree, Driver, PodSpec},
    fake_eks_auth::FakeEksAuth,
    netns::Netns,
    tempdir::TempDir,
    tokens::{Issuer, TokenSpec},
    topology::{Node, PodNet},
    wait::wait_for,
};

/// Agent arguments that lift both request-rate limits (per client and
/// node-wide): for tests and benches about something else than rates.
pub const UNLIMITED: [&str; 4] = ["--pod-rate-limit", "0", "--max-request-rate", "0"];

/// One of the two pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    A,
    B,
}

pub struct Cluster {
    pub fake: FakeEksAuth,
    pub issuer: Issuer,
    pub net_a: PodNet,
    pub node: Node,
    pub pod_a: PodSpec,
    pub pod_b: PodSpec,
    pub cg_a: PathBuf,
    pub cg_b: PathBuf,
    pub tree: CgroupTree,
    pub dir: TempDir,
    pub node_name: String,
}

impl Cluster {
    pub fn new(node_name: &str) -> Result<Cluster> {
        let cluster = Self::uninitialized(node_name)?;
        init_node(&cluster.node.netns)?;
        Ok(cluster)
    }

    /// Like [`Cluster::new`], but the node's link and addresses are left to
    /// the caller (the container test runs the init container for them).
    pub fn uninitialized(node_name: &str) -> Result<Cluster> {
        let tree = CgroupTree::new()?;
        let pod_a = PodSpec::new(Driver::Systemd);
        let pod_b = PodSpec::new(Driver::Cgroupfs);
        let cg_a = tree.pod(&pod_a)?;
        let cg_b = tree.pod(&pod_b)?;
        let node = Node::bare()?;
        let net_a = PodNet::attach(&node)?;
        let issuer = Issuer::generate()?;
        let fake = FakeEksAuth::start(Some(&node.netns), issuer.decoding_key())?;
        fake.associate("default", "app-a", "role-a");
        fake.associate("default", "app-b", "role-b");
        Ok(Cluster {
            fake,
            issuer,
            net_a,
            node,
            pod_a,
            pod_b,
            cg_a,
            cg_b,
            tree,
            dir: TempDir::new("epia-cluster-")?,
            node_name: node_name.to_owned(),
        })
    }

    /// `server` arguments for this cluster: its EKS Auth, attribution `mode`
    /// attached to the cluster's cgroup subtree, its node name, an audit log
    /// in [`Cluster::audit_log`]; then `extra`.
    pub fn agent_args(&self, mode: &str, extra: &[&str]) -> Vec<String> {
        let mut args = crate::wait::args(&[
            "-c",
            "test-cluster",
            "--endpoint",
            &self.fake.endpoint(),
            "--attribution",
            mode,
            "--cgroup-root",
            &self.tree.root().to_string_lossy(),
            "--node-name",
            &self.node_name,
            "--audit-log",
            &self.audit_log().to_string_lossy(),
        ]);
        for root in self.tree.kubepods_roots() {
            args.extend(["--kubepods-root".to_owned(), root]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// A pod's process placement: its cgroup and network namespace.
    pub fn placement(&self, who: Who) -> (&Path, &Netns) {
        match who {
            Who::A => (&self.cg_a, &self.net_a.netns),
            Who::B => (&self.cg_b, &self.node.netns),
        }
    }

    pub fn pod(&self, who: Who) -> &PodSpec {
        match who {
            Who::A => &self.pod_a,
            Who::B => &self.pod_b,
        }
    }

    /// What `who`'s own projected token says (service account app-a/app-b).
    pub fn own_spec(&self, who: Who) -> TokenSpec {
        let (sa, name) = match who {
            Who::A => ("app-a", "pod-a"),
            Who::B => ("app-b", "pod-b"),
        };
        TokenSpec::new("default", sa)
            .pod(name, &self.pod(who).uid)
            .node(&self.node_name)
    }

    pub fn own_token(&self, who: Who) -> Result<String> {
        self.issuer.mint(&self.own_spec(who))
    }

    /// The audit file once it holds every event the node's agent emitted
    /// so far. The agent's writer thread appends a moment after the answer
    /// went out, so this waits (bounded) for the file to catch up with the
    /// agent's count of events; an agent that no longer answers is not
    /// waited for.
    pub fn audit_trail(&self) -> Result<String> {
        self.audit_trail_after(0)
    }

    /// [`audit_trail`](Self::audit_trail) when `earlier` bytes were in the
    /// file before the running agent started (earlier agents' lines).
    pub fn audit_trail_after(&self, earlier: u64) -> Result<String> {
        let read = || std::fs::read_to_string(self.audit_log()).unwrap_or_default();
        let Some(emitted) = scrape_metrics(&self.node.netns)
            .ok()
            .and_then(|m| metric_value(&m, "pod_identity_audit_events_total"))
        else {
            return Ok(read());
        };
        // Polled: only the running agent's part, from `earlier` on.
        let ours = || -> std::io::Result<usize> {
            use std::io::{Read as _, Seek as _};
            let mut file = std::fs::File::open(self.audit_log())?;
            file.seek(std::io::SeekFrom::Start(earlier))?;
            let mut tail = Vec::new();
            file.read_to_end(&mut tail)?;
            Ok(tail.iter().filter(|&&b| b == b'\n').count())
        };
        wait_for(
            "the audit file to hold every event",
            Duration::from_secs(30),
            || Ok(ours().unwrap_or(0) as f64 >= emitted),
        )?;
        Ok(read())
    }
}

/// The value of a series in a Prometheus text exposition, named as exposed
/// (`name` or `name{label="value",…}`, label values without spaces).
pub fn metric_value(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}
