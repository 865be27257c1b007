//! Another project's cgroup programs (a CNI's, say Cilium's), loaded and
//! attached with raw `bpf(2)` calls — no object file, no aya — so the tests
//! can check that the agent's programs and someone else's coexist at the
//! same cgroup, in either order, by either attach API.
//!
//! The "foreign" `connect4` program refuses connect()s to one port (so it
//! is observable: a refused connect means it ran); its `sock_ops` program
//! does nothing but exist.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// How the foreign programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachApi {
    /// `BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI` (older CNIs).
    LegacyMulti,
    /// `BPF_LINK_CREATE` (what current CNIs and the agent use).
    Link,
}

/// Loaded and attached foreign programs; dropping detaches them.
pub struct ForeignPrograms {
    cgroup: File,
    api: AttachApi,
    connect4: OwnedFd,
    sock_ops: OwnedFd,
    /// Link fds (link API only): closing them detaches.
    links: Vec<OwnedFd>,
}

/// `bpf_insn` encoding: opcode, dst | src << 4, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let off = off.to_le_bytes();
    let imm = imm.to_le_bytes();
    [
        code,
        dst | (src << 4),
        off[0],
        off[1],
        imm[0],
        imm[1],
        imm[2],
        imm[3],
    ]
}

/// `connect4` refusing `port`: `r2 = ctx->user_port; r0 = 1;
/// if r2 != htons(port) goto out; r0 = 0; out: exit`.
fn refuse_port_program(port: u16) -> Vec<u8> {
    let user_port = i32::from(port.to_be());
    [
        insn(0x61, 2, 1, 24, 0),        // ldxw r2, [r1 + 24] (user_port)
        insn(0xb7, 0, 0, 0, 1),         // mov r0, 1
        insn(0x55, 2, 0, 1, user_port), // jne r2, imm, +1
        insn(0xb7, 0, 0, 0, 0),         // mov r0, 0
        insn(0x95, 0, 0, 0, 0),         // exit
    ]
    .concat()
}

/// `sock_ops` doing nothing: `r0 = 1; exit`.
fn noop_program() -> Vec<u8> {
    [insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)].concat()
}

fn put_u32(attr: &mut [u8], at: usize, v: u32) {
    attr[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8], at: usize, v: u64) {
    attr[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<i64> {
    // SAFETY: bpf(2) with an attr buffer of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn load(prog_type: u32, expected_attach_type: u32, insns: &[u8]) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog_type);
    put_u32(&mut attr, 4, (insns.len() / 8) as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    put_u32(&mut attr, 24, 1); // log_level
    put_u32(&mut attr, 28, log.len() as u32);
    put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
    put_u32(&mut attr, 68, expected_attach_type);
    let fd = bpf(BPF_PROG_LOAD, &mut attr).with_context(|| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!(
            "BPF_PROG_LOAD type {prog_type}: {}",
            String::from_utf8_lossy(&log[..end])
        )
    })?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl ForeignPrograms {
    /// Loads the foreign programs and attaches them to `cgroup` with `api`.
    pub fn attach(cgroup: &Path, api: AttachApi, refused_port: u16) -> Result<ForeignPrograms> {
        let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let connect4 = load(
            BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            BPF_CGROUP_INET4_CONNECT,
            &refuse_port_program(refused_port),
        )?;
        let sock_ops = load(BPF_PROG_TYPE_SOCK_OPS, 0, &noop_program())?;
        let mut programs = ForeignPrograms {
            cgroup: dir,
            api,
            connect4,
            sock_ops,
            links: Vec::new(),
        };
        for (prog, attach_type) in [
            (programs.connect4.as_raw_fd(), BPF_CGROUP_INET4_CONNECT),
            (programs.sock_ops.as_raw_fd(), BPF_CGROUP_SOCK_OPS),
        ] {
            let mut attr = [0u8; 128];
            let target = programs.cgroup.as_raw_fd() as u32;
            match api {
                AttachApi::LegacyMulti => {
                    put_u32(&mut attr, 0, target);
                    put_u32(&mut attr, 4, prog as u32);
                    put_u32(&mut attr, 8, attach_type);
                    put_u32(&mut attr, 12, BPF_F_ALLOW_MULTI);
                    bpf(BPF_PROG_ATTACH, &mut attr)
                        .with_context(|| format!("BPF_PROG_ATTACH type {attach_type}"))?;
                }
                AttachApi::Link => {
                    put_u32(&mut attr, 0, prog as u32);
                    put_u32(&mut attr, 4, target);
                    put_u32(&mut attr, 8, attach_type);
                    let link = bpf(BPF_LINK_CREATE, &mut attr)
                        .with_context(|| format!("BPF_LINK_CREATE type {attach_type}"))?;
                    // SAFETY: a new link fd we own.
                    programs
                        .links
                        .push(unsafe { OwnedFd::from_raw_fd(link as i32) });
                }
            }
        }
        Ok(programs)
    }
}

/// How many programs are attached to `cgroup` for `connect4` and
/// `sock_ops` (effective for the cgroup itself, links included).
pub fn attached_counts(cgroup: &Path) -> Result<(u32, u32)> {
    let dir = File::open(cgroup)?;
    let count = |attach_type: u32| -> Result<u32> {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, dir.as_raw_fd() as u32);
        put_u32(&mut attr, 4, attach_type);
        bpf(BPF_PROG_QUERY, &mut attr).context("BPF_PROG_QUERY")?;
        Ok(u32::from_ne_bytes([attr[24], attr[25], attr[26], attr[27]]))
    };
    Ok((
        count(BPF_CGROUP_INET4_CONNECT)?,
        count(BPF_CGROUP_SOCK_OPS)?,
    ))
}

impl Drop for ForeignPrograms {
    fn drop(&mut self) {
        if self.api == AttachApi::LegacyMulti {
            for (prog, attach_type) in [
                (self.connect4.as_raw_fd(), BPF_CGROUP_INET4_CONNECT),
                (self.sock_ops.as_raw_fd(), BPF_CGROUP_SOCK_OPS),
            ] {
                let mut attr = [0u8; 128];
                put_u32(&mut attr, 0, self.cgroup.as_raw_fd() as u32);
                put_u32(&mut attr, 4, prog as u32);
                put_u32(&mut attr, 8, attach_type);
                if let Err(e) = bpf(BPF_PROG_DETACH, &mut attr) {
                    eprintln!("cleanup: detaching a foreign program: {e}");
                }
            }
        }
        // Links detach when their fds (dropped after this) close.
    }
}
