//! Keeps the kernel's verdict map in step with the node's pods: one scan
//! at start, then inotify on kubelet's pod roots, their QoS levels and the
//! pod log directory — never a poll, never work per connect. kubelet
//! creates a pod's cgroup, then its log directory, then starts its
//! containers: the pod is classified between the last two.
//!
//! A thread of its own blocked in `read(2)` on the inotify descriptor, so
//! a new pod's verdict lands microseconds after kubelet's `mkdir`, whatever
//! the request path is doing.

use std::{
    collections::HashMap,
    ffi::OsStr,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_ebpf::ImdsVerdict;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tracing::{debug, error, info, warn};

use super::inventory::{Change, Found, Inventory};
use crate::{
    caller::cgroup::{CgroupResolver, PodLayout},
    telemetry::metrics::Metrics,
};

/// The kernel's verdict map, as the agent writes it.
pub type VerdictMap = BpfHashMap<MapData, u64, ImdsVerdict>;

/// Where pods are found.
pub struct Sources {
    pub resolver: CgroupResolver,
    pub layout: PodLayout,
    pub log_dir: PathBuf,
}

impl Sources {
    /// Everything on disk now.
    pub fn scan(&self) -> Found {
        let mut found = Found::default();
        for root in self.layout.roots() {
            let Ok(id) = CgroupResolver::id_of(&self.resolver.mount().join(root)) else {
                continue;
            };
            found.roots.push((root.to_owned(), id));
            for child in subdirectories(&self.resolver.mount().join(root)) {
                let rel = format!("{root}/{child}");
                match self.pod_dir(&rel) {
                    Some((uid, id)) => found.pods.push((rel, uid, id)),
                    None => {
                        for grandchild in subdirectories(&self.resolver.mount().join(&rel)) {
                            let rel = format!("{rel}/{grandchild}");
                            if let Some((uid, id)) = self.pod_dir(&rel) {
                                found.pods.push((rel, uid, id));
                            }
                        }
                    }
                }
            }
        }
        found.logs = self.log_dirs();
        found
    }

    /// `(pod UID, cgroup id)` if `rel` is a pod-level cgroup in kubelet's
    /// layout, owned by root all the way down.
    fn pod_dir(&self, rel: &str) -> Option<(String, u64)> {
        let pod = self.layout.pod_of_path(rel).ok()??;
        if pod.container_id.is_some() || pod.pod_path != rel {
            return None;
        }
        self.resolver.require_root_owned(rel).ok()?;
        let id = CgroupResolver::id_of(&self.resolver.mount().join(rel)).ok()?;
        Some((pod.pod_uid.to_string(), id))
    }

    /// The pod log directories kubelet made (root's; others are not its).
    fn log_dirs(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.metadata().is_ok_and(|m| m.is_dir() && m.uid() == 0))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    fn log_dir_is_roots(&self, name: &OsStr) -> bool {
        std::fs::symlink_metadata(self.log_dir.join(name)).is_ok_and(|m| m.is_dir() && m.uid() == 0)
    }
}

fn subdirectories(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// Writes `changes` to the kernel map; what fails is logged (the map keeps
/// the previous verdict, or none: the pod root's).
pub fn apply(map: &mut VerdictMap, changes: &[Change]) {
    for change in changes {
        let result = match *change {
            Change::Set(id, verdict) => map.insert(id, verdict, 0),
            Change::Remove(id) => match map.remove(&id) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            },
        };
        if let Err(e) = result {
            error!(error = %e, ?change, "IMDS guard: writing the kernel's verdict map failed");
        }
    }
}

/// What a watch is on.
#[derive(Clone, Debug)]
enum Watched {
    /// A pod root or a QoS level (relative path).
    Cgroups(String),
    Logs,
}

const CGROUP_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::ONLYDIR);

/// How long the watcher waits for a change before it rescans anyway (and
/// rewrites whatever the kernel map lost, e.g. a write that failed).
const RESYNC_EVERY: Duration = Duration::from_secs(300);
/// How long it waits before trying again to set up its watches.
const RETRY_SETUP: Duration = Duration::from_secs(5);

