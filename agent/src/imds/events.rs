//! Reads the kernel's IMDS events and turns them into audit events and
//! metrics, aggregated per pod: the first connect of a (pod, decision) in
//! an interval is recorded at once, with everything the kernel and the
//! inventory know of it; the rest of the interval's connects — those
//! published and those the kernel only counted (`IMDS_FLOOD`) — become one
//! summary event with their `count` at the interval's end. A pod that
//! connects in a loop costs two audit lines per interval.
//!
//! Only the serving agent reads, in turns (`imds::handoff`): two agents
//! sharing pinned programs would otherwise split the ring between them and
//! report the kernel's counts twice. Reading pauses while a successor
//! serves.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_ebpf::{
    IMDS_REASON_NODE, IMDS_REASON_UNCLASSIFIED, ImdsEvent, ImdsFlood, QUOTA_KEY_UID, RawAddr,
    is_v4_mapped,
};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::warn;

use super::{
    handoff::{Baseline, Handoff, Turn},
    inventory::PodTable,
    policy::{decision_label, reason_label},
};
use crate::{
    caller::cgroup::{CgroupResolver, PodLayout},
    serving::server::Accepting,
    telemetry::{
        audit::{Auditor, ImdsAuditEvent, Millis},
        metrics::Metrics,
    },
};

/// Distinct namespaces the connects metric labels; the rest are `_other`.
const MAX_NAMESPACE_LABELS: usize = 256;

/// The kernel side the reader consumes.
pub struct KernelEvents {
    /// The ring map, mapped by each turn's own reader.
    pub ring: MapData,
    pub lost: PerCpuArray<MapData, u64>,
    pub flood: BpfHashMap<MapData, u64, ImdsFlood>,
}

/// What the reader needs besides the kernel.
pub struct Context {
    pub pods: Arc<PodTable>,
    pub resolver: CgroupResolver,
    pub layout: PodLayout,
    pub auditor: Arc<Auditor>,
    pub metrics: Arc<Metrics>,
    pub mode: &'static str,
    pub interval: Duration,
}

/// A (scope, decision)'s connects in the current interval after the first.
struct Pending {
    template: ImdsAuditEvent,
    more: u64,
}

struct Reader {
    kernel_lost: PerCpuArray<MapData, u64>,
    flood: BpfHashMap<MapData, u64, ImdsFlood>,
    cx: Context,
    /// The node's network namespace (this agent's: it runs hostNetwork).
    host_netns: Option<u64>,
    pending: HashMap<(u64, &'static str), Pending>,
    /// Last event seen per scope: who the kernel's counted connects are.
    last_seen: HashMap<u64, ImdsAuditEvent>,
    /// `IMDS_FLOOD`'s counts already reported, per scope.
    reported: HashMap<u64, [u64; 3]>,
    lost_reported: u64,
    namespaces: HashSet<String>,
}

/// Events read per wake-up before other tasks get a turn.
const MAX_PER_WAKE: usize = 1024;

/// Runs until the agent stops: while it serves, takes its turn to read
/// (see `handoff`), reads events as they come and settles the interval's
/// summaries on each tick; when a successor serves, settles, leaves what it
/// reported for it and waits.
pub async fn run(
    kernel: KernelEvents,
    cx: Context,
    mut handoff: Handoff,
    mut accepting: watch::Receiver<Accepting>,
) {
    let mut said = None;
    let mut reader = Reader {
        host_netns: own_netns_cookie(),
        reported: HashMap::new(),
        lost_reported: 0,
        kernel_lost: kernel.lost,
        flood: kernel.flood,
        pending: HashMap::new(),
        last_seen: HashMap::new(),
        namespaces: HashSet::new(),
        cx,
    };
    loop {
        loop {
            match *accepting.borrow_and_update() {
                Accepting::Yes => break,
                // Stopping: nothing more to read (the last turn settled).
                Accepting::Stop => return,
                Accepting::Paused => {}
            }
            if accepting.changed().await.is_err() {
                return;
            }
        }
        // Another agent's turn (the one this agent takes over from, until
        // it pauses): ask again shortly, or give up waiting when told to.
        let (turn, baseline) = match handoff.try_take() {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                pause_or_change(&mut accepting, TURN_POLL).await;
                continue;
            }
            // The handover directory refused (not this agent's): no
            // successor can take over either, so nobody else reads.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                warn_once(&mut said, &e, "reading without the event reader's lock");
                (Turn::unlocked(), None)
            }
            Err(e) => {
                warn_once(
                    &mut said,
                    &e,
                    "cannot take the event reader's lock; retrying",
                );
                pause_or_change(&mut accepting, RETRY).await;
                continue;
            }
        };
        reader.begin(baseline);
        let read = reader.read_turn(&kernel.ring, &mut accepting).await;
        reader.settle();
        if let Err(e) = turn.end(&reader.baseline()) {
            warn!(error = %e, "IMDS guard: could not leave the reported counts for the next reader");
        }
        match read {
            Ok(true) => {}
            Ok(false) => return,
            // Mapping the ring or waiting on it failed (descriptors short,
            // say): the turn is given back, and taken again in a moment.
            Err(e) => {
                warn_once(
                    &mut said,
                    &e,
                    "reading the kernel's events failed; retrying",
                );
                pause_or_change(&mut accepting, RETRY).await;
            }
        }
    }
}

