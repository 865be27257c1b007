//! Connection → caller: the kernel's record (cgroup id, pid), the cgroup's
//! path (one `open_by_handle_at`), the pod it belongs to. No tree walks, no
//! work proportional to the number of pods.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use crate::{
    attribution::{Caller as KernelCaller, CallerLookup},
    cgroup::{CgroupResolver, pod_of_path},
    metrics::Metrics,
    policy::Caller,
};

/// Everything known about who made a request.
#[derive(Clone, Debug)]
pub struct Identified {
    pub caller: Caller,
    pub kernel: Option<KernelCaller>,
    /// `comm` of the calling process, best effort (needs the host's /proc).
    pub process: Option<String>,
}

pub struct Identifier {
    lookup: Arc<dyn CallerLookup>,
    resolver: CgroupResolver,
    metrics: Arc<Metrics>,
}

impl Identifier {
    pub fn new(
        lookup: Arc<dyn CallerLookup>,
        resolver: CgroupResolver,
        metrics: Arc<Metrics>,
    ) -> Identifier {
        Identifier {
            lookup,
            resolver,
            metrics,
        }
    }

    pub fn resolver(&self) -> &CgroupResolver {
        &self.resolver
    }

    pub fn identify(&self, peer: SocketAddr, local: SocketAddr) -> Identified {
        let started = Instant::now();
        let identified = match self.lookup.caller(peer, local) {
            Err(e) => {
                self.metrics.attribution_lookup("error");
                Identified {
                    caller: Caller::Unresolvable(format!("kernel lookup failed: {e}")),
                    kernel: None,
                    process: None,
                }
            }
            Ok(None) => {
                self.metrics.attribution_lookup("miss");
                Identified {
                    caller: Caller::Unattributed,
                    kernel: None,
                    process: None,
                }
            }
            Ok(Some(kernel)) => {
                self.metrics.attribution_lookup("hit");
                Identified {
                    caller: self.pod_of(kernel.cgroup_id),
                    kernel: Some(kernel),
                    process: process_name(kernel.pid),
                }
            }
        };
        self.metrics.resolve_latency(started.elapsed());
        identified
    }

    fn pod_of(&self, cgroup_id: u64) -> Caller {
        match self.resolver.path_of(cgroup_id) {
            Ok(Some(path)) => match pod_of_path(&path) {
                Ok(Some(pod)) => Caller::Pod(pod),
                Ok(None) => Caller::NotAPod { cgroup_path: path },
                Err(e) => Caller::Unresolvable(e.to_string()),
            },
            Ok(None) => Caller::Unresolvable(format!("cgroup {cgroup_id} no longer exists")),
            Err(e) => Caller::Unresolvable(e.to_string()),
        }
    }
}

fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
}
