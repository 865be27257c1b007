//! The kernel↔user ABI of the attribution programs.
//!
//! Both halves compile these exact `#[repr(C)]` types: the kernel programs in
//! `main.rs` (for the bpf target) and the agent (with the `user` feature, which
//! makes them `aya::Pod`). Nothing here depends on anything but `core`, so a
//! layout change is a compile-time change on both sides at once.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// How many addresses per family the programs compare against. The served set
/// is tiny (the reference agent serves one per family); a fixed bound keeps
/// the kernel loop unrollable and the early exit cheap.
pub const MAX_SERVED_ADDRS: usize = 4;

/// Name of the `.rodata` global the agent overrides at load time.
pub const CONFIG_SYMBOL: &str = "CONFIG";
/// Map: socket-local storage carrying the connecting caller (freed with the socket).
pub const SOCKET_OWNERS_MAP: &str = "SOCKET_OWNERS";
/// Map: connection id (carried in the SYN's stamp) → who opened the connection.
pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
/// Array map (one [`StampKey`] at index 0) holding the stamp's MAC key. A
/// map rather than a load-time constant so that an agent that restarts and
/// adopts programs already attached can read the key they stamp with.
pub const STAMP_KEY_MAP: &str = "STAMP_KEY";
/// SipHash-2-4 key for the stamp's MAC; random per load of the programs.
pub type StampKey = [u64; 2];
/// Array map (one `u32` at index 0): non-zero while the agent that loaded
/// these programs serves. Zero makes `connect4`/`connect6` leave new
/// connections to another build of the programs (the successor's), so one
/// stamp per SYN is made by the programs of the agent that accepts it.
pub const ACTIVE_MAP: &str = "ACTIVE";
/// Capacity of [`CONNECTIONS_MAP`]: live connections to the served
/// endpoints, node-wide. Entries are inserted only under a fresh random id
/// (never overwriting) and deleted only by the socket that inserted them,
/// when it closes. A plain hash, not LRU: eviction would let a flood of one
/// caller's connections push out another's record. Allocated on demand.
pub const CONNECTIONS_CAPACITY: u32 = 65_536;

/// Map: owner (see [`SocketOwner::quota_key`]) → live attributed sockets.
pub const OWNER_QUOTA_MAP: &str = "OWNER_QUOTA";
/// Distinct owners tracked at once (pods' containers, node services,
/// users); least recently used ones age out.
pub const OWNER_QUOTA_CAPACITY: u32 = 16_384;
/// Live attributed connections one owner may have. Records of connections
/// the agent never accepts (a process's own namespaces) live as long as
/// their sockets; without a per-owner bound one process could fill
/// [`CONNECTIONS_MAP`] and leave every other caller unattributed.
pub const MAX_RECORDS_PER_OWNER: u32 = 4096;
/// Quota keys of processes that are not root carry this bit with their uid
/// (so an unprivileged user's many cgroups share one quota); root's are the
/// cgroup id (cgroup ids never have the top bit set).
pub const QUOTA_KEY_UID: u64 = 1 << 63;

