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
/// Map: connection 4-tuple (as the server sees it) → caller.
pub const CONNECTIONS_MAP: &str = "CONNECTIONS";
/// Capacity of [`CONNECTIONS_MAP`]. Entries are deleted when the client socket
/// closes; the map is LRU on top of that so even a leak could never make it
/// refuse new connections.
pub const CONNECTIONS_CAPACITY: u32 = 16_384;

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
}

impl ConnOwner {
    /// The process id (tgid) of the connecting process.
    pub fn pid(&self) -> u32 {
        (self.pid_tgid >> 32) as u32
    }
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

/// What the kernel keeps with each client socket it attributed: the owner
/// from `connect()`, and once the source port is bound, the key under which
/// the owner was published (so the close callback can delete exactly it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    pub owner: ConnOwner,
    pub key: ConnKey,
    /// Non-zero once `key` has been published to [`CONNECTIONS_MAP`].
    pub published: u32,
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
    // SAFETY: all four are #[repr(C)], made only of integers and arrays of
    // integers, with no padding (sizes asserted below), so every bit pattern
    // is valid and none carries uninitialised bytes into the kernel.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::ConnOwner {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SocketOwner {}
}

// No implicit padding anywhere: a padded key would hash uninitialised bytes.
const _: () = assert!(core::mem::size_of::<ConnKey>() == 36);
const _: () = assert!(core::mem::size_of::<ConnOwner>() == 16);
const _: () = assert!(core::mem::size_of::<SocketOwner>() == 16 + 36 + 4);
const _: () = assert!(core::mem::size_of::<Config>() == 16 + 64 + 12);

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
