//! Who a connection's budget and rate belong to.
//!
//! Limits must be per caller, not per node: a pod that holds or floods
//! connections may exhaust only its own share. The kernel's attribution
//! names the caller when it can (the pod, or the cgroup of a node process);
//! only connections the kernel did not attribute (remote scrapers, or every
//! connection when attribution is off) fall back to their source address.

use std::{fmt, net::IpAddr};

use crate::{identify::Identified, policy::Caller};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A pod, by UID: all of its containers and connections together.
    Pod(String),
    /// A process outside any pod, by its cgroup.
    Cgroup(u64),
    /// Not attributed: by source address.
    Source(IpAddr),
}

impl ClientKey {
    /// The key for a connection from `peer`, with what the kernel said of it.
    pub fn of(identified: Option<&Identified>, peer: IpAddr) -> ClientKey {
        match identified {
            Some(Identified {
                caller: Caller::Pod(pod),
                ..
            }) => ClientKey::Pod(pod.pod_uid.clone()),
            Some(Identified {
                kernel: Some(kernel),
                ..
            }) => ClientKey::Cgroup(kernel.cgroup_id),
            _ => ClientKey::Source(peer),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Pod(uid) => write!(f, "pod {uid}"),
            ClientKey::Cgroup(id) => write!(f, "cgroup {id}"),
            ClientKey::Source(ip) => write!(f, "source {ip}"),
        }
    }
}