/// Map: cgroup id → [`ImdsVerdict`], written by the agent only. It holds
/// an entry for each of kubelet's pod roots (what a pod not classified yet
/// gets) and one for each classified pod's cgroup; `connect4|6` walks the
/// caller's ancestors and takes the deepest entry. No entry on the way: a
/// node process.
pub const IMDS_VERDICTS_MAP: &str = "IMDS_VERDICTS";
/// Capacity of [`IMDS_VERDICTS_MAP`]: pods on one node, with room to spare.
pub const IMDS_VERDICTS_CAPACITY: u32 = 16_384;
/// Map: ring buffer of [`ImdsEvent`]s, one per published IMDS connect.
pub const IMDS_EVENTS_MAP: &str = "IMDS_EVENTS";
/// Size of [`IMDS_EVENTS_MAP`] in bytes (a power of two, page multiple):
/// about 740 events waiting for the agent, which reads as they come. Each
/// scope publishes at most [`IMDS_BURST`] a window, so only many scopes at
/// once fill it (counted in [`IMDS_LOST_MAP`]). Small because the reader
/// maps it twice over (the kernel's wrap-around view): resident memory.
pub const IMDS_EVENTS_BYTES: u32 = 64 * 1024;
/// Map: per-CPU count (index 0) of events the ring buffer had no room for.
pub const IMDS_LOST_MAP: &str = "IMDS_LOST";
/// Map: flood scope (a pod's cgroup; else the caller's own, or for a node
/// process that is not root's `QUOTA_KEY_UID | uid`) →
/// [`ImdsFlood`]. Each scope publishes at most [`IMDS_BURST`] events per
/// [`IMDS_WINDOW_NS`]; what it connects beyond that is only counted, by
/// decision, for the agent to report: one pod in a loop can neither fill
/// the ring for everyone nor cost the node more than a counter increment
/// per connect.
pub const IMDS_FLOOD_MAP: &str = "IMDS_FLOOD";
/// Capacity of [`IMDS_FLOOD_MAP`]; a scope that finds it full publishes
/// unthrottled (the ring's bound and its lost count still hold).
pub const IMDS_FLOOD_CAPACITY: u32 = 16_384;
/// Events one scope publishes per window.
pub const IMDS_BURST: u64 = 32;
/// The flood window.
pub const IMDS_WINDOW_NS: u64 = 1_000_000_000;
/// Ancestor levels `connect4|6` walks for a verdict (kubelet's pods sit
/// three to five levels deep).
pub const IMDS_MAX_DEPTH: u32 = 16;

/// [`ImdsVerdict::decision`]: the connect proceeds.
pub const IMDS_ALLOW: u32 = 0;
/// The connect fails with `EPERM`.
pub const IMDS_DENY: u32 = 1;
/// Would be denied; proceeds because the guard only audits.
pub const IMDS_AUDIT_ONLY: u32 = 2;
/// [`ImdsVerdict::reason`]: no pod root above the caller.
pub const IMDS_REASON_NODE: u32 = 0;
/// Below a pod root, in no classified pod (yet).
pub const IMDS_REASON_UNCLASSIFIED: u32 = 1;
/// The pod's namespace is allowed.
pub const IMDS_REASON_NAMESPACE: u32 = 2;
/// The pod's name matches an allowed prefix in its namespace.
pub const IMDS_REASON_POD: u32 = 3;
/// No allow rule matches the pod.
pub const IMDS_REASON_NOT_ALLOWED: u32 = 4;

/// What the agent decided for the cgroups below one [`IMDS_VERDICTS_MAP`]
/// entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ImdsVerdict {
    pub decision: u32,
    pub reason: u32,
}

/// One connect to the IMDS, as `connect4|6` saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImdsEvent {
    /// The caller's cgroup.
    pub cgroup_id: u64,
    /// The flood scope: the classified pod's cgroup, else the caller's own
    /// (`QUOTA_KEY_UID | uid` for a node process that is not root's).
    pub scope_id: u64,
    pub pid_tgid: u64,
    /// The socket's network namespace (`bpf_get_netns_cookie`): the node's
    /// for a hostNetwork pod.
    pub netns_cookie: u64,
    pub comm: [u8; COMM_LEN],
    /// Destination in canonical form ([`RawAddr`]).
    pub dst_addr: RawAddr,
    /// Destination port, host byte order.
    pub dst_port: u32,
    pub verdict: ImdsVerdict,
    pub _pad: u32,
}

/// [`IMDS_FLOOD_MAP`]'s value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImdsFlood {
    pub window_start_ns: u64,
    /// Events published in the current window.
    pub in_window: u64,
    /// Connects not published, ever, by decision (allow, deny, audit-only):
    /// only ever incremented, so the agent reports differences.
    pub suppressed: [u64; 3],
}

