//! Kernel programs that attribute every TCP connection to the agent's
//! endpoints to the process (cgroup id, pid) that opened it, in a way no
//! other process can forge, overwrite or erase.
//!
//! * `cgroup/connect4|6` runs in the caller's process context at `connect()`,
//!   so it knows the cgroup and pid — but the source port is not bound yet.
//!   It stores the owner in socket-local storage (freed with the socket).
//! * `sock_ops` at `TCP_CONNECT_CB` runs once the 4-tuple is final: it
//!   publishes `{owner, 4-tuple}` in `CONNECTIONS` under a fresh random id
//!   (insert-if-absent, never overwrite) and asks to write a TCP option into
//!   the SYN: the id and a MAC over (id, 4-tuple) under the key the agent
//!   set at load time. The agent reads the SYN it accepted
//!   (`TCP_SAVED_SYN`), checks the MAC and the 4-tuple, and looks the
//!   record up by id. A process elsewhere (say, in its own user+network
//!   namespace holding a pod's source address) can make records of its own,
//!   but never touch another's: ids are random, the key is per socket.
//! * When the socket reaches `TCP_CLOSE`, exactly its own record is deleted
//!   (the agent also deletes a record once it has read it: a stamp is good
//!   for the one connection it was made for, once).
//! * Each owner (a root process's cgroup, or a non-root user) may have at
//!   most `MAX_RECORDS_PER_OWNER` live attributed sockets, so nobody can
//!   fill the table for everyone else.
//!
//! * The same `connect4|6` also recognise connects to the instance
//!   metadata service (IMDS guard): they take the caller's verdict from
//!   `IMDS_VERDICTS` (the deepest entry among its cgroup's ancestors: a
//!   pod's, or a pod root's for pods not classified yet; none for node
//!   processes), publish an `ImdsEvent` to the `IMDS_EVENTS` ring (at most
//!   `IMDS_BURST` per scope and window, the rest counted in `IMDS_FLOOD`;
//!   a full ring counted in `IMDS_LOST`), and fail a denied connect with
//!   EPERM.
//!
//! Both programs run for every connect()/TCP event on the node, so each
//! rejects foreign traffic with a couple of context loads and compares before
//! touching any helper or map.
#![no_std]
#![no_main]
// The bpf target offers no atomic read-modify-write through `core::sync`,
// though every BPF ISA has an atomic add (`lock xadd`).
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use agent_ebpf::{
    Config, ConnKey, ConnOwner, ConnRecord, IMDS_AUDIT_ONLY, IMDS_BURST, IMDS_DENY, IMDS_MAX_DEPTH,
    IMDS_REASON_UNCLASSIFIED, IMDS_WINDOW_NS, ImdsEvent, ImdsFlood, ImdsVerdict,
    MAX_RECORDS_PER_OWNER, MAX_SERVED_ADDRS, QUOTA_KEY_UID, RawAddr, STAMP_OPTION_LEN, SocketOwner,
    Stamp, is_v4_mapped, mapped_v4, stamp_mac,
};
use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE, bpf_sock,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SkStorage},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns,
        bpf_reserve_hdr_opt, bpf_sk_storage_get, bpf_store_hdr_opt,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// cgroup/connect* verdict: let the syscall proceed. Attribution only
/// observes.
const ALLOW: i32 = 1;
/// cgroup/connect* verdict: fail the syscall with EPERM (IMDS guard only).
const REFUSE: i32 = 0;
const TCP_FLAG_SYN: u32 = 0x02;
const TCP_FLAG_ACK: u32 = 0x10;
/// 127.0.0.1 as `user_ip4` presents it.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 in `RawAddr` form.
const LOOPBACK_V6: RawAddr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// What "ours" means; overridden by the agent at load time.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

#[btf_map]
static SOCKET_OWNERS: SkStorage<SocketOwner> = SkStorage::new();

