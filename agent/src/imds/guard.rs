//! The IMDS guard's life: prepared before the kernel programs are
//! attached (so every known pod has its verdict when they start deciding),
//! watching pods once they are, reading events once the agent serves.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch as channel;
use tracing::{info, warn};

use super::{
    events::{self, KernelEvents},
    handoff::Handoff,
    inventory::{Change, Inventory, PodTable},
    policy::{ImdsMode, ImdsPolicy},
    watch::{self, Sources},
};
use crate::{
    caller::{
        attribution::{ImdsAttach, ImdsMaps},
        cgroup::{CgroupResolver, PodLayout},
    },
    config::ServerArgs,
    serving::server::Accepting,
    telemetry::{audit::Auditor, metrics::Metrics},
};

/// Scanned, not yet attached.
pub struct Prepared {
    policy: ImdsPolicy,
    inventory: Inventory,
    sources: Sources,
    table: Arc<PodTable>,
    initial: Vec<(u64, agent_ebpf::ImdsVerdict)>,
}

/// The guard cannot run and `--imds enforce` asked for it: the agent
/// stops rather than serve with pods' IMDS access unguarded. (Distinct
/// from the kernel programs' own failures, which `--attribution auto`
/// degrades; this one never does.)
#[derive(Debug, thiserror::Error)]
#[error("--imds enforce: the IMDS guard cannot run: {0}")]
pub struct GuardRefused(String);

impl GuardRefused {
    pub fn new(why: impl Into<String>) -> GuardRefused {
        GuardRefused(why.into())
    }
}

/// `None` when `--imds off`, or when the guard cannot run in audit (said
/// loudly); an error ([`GuardRefused`]) when it cannot run in enforce.
pub fn prepare(
    args: &ServerArgs,
    mount: &Path,
    layout: &PodLayout,
) -> anyhow::Result<Option<Prepared>> {
    match try_prepare(args, mount, layout) {
        Ok(prepared) => Ok(prepared),
        Err(e) if args.imds == ImdsMode::Enforce => Err(GuardRefused(format!("{e:#}")).into()),
        Err(e) => {
            warn!(
                error = format!("{e:#}"),
                "IMDS GUARD IS OFF: pods' connects to the instance metadata service go unrecorded"
            );
            Ok(None)
        }
    }
}

fn try_prepare(
    args: &ServerArgs,
    mount: &Path,
    layout: &PodLayout,
) -> anyhow::Result<Option<Prepared>> {
    if args.imds == ImdsMode::Off {
        return Ok(None);
    }
    let policy = ImdsPolicy::new(args.imds, args.imds_allow.clone(), args.imds_unclassified);
    if !args.pod_log_dir.is_dir() {
        warn!(dir = %args.pod_log_dir.display(), "IMDS guard: the pod log directory does not exist; no pod can be classified (pods get --imds-unclassified) until it does — mount kubelet's /var/log/pods, or set --pod-log-dir");
    }
    let sources = Sources {
        resolver: CgroupResolver::new(mount)?,
        layout: layout.clone(),
        log_dir: args.pod_log_dir.clone(),
    };
    let table = Arc::new(PodTable::default());
    let mut inventory = Inventory::new(policy.clone(), table.clone());
    let initial = inventory
        .resync(sources.scan())
        .into_iter()
        .filter_map(|change| match change {
            Change::Set(id, verdict) => Some((id, verdict)),
            Change::Remove(_) => None,
        })
        .collect();
    Ok(Some(Prepared {
        policy,
        inventory,
        sources,
        table,
        initial,
    }))
}

impl Prepared {
    pub fn attach_options(&self, args: &ServerArgs) -> ImdsAttach {
        ImdsAttach {
            addresses: args.imds_hosts.clone(),
            port: args.imds_port,
            policy: self.policy.describe(),
            initial: self.initial.clone(),
        }
    }

    /// The programs are attached: brings the map in step (programs
    /// adopted from a previous agent hold its verdicts) and follows pods.
    /// `handoff`: how this agent takes turns reading the events with
    /// another that shares its programs.
    pub fn start(
        self,
        maps: ImdsMaps,
        metrics: Arc<Metrics>,
        handoff: Handoff,
    ) -> anyhow::Result<Watching> {
        let mode = self.policy.mode.label();
        let classified = self.inventory.classified();
        let layout = self.sources.layout.clone();
        let mount = self.sources.resolver.mount().to_owned();
        watch::spawn(self.sources, self.inventory, maps.verdicts, metrics.clone())
            .context("starting the IMDS guard's pod watcher")?;
        info!(
            mode,
            pods = classified,
            allow = %self.policy.describe(),
            "IMDS guard on"
        );
        Ok(Watching {
            kernel: KernelEvents {
                ring: maps.events,
                lost: maps.lost,
                flood: maps.flood,
            },
            table: self.table,
            layout,
            mount,
            mode,
            handoff,
        })
    }
}

/// Watching pods; events not read yet.
pub struct Watching {
    kernel: KernelEvents,
    table: Arc<PodTable>,
    layout: PodLayout,
    mount: std::path::PathBuf,
    mode: &'static str,
    handoff: Handoff,
}

impl Watching {
    /// Reads the kernel's events until the agent stops.
    pub async fn read(
        self,
        auditor: Arc<Auditor>,
        metrics: Arc<Metrics>,
        accepting: channel::Receiver<Accepting>,
        interval: Duration,
    ) {
        let cx = match CgroupResolver::new(&self.mount) {
            Ok(resolver) => events::Context {
                pods: self.table,
                resolver,
                layout: self.layout,
                auditor,
                metrics,
                mode: self.mode,
                interval,
            },
            Err(e) => {
                warn!(error = %e, "IMDS guard: cannot resolve cgroups; its events go unread");
                return;
            }
        };
        events::run(self.kernel, cx, self.handoff, accepting).await;
    }
}