/// Starts the watcher thread: it brings the kernel map in step with a full
/// scan (programs adopted from a previous agent hold its verdicts, of pods
/// that may be gone; pods may have started while no agent ran), then
/// follows every change. Setting up its watches is retried until it works
/// (inotify instances are a per-user limit other root processes share);
/// meanwhile the verdicts written so far stand, and pods started since get
/// their root's.
pub fn spawn(
    sources: Sources,
    mut inventory: Inventory,
    mut map: VerdictMap,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("imds-watch".into())
        .spawn(move || {
            promptly();
            // Each pass: set up (retried until it works), catch up, follow
            // until reading inotify fails, then set up anew.
            loop {
                let mut watcher = set_up(&sources);
                watcher.resync(&sources, &mut inventory, &mut map, &metrics);
                watcher.follow(&sources, &mut inventory, &mut map, &metrics);
            }
        })?;
    Ok(())
}

/// A watcher, once one can be set up (retried every 5 s, said once).
fn set_up(sources: &Sources) -> Watcher {
    let mut failing = false;
    loop {
        match Watcher::new(sources.log_dir.clone()) {
            Ok(watcher) => {
                if failing {
                    info!("IMDS guard: watching pods again");
                }
                return watcher;
            }
            Err(e) => {
                if !failing {
                    error!(error = %e, dir = %sources.log_dir.display(), "IMDS guard: cannot watch the pod log directory (or no inotify instance is left); new pods get --imds-unclassified until it works, retrying every 5 s");
                    failing = true;
                }
                std::thread::sleep(RETRY_SETUP);
            }
        }
    }
}

/// Writes what the kernel map lacks or holds otherwise, removes what it
/// holds beyond `wanted`.
fn reconcile(map: &mut VerdictMap, wanted: &HashMap<u64, ImdsVerdict>) {
    let present: HashMap<u64, ImdsVerdict> = map.iter().filter_map(Result::ok).collect();
    let mut changes: Vec<Change> = present
        .keys()
        .filter(|id| !wanted.contains_key(id))
        .map(|&id| Change::Remove(id))
        .collect();
    changes.extend(
        wanted
            .iter()
            .filter(|(id, verdict)| present.get(id) != Some(verdict))
            .map(|(&id, &verdict)| Change::Set(id, verdict)),
    );
    if !changes.is_empty() {
        debug!(
            changes = changes.len(),
            "IMDS guard: kernel verdicts brought in step"
        );
    }
    apply(map, &changes);
}

/// Whether `inotify` has events within `timeout`.
fn readable_within(inotify: &Inotify, timeout: Duration) -> bool {
    let mut fd = libc::pollfd {
        fd: inotify.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: poll on one valid pollfd.
        let ready = unsafe { libc::poll(&mut fd, 1, millis) };
        if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        // Other errors count as readable: the read that follows says what
        // happened.
        return ready != 0;
    }
}

/// Puts this thread in the real-time class (lowest priority): it sleeps
/// in `read(2)` nearly always and does microseconds of work per event, so
/// it costs the node nothing — but a new pod's verdict then lands as soon
/// as kubelet's `mkdir` wakes it, not when a busy CPU next gets round to
/// it. Without CAP_SYS_NICE it stays an ordinary thread (said once).
fn promptly() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler on the calling thread with a valid param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        info!(
            error = %io::Error::last_os_error(),
            "IMDS guard: the pod watcher runs at normal priority (no CAP_SYS_NICE); a pod's verdict may land a moment after its cgroup and logs appear"
        );
    }
}

struct Watcher {
    inotify: Inotify,
    watches: HashMap<WatchDescriptor, Watched>,
}

