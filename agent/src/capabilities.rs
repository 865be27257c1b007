//! Which Linux capabilities the agent has, checked up front so a missing one
//! is named precisely instead of surfacing as a bare EPERM deep inside a
//! syscall. The sets are the ones the deployment grants (deploy/), each
//! verified necessary by the capability tests.

use thiserror::Error;

/// A capability the agent may need, with why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    pub name: &'static str,
    bit: u32,
    pub why: &'static str,
}

pub const NET_ADMIN: Cap = Cap {
    name: "CAP_NET_ADMIN",
    bit: 12,
    why: "netlink changes (init); loading and attaching networking eBPF programs (server)",
};
pub const NET_BIND_SERVICE: Cap = Cap {
    name: "CAP_NET_BIND_SERVICE",
    bit: 10,
    why: "listening on a port below ip_unprivileged_port_start (80)",
};
pub const DAC_READ_SEARCH: Cap = Cap {
    name: "CAP_DAC_READ_SEARCH",
    bit: 2,
    why: "open_by_handle_at: resolving a caller's cgroup id to its pod",
};
pub const BPF: Cap = Cap {
    name: "CAP_BPF",
    bit: 39,
    why: "creating eBPF maps and loading programs",
};
pub const PERFMON: Cap = Cap {
    name: "CAP_PERFMON",
    bit: 38,
    why: "the verifier's checks for the attribution programs",
};

/// What caller attribution needs.
pub const ATTRIBUTION: &[Cap] = &[BPF, PERFMON, NET_ADMIN, DAC_READ_SEARCH];

#[derive(Debug, Error)]
#[error("missing Linux capabilities: {}", describe(.0))]
pub struct MissingCaps(pub Vec<Cap>);

fn describe(caps: &[Cap]) -> String {
    caps.iter()
        .map(|c| format!("{} ({})", c.name, c.why))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The effective capability set of this process (from /proc/self/status).
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// `Err` naming every capability of `needed` this process lacks. If the
/// set cannot be read, the kernel's own errors will have to do.
pub fn require(needed: &[Cap]) -> Result<(), MissingCaps> {
    let Some(have) = effective() else {
        return Ok(());
    };
    let missing: Vec<Cap> = needed
        .iter()
        .copied()
        .filter(|c| have & (1u64 << c.bit) == 0)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(MissingCaps(missing))
    }
}

/// Whether binding `port` needs CAP_NET_BIND_SERVICE in this namespace.
pub fn port_is_privileged(port: u16) -> bool {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024);
    u32::from(port) < start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_each_missing_capability() {
        let msg = MissingCaps(vec![BPF, DAC_READ_SEARCH]).to_string();
        assert!(
            msg.contains("CAP_BPF") && msg.contains("CAP_DAC_READ_SEARCH"),
            "{msg}"
        );
    }
}
