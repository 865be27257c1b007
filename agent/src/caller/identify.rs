//! Connection → caller: the kernel's record (cgroup id, pid), the cgroup's
//! path (one `open_by_handle_at`, remembered per cgroup id), the pod it
//! belongs to. No tree walks, no work proportional to the number of pods.
//!
//! This runs synchronously in the connection's own task, once per
//! connection. Only a cgroup's first connection makes syscalls (one
//! `open_by_handle_at`, one `readlink`, one `stat` per path segment — a few
//! microseconds on kernfs, which never blocks on I/O); every later one is a
//! cache hit. So it stays on the async worker: handing a few microseconds
//! to `spawn_blocking` would cost more than it saves, and the accept loop
//! itself never waits on it.

use std::{sync::Arc, time::Instant};

use crate::{
    caller::attribution::{Accepted, AttributionError, Comm, Opener, OpenerLookup},
    caller::cgroup::{CgroupError, CgroupResolver, PodLayout},
    caller::policy::{Caller, Unresolved},
    caller::syn::SavedSyn,
    telemetry::metrics::Metrics,
};

/// Everything known about who made a request.
#[derive(Clone, Debug)]
pub struct Identified {
    pub caller: Caller,
    pub kernel: Option<Opener>,
}

impl Identified {
    /// `comm` of the calling thread, from the kernel.
    pub fn process(&self) -> Option<Comm> {
        self.kernel.and_then(|k| k.process())
    }
}

pub struct Identifier {
    lookup: Arc<dyn OpenerLookup>,
    resolver: CgroupResolver,
    layout: PodLayout,
    metrics: Arc<Metrics>,
    /// cgroup id → what it resolved to. cgroup ids are 64-bit and never
    /// reused, and a removed cgroup has no process left to connect, so an
    /// entry can only ever be right; caching saves the open_by_handle_at +
    /// readlink + parse on every request after a pod's first.
    resolved: moka::sync::Cache<u64, Caller>,
}

/// Distinct caller cgroups remembered (a node runs ~100 pods).
const RESOLVED_CAPACITY: u64 = 4096;

impl Identifier {
    pub fn new(
        lookup: Arc<dyn OpenerLookup>,
        resolver: CgroupResolver,
        layout: PodLayout,
        metrics: Arc<Metrics>,
    ) -> Identifier {
        Identifier {
            lookup,
            resolver,
            layout,
            metrics,
            resolved: moka::sync::Cache::new(RESOLVED_CAPACITY),
        }
    }

    pub fn identify(&self, conn: &Accepted) -> Identified {
        let started = Instant::now();
        if conn.syn == SavedSyn::Missing {
            self.metrics.attribution_lookup("no-syn");
            return Identified {
                caller: Caller::NoSynKept,
                kernel: None,
            };
        }
        let identified = match self.lookup.opener(conn) {
            Err(AttributionError::Predecessor(why)) => {
                self.metrics.attribution_lookup("unvouched");
                tracing::debug!(why, "the previous agent could not vouch for a stamp");
                Identified {
                    caller: Caller::Unvouched,
                    kernel: None,
                }
            }
            Err(e) => {
                self.metrics.attribution_lookup("error");
                Identified {
                    caller: Caller::Unresolvable(Unresolved::KernelLookup(Arc::new(e))),
                    kernel: None,
                }
            }
            Ok(None) => {
                self.metrics.attribution_lookup("miss");
                Identified {
                    caller: Caller::Unattributed,
                    kernel: None,
                }
            }
            Ok(Some(kernel)) => {
                self.metrics.attribution_lookup("hit");
                Identified {
                    caller: self.pod_of(kernel.cgroup_id),
                    kernel: Some(kernel),
                }
            }
        };
        self.metrics.resolve_latency(started.elapsed());
        identified
    }

    fn pod_of(&self, cgroup_id: u64) -> Caller {
        if let Some(known) = self.resolved.get(&cgroup_id) {
            return known;
        }
        let caller = self.resolve(cgroup_id);
        // Failures are not remembered: they may be transient. A delegated
        // cgroup stays delegated (only root could hand it back).
        if matches!(
            caller,
            Caller::Pod(_) | Caller::NotAPod { .. } | Caller::Delegated { .. }
        ) {
            self.resolved.insert(cgroup_id, caller.clone());
        }
        caller
    }

    fn resolve(&self, cgroup_id: u64) -> Caller {
        match self.resolver.path_of(cgroup_id) {
            Ok(Some(path)) => match self.layout.pod_of_path(&path) {
                Ok(Some(pod)) => match self.resolver.require_root_owned(&path) {
                    Ok(()) => Caller::Pod(pod),
                    Err(CgroupError::Delegated { path, uid }) => Caller::Delegated {
                        cgroup_path: path,
                        uid,
                    },
                    Err(e) => Caller::Unresolvable(Unresolved::Cgroup(Arc::new(e))),
                },
                Ok(None) => Caller::NotAPod {
                    root_owned: self.resolver.require_root_owned(&path).is_ok(),
                    cgroup_path: path,
                },
                Err(e) => Caller::Unresolvable(Unresolved::Cgroup(Arc::new(e))),
            },
            Ok(None) => Caller::Unresolvable(Unresolved::CgroupGone(cgroup_id)),
            Err(e) => Caller::Unresolvable(Unresolved::Cgroup(Arc::new(e))),
        }
    }
}