impl Watcher {
    fn new(log_dir: PathBuf) -> io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let wd = inotify.watches().add(&log_dir, CGROUP_EVENTS)?;
        Ok(Watcher {
            inotify,
            watches: HashMap::from([(wd, Watched::Logs)]),
        })
    }

    /// Watches every root and QoS level (anew: removed ones drop out by
    /// themselves), replaces the inventory with a full scan and brings the
    /// kernel map in step with it.
    fn resync(
        &mut self,
        sources: &Sources,
        inventory: &mut Inventory,
        map: &mut VerdictMap,
        metrics: &Metrics,
    ) {
        for root in sources.layout.roots() {
            self.watch_cgroups(sources, root);
            for child in subdirectories(&sources.resolver.mount().join(root)) {
                let rel = format!("{root}/{child}");
                if sources.pod_dir(&rel).is_none() {
                    self.watch_cgroups(sources, &rel);
                }
            }
        }
        inventory.resync(sources.scan());
        reconcile(map, &inventory.verdicts());
        metrics.set_imds_pods(inventory.classified());
    }

    fn watch_cgroups(&mut self, sources: &Sources, rel: &str) {
        let path = sources.resolver.mount().join(rel);
        match self.inotify.watches().add(&path, CGROUP_EVENTS) {
            Ok(wd) => {
                self.watches.insert(wd, Watched::Cgroups(rel.to_owned()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(error = %e, path = %path.display(), "IMDS guard: cannot watch a pod cgroup directory")
            }
        }
    }

    fn follow(
        &mut self,
        sources: &Sources,
        inventory: &mut Inventory,
        map: &mut VerdictMap,
        metrics: &Metrics,
    ) {
        let mut buffer = [0u8; 16 * 1024];
        let mut resynced = Instant::now();
        loop {
            // Due whether or not pods changed meanwhile.
            let due = RESYNC_EVERY.saturating_sub(resynced.elapsed());
            if due.is_zero() || !readable_within(&self.inotify, due) {
                self.resync(sources, inventory, map, metrics);
                resynced = Instant::now();
                continue;
            }
            let events = match self.inotify.read_events_blocking(&mut buffer) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!(error = %e, "IMDS guard: reading inotify failed; setting the watches up again");
                    return;
                }
            };
            let mut rescan = false;
            let mut changes = Vec::new();
            let mut new_levels = Vec::new();
            for event in events {
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    rescan = true;
                    continue;
                }
                if event.mask.contains(EventMask::IGNORED) {
                    self.watches.remove(&event.wd);
                    continue;
                }
                let (Some(name), Some(watched)) = (event.name, self.watches.get(&event.wd)) else {
                    continue;
                };
                let appeared = event
                    .mask
                    .intersects(EventMask::CREATE | EventMask::MOVED_TO);
                match watched {
                    Watched::Logs => {
                        let Some(name) = name.to_str() else { continue };
                        if appeared && sources.log_dir_is_roots(OsStr::new(name)) {
                            changes.extend(inventory.log_dir_found(name));
                        } else if !appeared {
                            changes.extend(inventory.log_dir_gone(name));
                        }
                    }
                    Watched::Cgroups(parent) => {
                        let Some(name) = name.to_str() else { continue };
                        let rel = format!("{parent}/{name}");
                        if !appeared {
                            if inventory.holds_cgroup(&rel) {
                                changes.extend(inventory.cgroup_gone(&rel));
                            }
                        } else if let Some((uid, id)) = sources.pod_dir(&rel) {
                            changes.extend(inventory.pod_cgroup_found(rel, uid, id));
                        } else if sources.layout.roots().any(|r| r == parent) {
                            // A QoS level made after start: watch it, and
                            // take what it already holds.
                            new_levels.push(rel);
                        }
                    }
                }
            }
            apply(map, &changes);
            for level in new_levels {
                self.watch_cgroups(sources, &level);
                for child in subdirectories(&sources.resolver.mount().join(&level)) {
                    let rel = format!("{level}/{child}");
                    if let Some((uid, id)) = sources.pod_dir(&rel) {
                        apply(map, &inventory.pod_cgroup_found(rel, uid, id));
                    }
                }
            }
            if rescan {
                info!("IMDS guard: inotify queue overflowed; rescanning pods");
                self.resync(sources, inventory, map, metrics);
            }
            debug!(changes = changes.len(), "IMDS guard: pods updated");
            metrics.set_imds_pods(inventory.classified());
        }
    }
}