/// How often a successor asks for the reader's turn.
const TURN_POLL: Duration = Duration::from_millis(100);
/// How long after a failure reading is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Waits `pause`, or less if `accepting` changes.
async fn pause_or_change(accepting: &mut watch::Receiver<Accepting>, pause: Duration) {
    let _ = tokio::time::timeout(pause, accepting.changed()).await;
}

/// Logs a failure once per kind of failure in a row.
fn warn_once(said: &mut Option<std::io::ErrorKind>, e: &std::io::Error, what: &str) {
    if *said != Some(e.kind()) {
        warn!(error = %e, "IMDS guard: {what}");
        *said = Some(e.kind());
    }
}

fn parse(bytes: &[u8]) -> Option<ImdsEvent> {
    (bytes.len() >= std::mem::size_of::<ImdsEvent>()).then(|| {
        // SAFETY: the length is checked; ImdsEvent is plain integers.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ImdsEvent>()) }
    })
}

/// `IMDS_LOST` summed over CPUs; `None` if it could not be read.
fn sum(lost: &PerCpuArray<MapData, u64>) -> Option<u64> {
    lost.get(&0, 0).ok().map(|per_cpu| per_cpu.iter().sum())
}

impl Reader {
    /// A turn starts where the previous reader stopped, or (none left its
    /// counts: the first reader, or it died) from the counts as they are.
    fn begin(&mut self, baseline: Option<Baseline>) {
        match baseline {
            Some(baseline) => {
                self.reported = baseline.reported.into_iter().collect();
                self.lost_reported = baseline.lost;
            }
            None => {
                self.reported = self
                    .flood
                    .iter()
                    .filter_map(Result::ok)
                    .map(|(scope, flood)| (scope, flood.suppressed))
                    .collect();
                self.lost_reported = sum(&self.kernel_lost).unwrap_or(0);
            }
        }
    }

    fn baseline(&self) -> Baseline {
        Baseline {
            lost: self.lost_reported,
            reported: self.reported.iter().map(|(&s, &c)| (s, c)).collect(),
        }
    }