#[btf_map]
static CONNECTIONS: HashMap<
    u64,
    ConnRecord,
    { agent_ebpf::CONNECTIONS_CAPACITY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Set by the agent: see `agent_ebpf::ACTIVE_MAP`.
#[btf_map]
static ACTIVE: Array<u32, 1> = Array::new();

/// Written by the agent before the programs are attached; all zero (a
/// known key, so stamps any agent would refuse) only if it was not.
#[btf_map]
static STAMP_KEY: Array<agent_ebpf::StampKey, 1> = Array::new();

#[btf_map]
static OWNER_QUOTA: LruHashMap<u64, u64, { agent_ebpf::OWNER_QUOTA_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
static IMDS_VERDICTS: HashMap<
    u64,
    ImdsVerdict,
    { agent_ebpf::IMDS_VERDICTS_CAPACITY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

#[btf_map]
static IMDS_EVENTS: RingBuf<ImdsEvent, { agent_ebpf::IMDS_EVENTS_BYTES as usize }> = RingBuf::new();

#[btf_map]
static IMDS_LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

#[btf_map]
static IMDS_FLOOD: HashMap<
    u64,
    ImdsFlood,
    { agent_ebpf::IMDS_FLOOD_CAPACITY as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Reads one field of [`CONFIG`]. Volatile, field by field: the compiler
/// would otherwise fold the `EMPTY` initialiser into the code (the loader
/// rewrites `.rodata` after compilation), and the hot path needs only `port`.
macro_rules! config {
    ($($field:tt)+) => {
        // SAFETY: an aligned read of a field of a static.
        unsafe { core::ptr::read_volatile(&CONFIG.$($field)+) }
    };
}

/// Reads a `bpf_sock_ops` field with one load at a constant offset from the
/// ctx pointer. The verifier rejects loads through a ctx pointer that the
/// compiler offset first (which it does when branches share a field read).
macro_rules! ops_field {
    ($ctx:expr, $($field:tt)+) => {
        // SAFETY: the ctx pointer is the kernel's; an aligned field read.
        unsafe { core::ptr::read_volatile(&raw const (*$ctx.ops).$($field)+) }
    };
}

/// Which of our endpoints a port may belong to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Served,
    Probe,
}

/// The hot path's first and usually last test.
#[inline(always)]
fn our_port(port: u16) -> Option<Port> {
    let port = u32::from(port);
    if port == config!(port) {
        Some(Port::Served)
    } else if port != 0 && port == config!(probe_port) {
        Some(Port::Probe)
    } else {
        None
    }
}

#[inline(always)]
fn served_v4(addr: u32) -> bool {
    let count = config!(v4_count) as usize;
    let mut i = 0;
    while i < MAX_SERVED_ADDRS {
        if i < count && config!(v4[i]) == addr {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
fn served_v6(addr: &RawAddr) -> bool {
    if is_v4_mapped(addr) {
        return served_v4(addr[3]);
    }
    let count = config!(v6_count) as usize;
    let mut i = 0;
    while i < MAX_SERVED_ADDRS {
        if i < count && config!(v6[i]) == *addr {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether `addr` (canonical form) on `port` is one of our endpoints.
#[inline(always)]
fn ours(port: Port, addr: &RawAddr) -> bool {
    match port {
        Port::Served => served_v6(addr),
        Port::Probe => *addr == LOOPBACK_V6 || (is_v4_mapped(addr) && addr[3] == LOOPBACK_V4),
    }
}

/// Whether the agent that loaded these programs serves (see `ACTIVE`).
#[inline(always)]
fn active() -> bool {
    ACTIVE.get(0).is_some_and(|active| *active != 0)
}

/// Records the caller in the socket's storage. Only called for our
/// destination, so the helper calls are off the hot path. Not while another
/// build of the programs serves (see `ACTIVE`).
#[inline(always)]
fn remember_owner(ctx: &SockAddrContext) {
    if !active() {
        return;
    }
    // SAFETY: plain helpers, valid in sock_addr programs.
    let (cgroup_id, pid_tgid, uid) = unsafe {
        (
            bpf_get_current_cgroup_id(),
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid() as u32,
        )
    };
    let owner = SocketOwner {
        record: ConnRecord {
            owner: ConnOwner {
                cgroup_id,
                pid_tgid,
                // Best effort: an empty name if the helper fails.
                comm: aya_ebpf::helpers::bpf_get_current_comm().unwrap_or_default(),
            },
            ..ConnRecord::default()
        },
        quota_key: quota_key(cgroup_id, uid),
        ..SocketOwner::default()
    };
    // SAFETY: the map definition is the static above; the pointer is
    // checked for null by `as_mut`.
    if let Some(slot) = unsafe { SOCKET_OWNERS.get_or_insert_ptr_mut(ctx, None).as_mut() } {
        // A socket that retries connect() after a failure carries the owner
        // of the latest attempt. A record it published stays its own (and is
        // deleted at close); the new attempt publishes afresh.
        unpublish(slot);
        *slot = owner;
    }
}

/// Whether `port` is the IMDS's (first compare fails for nearly all).
#[inline(always)]
fn imds_port(port: u16) -> bool {
    u32::from(port) == config!(imds_port)
}

#[inline(always)]
fn imds_v4(addr: u32) -> bool {
    addr == config!(imds_v4) && config!(imds_v4_set) != 0
}

#[inline(always)]
fn imds_v6(addr: &RawAddr) -> bool {
    if is_v4_mapped(addr) {
        return imds_v4(addr[3]);
    }
    *addr == config!(imds_v6) && config!(imds_v6_set) != 0
}

/// A connect to the IMDS: its verdict, its event, its outcome. Not while
/// another build of the programs serves (its own programs decide).
#[inline(always)]
fn imds(ctx: &SockAddrContext, dst: RawAddr, port: u16) -> i32 {
    if !active() {
        return ALLOW;
    }
    // SAFETY: plain helper.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let (verdict, scope_id) = imds_verdict(cgroup_id);
    if may_publish(scope_id, verdict.decision) {
        publish(ctx, cgroup_id, scope_id, verdict, dst, port);
    }
    if verdict.decision == IMDS_DENY {
        REFUSE
    } else {
        ALLOW
    }
}

/// The deepest verdict among the caller's cgroup and its ancestors, and
/// the scope it applies to: a classified pod's cgroup; else the caller's
/// cgroup — or, for a node process that is not root's, its user (as in
/// `quota_key`: a user's delegated subtree holds as many cgroups as it
/// likes, so they share one scope).
#[inline(always)]
fn imds_verdict(cgroup_id: u64) -> (ImdsVerdict, u64) {
    let mut verdict = ImdsVerdict::default();
    // 0: no entry on the way (a node process).
    let mut scope_id = 0;
    let mut level = 0;
    while level < IMDS_MAX_DEPTH {
        // SAFETY: plain helper; 0 past the caller's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: a copy out of the map value, read at once.
        if let Some(found) = unsafe { IMDS_VERDICTS.get(id) } {
            verdict = *found;
            // Below a pod root: never a user's scope.
            scope_id = if found.reason == IMDS_REASON_UNCLASSIFIED {
                cgroup_id
            } else {
                id
            };
        }
        level += 1;
    }
    if scope_id == 0 {
        // SAFETY: plain helper.
        let uid = unsafe { bpf_get_current_uid_gid() } as u32;
        scope_id = quota_key(cgroup_id, uid);
    }
    (verdict, scope_id)
}

/// Whose quota (and IMDS flood scope) a caller counts against: a root
/// process's cgroup; a user's processes all together (a user's delegated
/// subtree holds as many cgroups as it likes).
#[inline(always)]
fn quota_key(cgroup_id: u64, uid: u32) -> u64 {
    if uid == 0 {
        cgroup_id
    } else {
        QUOTA_KEY_UID | u64::from(uid)
    }
}

/// Whether `scope` may publish one more event in its window; if not, the
/// connect is counted under its decision instead. Concurrent callers may
/// overshoot the burst by a few; the counts stay exact (atomic adds).
#[inline(always)]
fn may_publish(scope: u64, decision: u32) -> bool {
    // SAFETY: plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    let flood = match IMDS_FLOOD.get_ptr_mut(scope) {
        Some(flood) => flood,
        None => {
            let fresh = ImdsFlood {
                window_start_ns: now,
                ..ImdsFlood::default()
            };
            let _ = IMDS_FLOOD.insert(scope, fresh, BPF_NOEXIST.into());
            match IMDS_FLOOD.get_ptr_mut(scope) {
                Some(flood) => flood,
                // Full: publish; the ring bounds it and counts its losses.
                None => return true,
            }
        }
    };
    let slot = if decision == IMDS_DENY {
        1
    } else if decision == IMDS_AUDIT_ONLY {
        2
    } else {
        0
    };
    // SAFETY: a live map value, 8-byte aligned fields.
    unsafe {
        let start = &raw mut (*flood).window_start_ns;
        let published = &raw mut (*flood).in_window;
        if now.wrapping_sub(core::ptr::read_volatile(start)) >= IMDS_WINDOW_NS {
            core::ptr::write_volatile(start, now);
            core::ptr::write_volatile(published, 0);
        }
        if core::ptr::read_volatile(published) < IMDS_BURST {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(published, 1);
            true
        } else {
            let suppressed = &raw mut (*flood).suppressed[slot];
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(suppressed, 1);
            false
        }
    }
}

#[inline(always)]
fn publish(
    ctx: &SockAddrContext,
    cgroup_id: u64,
    scope_id: u64,
    verdict: ImdsVerdict,
    dst: RawAddr,
    port: u16,
) {
    let Some(mut entry) = IMDS_EVENTS.reserve(0) else {
        if let Some(lost) = IMDS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a live map value; atomic, as the
            // program may be preempted on this CPU by another run of it.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(lost, 1) };
        }
        return;
    };
    // SAFETY: plain helpers; the ctx is the kernel's.
    let (pid_tgid, netns_cookie) = unsafe {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_netns_cookie(ctx.sock_addr.cast()),
        )
    };
    entry.write(ImdsEvent {
        cgroup_id,
        scope_id,
        pid_tgid,
        netns_cookie,
        comm: aya_ebpf::helpers::bpf_get_current_comm().unwrap_or_default(),
        dst_addr: dst,
        dst_port: u32::from(port),
        verdict,
        _pad: 0,
    });
    entry.submit(0);
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx is the kernel's bpf_sock_addr; full-width field reads.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if imds_port(port) && imds_v4(sa.user_ip4) && sa.type_ == SOCK_STREAM {
        return imds(&ctx, mapped_v4(sa.user_ip4), port);
    }
    let Some(port) = our_port(port) else {
        return ALLOW;
    };
    if !ours(port, &mapped_v4(sa.user_ip4)) || sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP
    {
        return ALLOW;
    }
    remember_owner(&ctx);
    ALLOW
}

/// The IPv6 destination, read only once its port is one we look at.
#[inline(always)]
fn user_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> RawAddr {
    [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ]
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if imds_port(port) && sa.type_ == SOCK_STREAM {
        let dst = user_ip6(sa);
        if imds_v6(&dst) {
            return imds(&ctx, dst, port);
        }
    }
    let Some(port) = our_port(port) else {
        return ALLOW;
    };
    let dst = user_ip6(sa);
    if !ours(port, &dst) || sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    remember_owner(&ctx);
    ALLOW
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ops_field!(ctx, op);
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
    } else if op == BPF_SOCK_OPS_HDR_OPT_LEN_CB {
        on_option_space(&ctx);
    } else if op == BPF_SOCK_OPS_WRITE_HDR_OPT_CB {
        on_write_option(&ctx);
    } else if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        on_established(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB {
        on_state_change(&ctx);
    }
    1
}

/// `(remote, local)` in canonical key form; IPv4 and IPv4-mapped sockets both
/// come out as IPv4-mapped, read from the IPv4 fields (for a mapped socket the
/// IPv6 source is not filled in yet at connect time).
#[inline(always)]
fn endpoints(ctx: &SockOpsContext) -> Option<(RawAddr, RawAddr)> {
    let family = ops_field!(ctx, family);
    if family == AF_INET6 {
        // Whole-array volatile reads compile to four 4-byte loads at fixed
        // ctx offsets (what the verifier requires); reading word by word
        // lets the compiler share one offset ctx pointer, which it rejects.
        let remote = ops_field!(ctx, remote_ip6);
        if !is_v4_mapped(&remote) {
            return Some((remote, ops_field!(ctx, local_ip6)));
        }
    } else if family != AF_INET {
        return None;
    }
    Some((
        mapped_v4(ops_field!(ctx, remote_ip4)),
        mapped_v4(ops_field!(ctx, local_ip4)),
    ))
}

/// This socket's storage, if `connect4|6` attributed it. Lookup only, never
/// create: a socket without storage is not ours.
#[inline(always)]
fn socket_owner<'a>(ctx: &SockOpsContext) -> Option<&'a mut SocketOwner> {
    // SAFETY: reading the ctx's `sk` field (may be null, checked here).
    let sk: *mut bpf_sock = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: sk is a non-null socket from the ctx; flags 0 = lookup only.
    // The storage lives as long as the socket, beyond this program run.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&SOCKET_OWNERS).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
        .cast::<SocketOwner>()
        .as_mut()
    }
}

#[inline(always)]
fn random_id() -> u64 {
    // SAFETY: plain helper.
    let (hi, lo) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // remote_port: big-endian 16 bits in the upper half of the u32.
    let remote_port = u16::from_be((ops_field!(ctx, remote_port) >> 16) as u16);
    let Some(port) = our_port(remote_port) else {
        return;
    };
    let Some((remote, local)) = endpoints(ctx) else {
        return;
    };
    if !ours(port, &remote) {
        return;
    }
    let Some(state) = socket_owner(ctx) else {
        return;
    };
    if state.published != 0 {
        return;
    }
    let Some(mac_key) = STAMP_KEY.get(0) else {
        return;
    };
    state.record.key = ConnKey {
        peer_addr: local,
        local_addr: remote,
        peer_port: ops_field!(ctx, local_port) as u16,
        local_port: remote_port,
    };
    if !take_quota(state.quota_key) {
        return;
    }
    // Never overwrite: an id already taken (by chance) leaves this
    // connection unattributed rather than touching another's record.
    let id = random_id();
    if CONNECTIONS
        .insert(id, state.record, BPF_NOEXIST.into())
        .is_err()
    {
        release_quota(state.quota_key);
        return;
    }
    state.stamp = Stamp {
        id,
        mac: stamp_mac(mac_key, id, &state.record.key),
    };
    state.published = 1;
    let flags = ops_field!(ctx, bpf_sock_ops_cb_flags)
        | BPF_SOCK_OPS_STATE_CB_FLAG
        | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// Counts one more live socket for `key`; false when it has its quota (or
/// no quota entry can be made). Concurrent takers may overshoot the bound by
/// a few; it stays a bound.
///
/// Entries are never deleted here (a delete racing a taker on another CPU
/// would lose counts); the table is LRU, so owners long gone age out. A
/// count far above any bound can only be an underflow (a release whose
/// entry had aged out and come back at zero): it is reset, never left to
/// lock its owner out.
#[inline(always)]
fn take_quota(key: u64) -> bool {
    // Looked up first: an insert into a full LRU table takes a free node —
    // evicting another owner's count — before it finds the key exists.
    let count = match OWNER_QUOTA.get_ptr_mut(key) {
        Some(count) => count,
        None => {
            let _ = OWNER_QUOTA.insert(key, 0u64, BPF_NOEXIST.into());
            let Some(count) = OWNER_QUOTA.get_ptr_mut(key) else {
                return false;
            };
            count
        }
    };
    // SAFETY: a live map value, u64-aligned; updated only atomically.
    unsafe {
        // An aligned 8-byte load is atomic on BPF (and `generic` has no
        // atomic-load instruction to select).
        let held = core::ptr::read_volatile(count);
        if held > 2 * u64::from(MAX_RECORDS_PER_OWNER) {
            core::ptr::write_volatile(count, 0);
        } else if held >= u64::from(MAX_RECORDS_PER_OWNER) {
            return false;
        }
        // Result unused: a plain atomic add, which every BPF ISA has.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1);
    }
    true
}

/// Gives back one of `key`'s quota.
#[inline(always)]
fn release_quota(key: u64) {
    if let Some(count) = OWNER_QUOTA.get_ptr_mut(key) {
        // SAFETY: as in take_quota.
        unsafe {
            if core::ptr::read_volatile(count) > 0 {
                // Adding 2^64 - 1 subtracts one, with the one atomic op we have.
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, u64::MAX);
            }
        }
    }
}

/// Only a SYN (not a SYN-ACK, not data) carries the stamp.
#[inline(always)]
fn is_syn(ctx: &SockOpsContext) -> bool {
    ops_field!(ctx, skb_tcp_flags) & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// Our published socket, for the option callbacks: other programs may have
/// asked for header-option callbacks on sockets that are not ours.
#[inline(always)]
fn published<'a>(ctx: &SockOpsContext) -> Option<&'a mut SocketOwner> {
    socket_owner(ctx).filter(|state| state.published != 0)
}

#[inline(always)]
fn on_option_space(ctx: &SockOpsContext) {
    if is_syn(ctx) && published(ctx).is_some() {
        // SAFETY: the ctx is the kernel's sock_ops in HDR_OPT_LEN_CB.
        unsafe { bpf_reserve_hdr_opt(ctx.ops, STAMP_OPTION_LEN as u32, 0) };
    }
}

#[inline(always)]
fn on_write_option(ctx: &SockOpsContext) {
    if !is_syn(ctx) {
        return;
    }
    let Some(state) = published(ctx) else {
        return;
    };
    let option = state.stamp.to_option();
    // SAFETY: the option lives on this stack for the call; the length is
    // its size. Without room (other options took it) the SYN goes out
    // unstamped and the connection is not attributed: fail closed.
    unsafe { bpf_store_hdr_opt(ctx.ops, option.as_ptr().cast(), STAMP_OPTION_LEN as u32, 0) };
}

/// The handshake is done: no later segment of ours needs the option
/// callbacks (another program's socket keeps what it asked for).
#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let flags = ops_field!(ctx, bpf_sock_ops_cb_flags);
    if flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG != 0 && published(ctx).is_some() {
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    // Sockets of ours, and of any other program that asked for the state
    // callback: the storage tells them apart.
    if ops_field!(ctx, __bindgen_anon_1.args[1]) != BPF_TCP_CLOSE {
        return;
    }
    if let Some(state) = published(ctx) {
        unpublish(state);
    }
}

/// Deletes the record a socket published, if it did, and gives back its
/// quota: only the socket that made a record ever deletes it.
#[inline(always)]
fn unpublish(state: &mut SocketOwner) {
    if state.published != 0 {
        let _ = CONNECTIONS.remove(state.stamp.id);
        release_quota(state.quota_key);
        state.published = 0;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
