//! The IMDS guard's surroundings: a fake instance metadata service on its
//! real addresses inside a test's node namespace, and kubelet's pod log
//! directory (`<namespace>_<pod>_<uid>`) in a temporary directory.

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use crate::{names, netns::Netns, tempdir::TempDir};

/// The instance metadata service's addresses.
pub const IMDS_V4_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
pub const IMDS_V6_ADDR: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
pub const IMDS_V4: &str = "169.254.169.254:80";
pub const IMDS_V6: &str = "[fd00:ec2::254]:80";
/// The IPv4 address as a dual-stack client reaches it.
pub const IMDS_V4_MAPPED: &str = "[::ffff:169.254.169.254]:80";

/// Answers every connection with a short HTTP reply, on both addresses,
/// in `node`'s namespace (a port-less bridge holds them). Lives as long as the
/// namespace: its accept threads end when the listeners go with it.
pub fn start_fake_imds(node: &Netns) -> Result<()> {
    let link = names::unique("imds");
    // A port-less bridge: kernels without the dummy driver have it.
    node.ip(&["link", "add", &link, "type", "bridge"])?;
    node.ip(&["link", "set", &link, "up"])?;
    node.ip(&["addr", "add", "169.254.169.254/32", "dev", &link])?;
    node.ip(&["addr", "add", "fd00:ec2::254/128", "dev", &link, "nodad"])?;
    let listeners = node.run_in(|| {
        [IMDS_V4, IMDS_V6]
            .iter()
            .map(|addr| {
                let addr: SocketAddr = addr.parse()?;
                TcpListener::bind(addr).with_context(|| format!("bind the fake IMDS on {addr}"))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    for listener in listeners {
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nimds");
            }
        });
    }
    Ok(())
}

/// Runs `pod-client imds-connect ADDR COUNT` as `cmd` (a pod client,
/// already placed) and returns its tally (`pid`, `connected`, `eperm`);
/// a connect that failed otherwise than EPERM is an error.
pub fn connect(mut cmd: Command, addr: &str, count: u32) -> Result<Value> {
    let out = cmd
        .args(["imds-connect", addr, &count.to_string()])
        .output()
        .context("run pod-client")?;
    ensure!(
        out.status.success(),
        "pod-client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tally: Value = serde_json::from_slice(&out.stdout).context("imds-connect output")?;
    ensure!(tally["failed"] == 0, "connects failed otherwise: {tally}");
    Ok(tally)
}

/// The IMDS guard's events in an audit trail (credential requests' have
/// no `event`).
pub fn events(trail: &str) -> impl Iterator<Item = Value> + '_ {
    trail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["event"] == "imds-connect")
}

/// kubelet's `/var/log/pods` for one test.
pub struct PodLogs {
    dir: TempDir,
}

impl PodLogs {
    pub fn new() -> Result<PodLogs> {
        Ok(PodLogs {
            dir: TempDir::new("epia-pod-logs-")?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The log directory kubelet makes for a pod.
    pub fn add(&self, namespace: &str, pod: &str, uid: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(format!("{namespace}_{pod}_{uid}"));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }
}