    /// Reads until `accepting` pauses (`Ok(true)`), stops or closes
    /// (`Ok(false)`), on a reader of its own: the ring's consumer position
    /// is taken afresh from the kernel, where the previous reader left it.
    async fn read_turn(
        &mut self,
        ring: &MapData,
        accepting: &mut watch::Receiver<Accepting>,
    ) -> std::io::Result<bool> {
        let fd = ring.fd().as_fd().try_clone_to_owned()?;
        let ring = MapData::from_fd(fd)
            .and_then(Map::from_map_data)
            .and_then(RingBuf::try_from)
            .map_err(std::io::Error::other)?;
        // SAFETY: the ring owns its map's descriptor, open and unchanged
        // for as long as the AsyncFd holds it.
        let mut ring = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
        let mut tick = tokio::time::interval(self.settle_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            match *accepting.borrow_and_update() {
                Accepting::Yes => {}
                Accepting::Paused => return Ok(true),
                Accepting::Stop => return Ok(false),
            }
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let mut read = 0;
                    while read < MAX_PER_WAKE {
                        let Some(item) = guard.get_inner_mut().next() else {
                            guard.clear_ready();
                            break;
                        };
                        if let Some(event) = parse(&item) {
                            self.event(&event);
                        }
                        read += 1;
                    }
                    if read == MAX_PER_WAKE {
                        tokio::task::yield_now().await;
                    }
                }
                _ = tick.tick() => self.settle(),
                changed = accepting.changed() => {
                    if changed.is_err() {
                        return Ok(false);
                    }
                }
            }
        }
    }

    fn event(&mut self, event: &ImdsEvent) {
        let decision = decision_label(event.verdict.decision);
        let record = self.describe(event);
        let label = self.namespace_label(
            event.verdict.reason == IMDS_REASON_NODE,
            record.namespace.as_deref(),
        );
        self.cx.metrics.imds_connects(&label, decision, 1);
        self.last_seen.insert(event.scope_id, record.clone());
        if self.cx.interval.is_zero() {
            self.cx.auditor.emit_imds(&record);
            return;
        }
        match self.pending.get_mut(&(event.scope_id, decision)) {
            Some(pending) => {
                pending.more += 1;
                merge(&mut pending.template, &record);
            }
            None => {
                self.cx.auditor.emit_imds(&record);
                self.pending.insert(
                    (event.scope_id, decision),
                    Pending {
                        template: record,
                        more: 0,
                    },
                );
            }
        }
    }

    /// Everything the agent knows of the connect.
    fn describe(&self, event: &ImdsEvent) -> ImdsAuditEvent {
        let (pod, container) = match event.verdict.reason {
            IMDS_REASON_NODE => (None, None),
            _ => {
                let placed = self
                    .cx
                    .resolver
                    .path_of(event.cgroup_id)
                    .ok()
                    .flatten()
                    .and_then(|path| self.cx.layout.pod_of_path(&path).ok().flatten());
                let pod = (event.verdict.reason != IMDS_REASON_UNCLASSIFIED)
                    .then(|| self.cx.pods.get(event.scope_id))
                    .flatten();
                (pod, placed)
            }
        };
        ImdsAuditEvent {
            time: Millis(SystemTime::now()),
            event: "imds-connect",
            decision: decision_label(event.verdict.decision),
            reason: reason_label(event.verdict.reason),
            mode: self.cx.mode,
            pod_uid: pod
                .as_ref()
                .map(|p| p.uid.clone())
                .or_else(|| container.as_ref().map(|c| c.pod_uid.to_string())),
            namespace: pod.as_ref().map(|p| p.namespace.clone()),
            pod_name: pod.as_ref().map(|p| p.name.clone()),
            container_id: container.and_then(|c| c.container_id.as_deref().map(str::to_owned)),
            pid: (event.pid_tgid >> 32) as u32,
            process: String::from_utf8_lossy(agent_ebpf::comm_str(&event.comm)).into_owned(),
            cgroup_id: event.cgroup_id,
            host_network: self.host_netns == Some(event.netns_cookie),
            destination: SocketAddr::new(ip(&event.dst_addr), event.dst_port as u16).to_string(),
            count: 1,
            aggregated: false,
        }
    }

    /// `--imds-audit-interval`, or each second when it is 0 (every
    /// published connect its own event; the kernel's counts still need
    /// reporting).
    fn settle_every(&self) -> Duration {
        if self.cx.interval.is_zero() {
            Duration::from_secs(1)
        } else {
            self.cx.interval
        }
    }

    /// The connects metric's namespace label: bounded.
    fn namespace_label(&mut self, node: bool, namespace: Option<&str>) -> String {
        match (node, namespace) {
            (true, _) => "_node".into(),
            (false, None) => "_unclassified".into(),
            (false, Some(ns)) => {
                if self.namespaces.contains(ns) || self.namespaces.len() < MAX_NAMESPACE_LABELS {
                    self.namespaces.insert(ns.to_owned());
                    ns.to_owned()
                } else {
                    "_other".into()
                }
            }
        }
    }

    /// The interval ends: the kernel's counted connects join their scope's
    /// summary, every summary is emitted, losses are reported, and scopes
    /// whose cgroup is gone are forgotten.
    fn settle(&mut self) {
        let counts: Vec<(u64, ImdsFlood)> = self.flood.iter().filter_map(Result::ok).collect();
        let mut live = HashSet::new();
        for (scope, flood) in counts {
            let before = self
                .reported
                .insert(scope, flood.suppressed)
                .unwrap_or_default();
            for (slot, decision) in ["allow", "deny", "audit-only"].into_iter().enumerate() {
                let more = flood.suppressed[slot].saturating_sub(before[slot]);
                if more > 0 {
                    self.counted(scope, decision, more);
                }
            }
            // A cgroup scope whose cgroup is gone connects no more: its
            // counts are all reported, its entry goes. Only a scope that
            // counted nothing new is asked (one syscall); a user's scope
            // stays (users are few and come back).
            let quiet = flood.suppressed == before;
            let gone = quiet
                && scope & QUOTA_KEY_UID == 0
                && matches!(self.cx.resolver.exists(scope), Ok(false));
            if gone {
                let _ = self.flood.remove(&scope);
                self.reported.remove(&scope);
            } else {
                live.insert(scope);
            }
        }
        // Who a scope is matters only while the kernel counts for it.
        self.last_seen.retain(|scope, _| live.contains(scope));
        for (_, pending) in self.pending.drain() {
            if pending.more > 0 {
                let mut summary = pending.template;
                summary.time = Millis(SystemTime::now());
                summary.count = pending.more;
                summary.aggregated = true;
                self.cx.auditor.emit_imds(&summary);
            }
        }
        // Unreadable this time: next time (never a reset to 0, which
        // would report everything again).
        let Some(lost) = sum(&self.kernel_lost) else {
            return;
        };
        if lost > self.lost_reported {
            let more = lost - self.lost_reported;
            self.cx.metrics.imds_events_lost(more);
            warn!(
                lost = more,
                "IMDS guard: the kernel's event ring was full; connects went unrecorded (counted in pod_identity_imds_events_lost_total)"
            );
        }
        self.lost_reported = lost;
    }

    /// `more` connects of `scope` the kernel counted without an event.
    fn counted(&mut self, scope: u64, decision: &'static str, more: u64) {
        let template = self.last_seen.get(&scope).cloned().unwrap_or_else(|| {
            // Not seen by this agent (counted before it started reading):
            // a classified pod is still known by its cgroup.
            let pod = self.cx.pods.get(scope);
            ImdsAuditEvent {
                event: "imds-connect",
                decision,
                reason: if pod.is_some() {
                    "classified"
                } else {
                    "unknown"
                },
                mode: self.cx.mode,
                pod_uid: pod.as_ref().map(|p| p.uid.clone()),
                namespace: pod.as_ref().map(|p| p.namespace.clone()),
                pod_name: pod.as_ref().map(|p| p.name.clone()),
                cgroup_id: scope,
                ..ImdsAuditEvent::default()
            }
        });
        let node = template.reason == reason_label(IMDS_REASON_NODE);
        let label = self.namespace_label(node, template.namespace.as_deref());
        self.cx.metrics.imds_connects(&label, decision, more);
        match self.pending.get_mut(&(scope, decision)) {
            Some(pending) => {
                pending.more += more;
                merge(&mut pending.template, &template);
            }
            None => {
                self.pending.insert(
                    (scope, decision),
                    Pending {
                        template: ImdsAuditEvent {
                            decision,
                            ..template
                        },
                        more,
                    },
                );
            }
        }
    }
}