/// TCP option kind for experiments with an ExID (RFC 6994).
pub const TCP_OPT_EXPERIMENT: u8 = 253;
/// The 16-bit experiment id that marks the agent's stamp among experiments.
pub const STAMP_EXID: u16 = 0xe4a5;
/// Length of the stamp option: kind, length, ExID, id, MAC.
pub const STAMP_OPTION_LEN: usize = 2 + 2 + 8 + 8;

/// An IPv6 address, or an IPv4 address in its IPv4-mapped IPv6 form, as four
/// 32-bit words in network byte order (the layout of `bpf_sock_addr.user_ip6`
/// and `bpf_sock_ops.remote_ip6`). One key form for both families is what lets
/// a dual-stack client (`::ffff:169.254.170.23`) and a plain IPv4 one be found
/// by the same lookup.
pub type RawAddr = [u32; 4];

/// Which addresses and port the kernel programs treat as "ours".
///
/// Set by userspace at load time (a `.rodata` global), never compiled in.
/// Addresses are kept exactly as the kernel context presents them so the hot
/// path compares without conversions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// IPv4 addresses in network byte order as read from a `__u32` ctx field.
    pub v4: [u32; MAX_SERVED_ADDRS],
    /// IPv6 addresses as [`RawAddr`].
    pub v6: [RawAddr; MAX_SERVED_ADDRS],
    pub v4_count: u32,
    pub v6_count: u32,
    /// Served TCP port, host byte order.
    pub port: u32,
    /// The probe port on the loopback addresses (`127.0.0.1`, `::1`), host
    /// byte order; 0: not attributed. Attributing it lets the agent give
    /// each local caller its own connection budget, so no pod can starve
    /// kubelet's liveness probe.
    pub probe_port: u32,
    /// The instance metadata service's IPv4 address (valid if `imds_v4_set`).
    pub imds_v4: u32,
    /// Its IPv6 address (valid if `imds_v6_set`).
    pub imds_v6: RawAddr,
    /// Its TCP port, host byte order; 0: the IMDS guard is off.
    pub imds_port: u32,
    pub imds_v4_set: u32,
    pub imds_v6_set: u32,
}

impl Config {
    /// A config that matches nothing: what the object carries until the agent
    /// overrides it, so a program loaded without configuration is inert.
    pub const EMPTY: Config = Config {
        v4: [0; MAX_SERVED_ADDRS],
        v6: [[0; 4]; MAX_SERVED_ADDRS],
        v4_count: 0,
        v6_count: 0,
        port: 0,
        probe_port: 0,
        imds_v4: 0,
        imds_v6: [0; 4],
        imds_port: 0,
        imds_v4_set: 0,
        imds_v6_set: 0,
    };

    /// Builds the config for the served socket addresses. All must share one
    /// port (the kernel compares a single one).
    pub fn new(addrs: &[IpAddr], port: u16) -> Result<Config, ConfigError> {
        let mut config = Config::EMPTY;
        config.port = u32::from(port);
        for addr in addrs {
            match addr {
                IpAddr::V4(v4) => {
                    let slot = config.v4_count as usize;
                    if slot >= MAX_SERVED_ADDRS {
                        return Err(ConfigError::TooManyAddresses);
                    }
                    config.v4[slot] = raw_v4(*v4);
                    config.v4_count += 1;
                }
                IpAddr::V6(v6) => {
                    let slot = config.v6_count as usize;
                    if slot >= MAX_SERVED_ADDRS {
                        return Err(ConfigError::TooManyAddresses);
                    }
                    config.v6[slot] = raw_v6(*v6);
                    config.v6_count += 1;
                }
            }
        }
        Ok(config)
    }

    /// Also recognise connects to the instance metadata service at
    /// `addrs` (at most one per family) on `port`.
    pub fn with_imds(mut self, addrs: &[IpAddr], port: u16) -> Result<Config, ConfigError> {
        self.imds_port = u32::from(port);
        for addr in addrs {
            match addr {
                IpAddr::V4(v4) if self.imds_v4_set == 0 => {
                    self.imds_v4 = raw_v4(*v4);
                    self.imds_v4_set = 1;
                }
                IpAddr::V6(v6) if self.imds_v6_set == 0 => {
                    self.imds_v6 = raw_v6(*v6);
                    self.imds_v6_set = 1;
                }
                _ => return Err(ConfigError::TooManyAddresses),
            }
        }
        Ok(self)
    }
}

