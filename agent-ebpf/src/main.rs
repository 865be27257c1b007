//! Kernel programs that attribute every TCP connection to the agent's served
//! addresses to the process (cgroup id, pid) that opened it.
//!
//! Two hops, because no single hook sees both facts:
//! * `cgroup/connect4|6` runs in the caller's process context at `connect()`,
//!   so it knows the cgroup and pid — but the source port is not bound yet.
//!   It stores the owner in socket-local storage (freed with the socket).
//! * `sock_ops` at `TCP_CONNECT_CB` runs once the 4-tuple is final; it copies
//!   the owner into `CONNECTIONS` under the key the server will compute from
//!   `accept()`, and asks for the state callback so that, when the socket
//!   reaches `TCP_CLOSE`, exactly that entry is deleted.
//!
//! Both programs run for every connect()/TCP event on the node, so each
//! rejects foreign traffic with a couple of context loads and compares before
//! touching any helper or map.
#![no_std]
#![no_main]

use agent_ebpf::{
    Config, ConnKey, ConnOwner, MAX_SERVED_ADDRS, RawAddr, SocketOwner, is_v4_mapped, mapped_v4,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, bpf_sock,
    },
    btf_maps::{LruHashMap, SkStorage},
    helpers::generated::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_sk_storage_get},
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
/// cgroup/connect* verdict: let the syscall proceed. We only observe.
const ALLOW: i32 = 1;

/// What "ours" means; overridden by the agent at load time.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

#[btf_map]
static SOCKET_OWNERS: SkStorage<SocketOwner> = SkStorage::new();

#[btf_map]
static CONNECTIONS: LruHashMap<ConnKey, ConnOwner, { agent_ebpf::CONNECTIONS_CAPACITY as usize }> =
    LruHashMap::new();

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

#[inline(always)]
fn served_port(port: u16) -> bool {
    u32::from(port) == config!(port)
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

/// Records the caller in the socket's storage. Only called for our
/// destination, so the helper calls are off the hot path.
#[inline(always)]
fn remember_owner(ctx: &SockAddrContext) {
    let owner = SocketOwner {
        owner: ConnOwner {
            // SAFETY: plain helpers, valid in sock_addr programs.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid_tgid: unsafe { bpf_get_current_pid_tgid() },
        },
        ..SocketOwner::default()
    };
    // SAFETY: the map definition is the static above; the pointer is
    // checked for null by `as_mut`.
    if let Some(slot) = unsafe { SOCKET_OWNERS.get_or_insert_ptr_mut(ctx, None).as_mut() } {
        // Overwrite: a socket that retries connect() (after a failure) must
        // carry the owner of the latest attempt.
        *slot = owner;
    }
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: ctx is the kernel's bpf_sock_addr; full-width field reads.
    let sa = unsafe { &*ctx.sock_addr };
    if !served_port(u16::from_be(sa.user_port as u16)) {
        return ALLOW;
    }
    if !served_v4(sa.user_ip4) || sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    remember_owner(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    if !served_port(u16::from_be(sa.user_port as u16)) {
        return ALLOW;
    }
    let dst = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    if !served_v6(&dst) || sa.type_ != SOCK_STREAM {
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
fn on_connect(ctx: &SockOpsContext) {
    // remote_port: big-endian 16 bits in the upper half of the u32.
    let remote_port = u16::from_be((ops_field!(ctx, remote_port) >> 16) as u16);
    if !served_port(remote_port) {
        return;
    }
    let Some((remote, local)) = endpoints(ctx) else {
        return;
    };
    if !served_v6(&remote) {
        return;
    }
    let Some(state) = socket_owner(ctx) else {
        return;
    };
    let key = ConnKey {
        peer_addr: local,
        local_addr: remote,
        peer_port: ops_field!(ctx, local_port) as u16,
        local_port: remote_port,
    };
    if CONNECTIONS.insert(&key, &state.owner, 0).is_ok() {
        state.key = key;
        state.published = 1;
        let _ = ctx.set_cb_flags(
            (ops_field!(ctx, bpf_sock_ops_cb_flags) | BPF_SOCK_OPS_STATE_CB_FLAG) as i32,
        );
    }
}

#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    // Only sockets we asked the callback for get here.
    if ops_field!(ctx, __bindgen_anon_1.args[1]) != BPF_TCP_CLOSE {
        return;
    }
    if let Some(state) = socket_owner(ctx)
        && state.published != 0
    {
        let _ = CONNECTIONS.remove(&state.key);
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
