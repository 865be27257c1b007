//! What ties a handover's proofs to the one connection they are made on:
//! the inodes of its two socket ends, as the kernel knows them. A proof of
//! the key over a nonce alone could be relayed: a root process able to
//! rename the handover socket (root owns its directory) could put its own
//! socket at the path, connect to the serving agent's from behind, pass
//! each proof on unchanged, and keep a copy of the listeners it forwards.
//! Proved over the ends' inodes, a relayed proof names the relay's sockets
//! and is refused.
//!
//! Each side reads its own end with `fstat` and the other end with
//! `sock_diag` (`UNIX_DIAG_PEER`, from the same network namespace: both
//! agents are on the host's). Where the kernel cannot say, there is no
//! binding and no handover.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    unix::{ShowFlags, StateFlags, UnixRequest},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// The connection's two ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The successor's end.
    pub taker: u64,
    /// The serving agent's end (the socket it accepted).
    pub giver: u64,
}

/// Which end this agent holds.
#[derive(Clone, Copy, Debug)]
pub enum End {
    Taker,
    Giver,
}

impl Binding {
    /// The binding of the connection `socket` is this agent's `end` of.
    pub fn of(socket: &impl AsFd, end: End) -> io::Result<Binding> {
        let own = nix::sys::stat::fstat(socket.as_fd())
            .map_err(io::Error::from)?
            .st_ino;
        let peer = peer_inode(own, cookie(socket.as_fd())?)?;
        Ok(match end {
            End::Taker => Binding {
                taker: own,
                giver: peer,
            },
            End::Giver => Binding {
                taker: peer,
                giver: own,
            },
        })
    }
}

/// The socket's cookie: unique while the system runs, where inode numbers
/// are 32 bits and wrap.
fn cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    crate::sockopt::get_u64(&socket, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The inode of the socket connected to the Unix socket `own`, whose
/// cookie is `cookie`: the kernel answers for that very socket, or with
/// an error (an inode number reused by another socket does not match).
fn peer_inode(own: u64, cookie: u64) -> io::Result<u64> {
    let unavailable = |what: String| io::Error::other(format!("sock_diag: {what}"));
    // sock_diag names sockets by 32-bit inode numbers, which sockets get.
    let inode = u32::try_from(own).map_err(|_| unavailable(format!("inode {own} too large")))?;
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: StateFlags::all(),
            inode,
            show_flags: ShowFlags::PEER,
            // As the kernel keeps it: two u32 halves, low first.
            cookie: {
                let mut halves = [0; 8];
                halves[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
                halves[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
                halves
            },
        })
        .into(),
    );
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut reply = vec![0; 8192];
    let len = socket.recv(&mut &mut reply[..], 0)?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&reply[..len])
        .map_err(|e| unavailable(format!("reply not understood: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(response))
            if response.header.inode == inode
                && i32::from(response.header.kind) == libc::SOCK_SEQPACKET =>
        {
            response
                .peer()
                .filter(|&peer| peer != 0)
                .map(u64::from)
                .ok_or_else(|| unavailable(format!("socket {inode} has no peer")))
        }
        NetlinkPayload::Error(e) => Err(e.code.map_or_else(
            || unavailable("error without a code".into()),
            |code| io::Error::from_raw_os_error(-code.get()),
        )),
        other => Err(unavailable(format!("unexpected reply {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::wire::Channel;

    #[test]
    fn both_ends_of_a_connection_agree_and_another_connection_differs() -> io::Result<()> {
        let (a, b) = Channel::pair()?;
        let taker = Binding::of(&a, End::Taker)?;
        assert_eq!(taker, Binding::of(&b, End::Giver)?);
        assert_ne!(taker.taker, taker.giver);
        // A relay: two connections, each end seeing its own.
        let (c, _d) = Channel::pair()?;
        assert_ne!(Binding::of(&c, End::Giver)?, taker);
        // Only the handover's kind of socket is looked up.
        let (e, _f) = std::os::unix::net::UnixStream::pair()?;
        assert!(Binding::of(&e, End::Taker).is_err());
        Ok(())
    }
}