/// Folds `record` into a summary's `template`: what differs between the
/// connects it sums up (another container of the pod, another process)
/// is left out rather than naming one of them for all.
fn merge(template: &mut ImdsAuditEvent, record: &ImdsAuditEvent) {
    if template.container_id != record.container_id || template.cgroup_id != record.cgroup_id {
        template.container_id = None;
        template.cgroup_id = 0;
    }
    if template.pid != record.pid || template.process != record.process {
        template.pid = 0;
        template.process = String::new();
    }
    template.host_network |= record.host_network;
    if template.destination != record.destination {
        template.destination = String::new();
    }
}

fn ip(raw: &RawAddr) -> IpAddr {
    if is_v4_mapped(raw) {
        return IpAddr::V4(Ipv4Addr::from(raw[3].to_ne_bytes()));
    }
    let mut octets = [0u8; 16];
    for (i, word) in raw.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    IpAddr::V6(Ipv6Addr::from(octets))
}

/// This process's network namespace cookie (`SO_NETNS_COOKIE`, Linux
/// 5.14+): the agent runs in the node's, so an event from a socket in the
/// same namespace is a hostNetwork caller's. `None` where unsupported.
fn own_netns_cookie() -> Option<u64> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: a plain socket(2); the fd is owned (and closed) below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned to us.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    crate::sockopt::get_u64(&socket, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_read_back_from_the_kernel_form() {
        for text in ["169.254.169.254", "fd00:ec2::254"] {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(ip(&agent_ebpf::raw_ip(addr)), addr);
        }
    }
}