/// Why a [`Config`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    TooManyAddresses,
}

/// The process that opened a connection, as seen in `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnOwner {
    /// cgroup v2 id (the kernfs inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the upper half, thread id in the lower.
    pub pid_tgid: u64,
    /// `comm` of the connecting thread, NUL-padded: from the kernel, so the
    /// agent needs neither the host's /proc nor its PID namespace, and a
    /// recycled pid cannot mislabel it.
    pub comm: [u8; COMM_LEN],
}

/// Length of a task's `comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

impl ConnOwner {
    /// The process id (tgid) of the connecting process.
    pub fn pid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }

    /// The thread's name, up to its NUL.
    pub fn comm(&self) -> &[u8] {
        comm_str(&self.comm)
    }
}

/// A kernel `comm` (NUL-padded thread name) up to its NUL.
pub fn comm_str(comm: &[u8; COMM_LEN]) -> &[u8] {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    &comm[..end]
}

/// A TCP connection as the *server* sees it after `accept()`: the peer is the
/// client, the local end is the served address. Ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub peer_addr: RawAddr,
    pub local_addr: RawAddr,
    pub peer_port: u16,
    pub local_port: u16,
}

impl ConnKey {
    /// The key for an accepted connection. IPv4 and IPv4-mapped IPv6 socket
    /// addresses give the same key.
    pub fn from_sockets(peer: SocketAddr, local: SocketAddr) -> ConnKey {
        ConnKey {
            peer_addr: raw_ip(peer.ip()),
            local_addr: raw_ip(local.ip()),
            peer_port: peer.port(),
            local_port: local.port(),
        }
    }
}

/// What [`CONNECTIONS_MAP`] holds for one connection id: who opened it, and
/// the 4-tuple it was opened with (the agent serves a stamp only on exactly
/// that connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    pub owner: ConnOwner,
    pub key: ConnKey,
    pub _pad: u32,
    /// Only in the `abi-variant` test build: another layout of the maps.
    #[cfg(feature = "abi-variant")]
    pub _variant: u64,
}

/// Bytes the `abi-variant` test build adds to [`ConnRecord`].
const VARIANT_BYTES: usize = if cfg!(feature = "abi-variant") { 8 } else { 0 };

/// What the kernel keeps with each client socket it attributed: the owner
/// from `connect()`, and once the source port is bound, the id under which
/// the record was published and the stamp its SYN carries (so the close
/// callback deletes exactly its own record, and SYN retransmissions carry
/// the same stamp).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    pub record: ConnRecord,
    pub stamp: Stamp,
    /// Whose quota this socket counts against ([`OWNER_QUOTA_MAP`]).
    pub quota_key: u64,
    /// Non-zero once the record has been published to [`CONNECTIONS_MAP`]
    /// (and counted in the owner's quota).
    pub published: u32,
    pub _pad: u32,
}

/// What the SYN of an attributed connection carries: the id of its record
/// and a MAC over (id, 4-tuple) under the per-load key. Only the kernel
/// program knows the key, so only it can make a stamp the agent accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub id: u64,
    pub mac: u64,
}

impl Stamp {
    /// The TCP option as written into the SYN (multi-byte fields big-endian).
    pub const fn to_option(self) -> [u8; STAMP_OPTION_LEN] {
        let exid = STAMP_EXID.to_be_bytes();
        let id = self.id.to_be_bytes();
        let mac = self.mac.to_be_bytes();
        [
            TCP_OPT_EXPERIMENT,
            STAMP_OPTION_LEN as u8,
            exid[0],
            exid[1],
            id[0],
            id[1],
            id[2],
            id[3],
            id[4],
            id[5],
            id[6],
            id[7],
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            mac[6],
            mac[7],
        ]
    }

