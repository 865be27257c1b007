//! A node network namespace that owns the agent's link-local addresses, and
//! pod network namespaces wired to it over veth pairs the way a CNI does.
//!
//! Addresses: 198.18.0.0/15 (benchmarking range) and 2001:2::/48 (its IPv6
//! counterpart) for the veths, only ever inside namespaces made here.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::Result;

use crate::{names, netns::Netns};

pub const AGENT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
pub const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// What the webhook sets as `AWS_CONTAINER_CREDENTIALS_FULL_URI` (IPv4).
pub const V4_URI: &str = "http://169.254.170.23/v1/credentials";

pub struct Node {
    pub netns: Netns,
    next_pod: AtomicU32,
}

impl Node {
    /// An empty node namespace (the agent's `init` populates it).
    pub fn bare() -> Result<Node> {
        Ok(Node {
            netns: Netns::new("epn")?,
            next_pod: AtomicU32::new(1),
        })
    }

    /// A node namespace whose `pod-id-link0` already holds the agent
    /// addresses, set up with iproute2 (for tests of other parts than init).
    pub fn with_agent_addresses() -> Result<Node> {
        let node = Node::bare()?;
        let ns = &node.netns;
        ns.ip(&["link", "add", "pod-id-link0", "type", "bridge"])?;
        ns.ip(&["link", "set", "pod-id-link0", "up"])?;
        ns.ip(&["addr", "add", "169.254.170.23/32", "dev", "pod-id-link0"])?;
        ns.ip(&[
            "addr",
            "add",
            "fd00:ec2::23/128",
            "dev",
            "pod-id-link0",
            "nodad",
        ])?;
        Ok(node)
    }
}

/// A pod namespace with `eth0` wired to the node.
pub struct PodNet {
    pub netns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub node_ipv4: Ipv4Addr,
}

impl PodNet {
    pub fn attach(node: &Node) -> Result<PodNet> {
        let k = node.next_pod.fetch_add(1, Ordering::Relaxed);
        let netns = Netns::new("epp")?;
        // /30 per pod inside 198.18.0.0/15.
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 4 * k;
        let node_ipv4 = Ipv4Addr::from(base + 1);
        let ipv4 = Ipv4Addr::from(base + 2);
        let node_ipv6 = Ipv6Addr::new(0x2001, 2, 0, k as u16, 0, 0, 0, 1);
        let ipv6 = Ipv6Addr::new(0x2001, 2, 0, k as u16, 0, 0, 0, 2);
        let host_if = names::unique("vh");
        let n = &node.netns;
        n.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        n.ip(&["addr", "add", &format!("{node_ipv4}/30"), "dev", &host_if])?;
        n.ip(&[
            "addr",
            "add",
            &format!("{node_ipv6}/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        n.ip(&["link", "set", &host_if, "up"])?;
        netns.ip(&["addr", "add", &format!("{ipv4}/30"), "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &node_ipv4.to_string()])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &node_ipv6.to_string(),
        ])?;
        Ok(PodNet {
            netns,
            ipv4,
            ipv6,
            node_ipv4,
        })
    }
}
