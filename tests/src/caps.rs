//! Running a process with exactly a given capability set, as a container
//! runtime does with `capabilities: {drop: [ALL], add: [...]}`: every other
//! capability is dropped from the bounding set before exec, so a uid-0
//! process ends up with exactly these.

use std::process::Command;

use anyhow::{Result, bail};

/// Capability names (as in Kubernetes manifests, without `CAP_`) → numbers.
const CAPS: &[(&str, u32)] = &[
    ("CHOWN", 0),
    ("DAC_OVERRIDE", 1),
    ("DAC_READ_SEARCH", 2),
    ("FOWNER", 3),
    ("FSETID", 4),
    ("KILL", 5),
    ("SETGID", 6),
    ("SETUID", 7),
    ("SETPCAP", 8),
    ("LINUX_IMMUTABLE", 9),
    ("NET_BIND_SERVICE", 10),
    ("NET_BROADCAST", 11),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("IPC_LOCK", 14),
    ("IPC_OWNER", 15),
    ("SYS_MODULE", 16),
    ("SYS_RAWIO", 17),
    ("SYS_CHROOT", 18),
    ("SYS_PTRACE", 19),
    ("SYS_PACCT", 20),
    ("SYS_ADMIN", 21),
    ("SYS_BOOT", 22),
    ("SYS_NICE", 23),
    ("SYS_RESOURCE", 24),
    ("SYS_TIME", 25),
    ("SYS_TTY_CONFIG", 26),
    ("MKNOD", 27),
    ("LEASE", 28),
    ("AUDIT_WRITE", 29),
    ("AUDIT_CONTROL", 30),
    ("SETFCAP", 31),
    ("MAC_OVERRIDE", 32),
    ("MAC_ADMIN", 33),
    ("SYSLOG", 34),
    ("WAKE_ALARM", 35),
    ("BLOCK_SUSPEND", 36),
    ("AUDIT_READ", 37),
    ("PERFMON", 38),
    ("BPF", 39),
    ("CHECKPOINT_RESTORE", 40),
];

/// Restricts `cmd` (run as root) to exactly `keep` after exec. Register it
/// after any pre_exec that needs more (e.g. setns).
pub fn restrict_to(cmd: &mut Command, keep: &[String]) -> Result<()> {
    for name in keep {
        if !CAPS.iter().any(|(n, _)| n == name) {
            bail!("unknown capability {name}");
        }
    }
    let drop: Vec<u32> = CAPS
        .iter()
        .filter(|(n, _)| !keep.iter().any(|k| k == n))
        .map(|(_, bit)| *bit)
        .collect();
    // SAFETY: prctl only, async-signal-safe, no allocation.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for bit in &drop {
                if libc::prctl(libc::PR_CAPBSET_DROP, *bit as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}