    /// The stamp in a TCP option (kind and length included), if it is one.
    pub fn from_option(option: &[u8]) -> Option<Stamp> {
        if option.len() != STAMP_OPTION_LEN
            || option[0] != TCP_OPT_EXPERIMENT
            || option[1] as usize != STAMP_OPTION_LEN
            || u16::from_be_bytes([option[2], option[3]]) != STAMP_EXID
        {
            return None;
        }
        let mut id = [0; 8];
        let mut mac = [0; 8];
        id.copy_from_slice(&option[4..12]);
        mac.copy_from_slice(&option[12..20]);
        Some(Stamp {
            id: u64::from_be_bytes(id),
            mac: u64::from_be_bytes(mac),
        })
    }
}

/// SipHash-2-4 of the 44 bytes `id (LE) ‖ key` (the in-memory `ConnKey`,
/// little-endian), under `mac_key`. Written over words so the kernel
/// program computes it without a byte loop; on little-endian machines it is
/// exactly SipHash-2-4 of those bytes (tested against a reference).
#[inline(always)]
pub fn stamp_mac(mac_key: &[u64; 2], id: u64, key: &ConnKey) -> u64 {
    let word = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    let words = [
        id,
        word(key.peer_addr[0], key.peer_addr[1]),
        word(key.peer_addr[2], key.peer_addr[3]),
        word(key.local_addr[0], key.local_addr[1]),
        word(key.local_addr[2], key.local_addr[3]),
    ];
    // 4 tail bytes (the two ports) and the message length in the top byte.
    let last = u64::from(key.peer_port) | (u64::from(key.local_port) << 16) | (44u64 << 56);
    let mut v = [
        mac_key[0] ^ 0x736f_6d65_7073_6575,
        mac_key[1] ^ 0x646f_7261_6e64_6f6d,
        mac_key[0] ^ 0x6c79_6765_6e65_7261,
        mac_key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut i = 0;
    while i < words.len() {
        sip_compress(&mut v, words[i]);
        i += 1;
    }
    sip_compress(&mut v, last);
    v[2] ^= 0xff;
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[inline(always)]
fn sip_compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
}

#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// `a.b.c.d` as `bpf_sock_addr.user_ip4` presents it.
pub const fn raw_v4(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// An IPv6 address as the kernel's `__u32[4]` ctx fields present it.
pub const fn raw_v6(addr: Ipv6Addr) -> RawAddr {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Word 2 of an IPv4-mapped address (`::ffff:0:0/96`) in [`RawAddr`] form.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// The canonical key form of an IPv4 address: IPv4-mapped IPv6.
pub const fn mapped_v4(raw_v4: u32) -> RawAddr {
    [0, 0, V4_MAPPED_WORD, raw_v4]
}

/// Whether a raw IPv6 address is IPv4-mapped.
pub const fn is_v4_mapped(addr: &RawAddr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Canonical key form of any IP address (IPv4 → IPv4-mapped).
pub fn raw_ip(addr: IpAddr) -> RawAddr {
    match addr {
        IpAddr::V4(v4) => mapped_v4(raw_v4(v4)),
        IpAddr::V6(v6) => raw_v6(v6),
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of them are #[repr(C)], made only of integers and arrays of
    // integers, with no padding (sizes asserted below), so every bit pattern
    // is valid and none carries uninitialised bytes into the kernel.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ConnOwner {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SocketOwner {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::Stamp {}
    unsafe impl aya::Pod for super::ImdsVerdict {}
    unsafe impl aya::Pod for super::ImdsEvent {}
    unsafe impl aya::Pod for super::ImdsFlood {}
}

// No implicit padding anywhere: a padded key would hash uninitialised bytes.
const _: () = assert!(core::mem::size_of::<ConnKey>() == 36);
const _: () = assert!(core::mem::size_of::<ConnOwner>() == 32);
const _: () = assert!(core::mem::size_of::<ConnRecord>() == 32 + 36 + 4 + VARIANT_BYTES);
const _: () = assert!(core::mem::size_of::<Stamp>() == 16);
const _: () = assert!(core::mem::size_of::<SocketOwner>() == 72 + VARIANT_BYTES + 16 + 8 + 8);
const _: () = assert!(core::mem::size_of::<Config>() == 16 + 64 + 16 + 32);
const _: () = assert!(core::mem::size_of::<ImdsVerdict>() == 8);
const _: () = assert!(core::mem::size_of::<ImdsEvent>() == 32 + 16 + 16 + 4 + 8 + 4);
const _: () = assert!(core::mem::size_of::<ImdsFlood>() == 40);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn mapped_and_plain_ipv4_give_one_key() {
        let local_v4: SocketAddr = "169.254.170.23:80".parse().unwrap();
        let local_mapped: SocketAddr = "[::ffff:169.254.170.23]:80".parse().unwrap();
        let peer_v4: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        let peer_mapped: SocketAddr = "[::ffff:198.18.0.2]:40000".parse().unwrap();
        assert_eq!(
            ConnKey::from_sockets(peer_v4, local_v4),
            ConnKey::from_sockets(peer_mapped, local_mapped)
        );
        assert!(is_v4_mapped(&raw_ip(local_v4.ip())));
        assert!(!is_v4_mapped(&raw_ip("fd00:ec2::23".parse().unwrap())));
    }

    #[test]
    fn raw_forms_match_network_byte_order_in_memory() {
        let raw = raw_v4(Ipv4Addr::new(169, 254, 170, 23));
        assert_eq!(raw.to_ne_bytes(), [169, 254, 170, 23]);
        let v6 = raw_v6("fd00:ec2::23".parse().unwrap());
        assert_eq!(v6[0].to_ne_bytes(), [0xfd, 0x00, 0x0e, 0xc2]);
        assert_eq!(v6[3].to_ne_bytes(), [0, 0, 0, 0x23]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn the_stamp_mac_is_siphash_2_4_of_id_and_key_bytes() {
        use core::hash::Hasher as _;
        let key = ConnKey::from_sockets(
            "198.18.0.2:40000".parse().unwrap(),
            "169.254.170.23:80".parse().unwrap(),
        );
        for (k0, k1, id) in [
            (0, 0, 0),
            (0x0706050403020100, 0x0f0e0d0c0b0a0908, 1),
            (u64::MAX, 42, u64::MAX),
        ] {
            let mut bytes = std::vec::Vec::from(id.to_le_bytes());
            // SAFETY: ConnKey is repr(C) without padding (asserted above).
            bytes.extend_from_slice(unsafe {
                core::slice::from_raw_parts((&raw const key).cast::<u8>(), 36)
            });
            let mut reference = siphasher::sip::SipHasher24::new_with_keys(k0, k1);
            reference.write(&bytes);
            assert_eq!(stamp_mac(&[k0, k1], id, &key), reference.finish());
        }
    }

    #[test]
    fn stamp_options_round_trip_and_reject_lookalikes() {
        let stamp = Stamp {
            id: 0x0102_0304_0506_0708,
            mac: 0xa1a2_a3a4_a5a6_a7a8,
        };
        let option = stamp.to_option();
        assert_eq!(&option[..4], &[253, 20, 0xe4, 0xa5]);
        assert_eq!(Stamp::from_option(&option), Some(stamp));
        let mut other_exid = option;
        other_exid[3] ^= 1;
        let mut other_kind = option;
        other_kind[0] = 254;
        for bad in [&other_exid[..], &other_kind[..], &option[..19]] {
            assert_eq!(Stamp::from_option(bad), None);
        }
    }

    #[test]
    fn config_counts_each_family_and_bounds_them() {
        let addrs: [IpAddr; 2] = [
            "169.254.170.23".parse().unwrap(),
            "fd00:ec2::23".parse().unwrap(),
        ];
        let config = Config::new(&addrs, 80).unwrap();
        assert_eq!((config.v4_count, config.v6_count, config.port), (1, 1, 80));
        let many = [addrs[0]; MAX_SERVED_ADDRS + 1];
        assert_eq!(Config::new(&many, 80), Err(ConfigError::TooManyAddresses));
    }
}
