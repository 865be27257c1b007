//! Who a connection's budget and rate belong to.
//!
//! Limits must be per caller, not per node: a pod that holds or floods
//! connections may exhaust only its own share. So a key must be something a
//! caller cannot mint at will. The kernel's attribution names the pod, or
//! the cgroup of a node process; but anyone may create cgroups in a subtree
//! delegated to them, pick any source address in 127.0.0.0/8, or make a SYN
//! the kernel cannot stamp (Fast Open, MPTCP). So only pods and system
//! services (root-owned cgroups, such as the kubelet's) get shares of their
//! own; everything else the kernel could not vouch for shares one.

use std::{fmt, net::IpAddr, sync::Arc};

use crate::{caller::identify::Identified, caller::policy::Caller};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A pod, by UID: all of its containers and connections together.
    Pod(Arc<str>),
    /// A node process in a root-owned cgroup (a system service), by cgroup.
    Node(u64),
    /// Attribution on, but neither: unattributed connections, processes in
    /// delegated (user-owned) cgroups. All of them together.
    Unverified,
    /// Attribution off: the source address is all there is.
    Source(IpAddr),
}

impl ClientKey {
    /// The key for a connection from `peer`, with what the kernel said of it.
    pub fn of(identified: Option<&Identified>, peer: IpAddr) -> ClientKey {
        let Some(identified) = identified else {
            return ClientKey::Source(peer);
        };
        match (&identified.caller, identified.kernel) {
            (Caller::Pod(pod), _) => ClientKey::Pod(pod.pod_uid.clone()),
            (
                Caller::NotAPod {
                    root_owned: true, ..
                },
                Some(kernel),
            ) => ClientKey::Node(kernel.cgroup_id),
            _ => ClientKey::Unverified,
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Pod(uid) => write!(f, "pod {uid}"),
            ClientKey::Node(id) => write!(f, "node cgroup {id}"),
            ClientKey::Unverified => write!(f, "unverified callers"),
            ClientKey::Source(ip) => write!(f, "source {ip}"),
        }
    }
}
