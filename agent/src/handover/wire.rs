//! The handover socket's wire: one JSON message per record of a Unix
//! `SOCK_SEQPACKET` socket, listening sockets passed as `SCM_RIGHTS`, and the peer's
//! credentials checked on both ends (root only: whoever holds the listeners
//! receives every pod's token). The protocol: docs/architecture.md §9.

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
        UnixAddr, accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, setsockopt, socket,
        socketpair, sockopt,
    },
    time::TimeVal,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{caller::attribution::Opener, handover::binding::Binding};

/// The protocol's version; a peer speaking another is refused (the old
/// agent keeps serving, the new one binds when the old one is gone).
/// 2: proofs bound to the connection's two ends (see `binding`).
pub const VERSION: u32 = 2;

/// Most listeners one handover carries: the served addresses (4 per family),
/// the probe and the metrics port.
pub const MAX_FDS: usize = 16;

/// The messages, in order: the successor's `Hello`, the serving agent's
/// `Listeners` (with the sockets attached), the successor's `Serving` once
/// it accepts on them. Then, while the previous agent finishes: the
/// successor's `Lookup`s, each answered `Opened` — for connections stamped
/// by the previous agent's kernel programs when the successor runs another
/// build of them — and, last, `HandedOn` if the successor passes the
/// listeners to a successor of its own before it exits.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Hello {
        version: u32,
        /// The successor's generation of the kernel programs (`None`: not
        /// pinned): the same as the serving agent's means shared programs.
        generation: Option<String>,
    },
    /// The serving agent's answer to `hello`: a nonce to prove with, and
    /// the generation whose key proves it.
    Challenge {
        nonce: u64,
        generation: Option<String>,
    },
    /// The successor's proof that it can read that key (the agent's own
    /// privileges: bpffs and `CAP_BPF`), and a nonce for the serving agent.
    Proof {
        mac: u64,
        nonce: u64,
    },
    Listeners {
        addresses: Vec<String>,
        /// The serving agent's proof over the successor's nonce.
        proof: Option<u64>,
    },
    Serving,
    Lookup {
        id: u64,
        mac: u64,
        peer: SocketAddr,
        local: SocketAddr,
    },
    Opened {
        /// The lookup answered, echoed whole: an answer is never taken for
        /// another connection's.
        id: u64,
        mac: u64,
        peer: SocketAddr,
        local: SocketAddr,
        opener: Option<Opener>,
        refused: Option<String>,
    },
    HandedOn,
}

#[derive(Debug, Error)]
pub enum WireError {
    #[error("handover socket: {0}")]
    Io(#[from] io::Error),
    #[error("handover peer is uid {uid} (pid {pid}), not root: refused")]
    NotRoot { uid: u32, pid: i32 },
    #[error("handover peer sent {0:?} where another message was due")]
    Unexpected(Box<Message>),
    #[error("handover peer closed the connection")]
    Closed,
    #[error("handover message is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("handover peer speaks protocol {0}, this agent {VERSION}")]
    Version(u32),
    #[error(
        "handover peer could not prove it holds the kernel programs' key (root, but without the agent's bpffs and CAP_BPF): refused"
    )]
    BadProof,
    #[error(
        "this agent has no pin directory to read the serving agent's key from, so it cannot check it is one: no handover"
    )]
    NoKey,
    #[error("the listeners arrived without their sockets ({0} descriptors for {1} addresses)")]
    Descriptors(usize, usize),
}

/// The proof that a peer can read the stamp key of a pinned generation, on
/// the connection `binding` names: SipHash-2-4 under that key over `nonce`
/// and a 4-tuple of the two ends' socket inodes with both ports zero,
/// which no TCP connection has, so no stamp seen on the wire is ever a
/// proof.
pub fn prove(key: &agent_ebpf::StampKey, nonce: u64, binding: Binding) -> u64 {
    let addr = |inode: u64| [0, 0, (inode >> 32) as u32, inode as u32];
    let ends = agent_ebpf::ConnKey {
        peer_addr: addr(binding.taker),
        local_addr: addr(binding.giver),
        peer_port: 0,
        local_port: 0,
    };
    agent_ebpf::stamp_mac(key, nonce, &ends)
}

/// A nonce from the kernel's generator.
pub fn nonce() -> io::Result<u64> {
    crate::caller::attribution::random_u64()
}

/// Largest message (a few hundred bytes in practice; a larger one is
/// refused as truncated). Lookups receive one per accepted connection
/// during a handover: a small buffer.
const MAX_MESSAGE: usize = 8 * 1024;

/// One end of a handover connection: a `SOCK_SEQPACKET` Unix socket, so
/// every message is one record (no framing to get wrong) and arrives with
/// the descriptors sent with it.
pub struct Channel(OwnedFd);

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The serving agent's listening handover socket.
pub struct Listener(OwnedFd);

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

impl Listener {
    /// Listens at `path` (which must not exist).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        let fd = seqpacket()?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        listen(&fd, Backlog::new(16)?)?;
        Ok(Listener(fd))
    }

    /// The next successor to connect (blocks).
    pub fn accept(&self) -> io::Result<Channel> {
        let fd = accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        Ok(Channel(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

impl Channel {
    /// Connects to the serving agent at `path`.
    pub fn connect(path: &Path) -> io::Result<Channel> {
        let fd = seqpacket()?;
        connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(Channel(fd))
    }

    /// Two connected ends (tests).
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        Ok((Channel(a), Channel(b)))
    }

    /// Refuses any peer that is not root; returns its pid.
    pub fn require_root_peer(&self) -> Result<i32, WireError> {
        let cred = getsockopt(&self.0, sockopt::PeerCredentials).map_err(io::Error::from)?;
        if cred.uid() != 0 {
            return Err(WireError::NotRoot {
                uid: cred.uid(),
                pid: cred.pid(),
            });
        }
        Ok(cred.pid())
    }

    /// Sends `message`, with `fds` attached when there are any.
    pub fn send(&self, message: &Message, fds: &[RawFd]) -> Result<(), WireError> {
        let bytes = serde_json::to_vec(message)?;
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg::<()>(
            self.0.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        Ok(())
    }

    /// Receives one message and the descriptors sent with it, waiting at
    /// most `timeout` (`None`: until the peer writes or closes).
    pub fn receive(&self, timeout: Option<Duration>) -> Result<(Message, Vec<OwnedFd>), WireError> {
        let wait = TimeVal::from(libc::timeval {
            tv_sec: timeout.map_or(0, |t| t.as_secs() as libc::time_t),
            // Zero means "forever" to the kernel: a zero timeout is 1 µs.
            tv_usec: timeout.map_or(0, |t| {
                (t.subsec_micros() as libc::suseconds_t).max(i64::from(t.is_zero()) as _)
            }),
        });
        setsockopt(&self.0, sockopt::ReceiveTimeout, &wait).map_err(io::Error::from)?;
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let received = recvmsg::<()>(
            self.0.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for cmsg in received.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let (read, truncated) = (received.bytes, received.flags.contains(MsgFlags::MSG_TRUNC));
        if read == 0 {
            return Err(WireError::Closed);
        }
        if truncated {
            return Err(WireError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover message too long",
            )));
        }
        Ok((serde_json::from_slice(&buffer[..read])?, fds))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socket_pair() {
        let (a, b) = Channel::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let listeners = Message::Listeners {
            addresses: vec![addr.to_string()],
            proof: Some(42),
        };
        a.send(&listeners, &[listener.as_fd().as_raw_fd()])
            .expect("send");
        // Two records back to back stay two messages.
        a.send(&Message::Serving, &[]).expect("send");
        let (message, fds) = b.receive(Some(Duration::from_secs(5))).expect("receive");
        assert_eq!(message, listeners);
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(
            received.local_addr().expect("addr"),
            addr,
            "the same socket"
        );
        let (message, fds) = b.receive(Some(Duration::from_secs(5))).expect("receive");
        assert_eq!((message, fds.len()), (Message::Serving, 0));
        drop(b);
        assert!(matches!(
            a.receive(Some(Duration::from_secs(5))),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn a_proof_needs_the_key_and_answers_only_its_nonce_on_its_connection() {
        let key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        let on = Binding {
            taker: 4242,
            giver: 4243,
        };
        assert_eq!(prove(&key, 9, on), prove(&key, 9, on));
        assert_ne!(prove(&key, 9, on), prove(&key, 10, on));
        assert_ne!(prove(&key, 9, on), prove(&[key[0], key[1] ^ 1], 9, on));
        // A relay's connections: either end another socket.
        for relayed in [
            Binding {
                taker: 4242,
                giver: 7,
            },
            Binding {
                taker: 7,
                giver: 4243,
            },
            Binding {
                taker: 4243,
                giver: 4242,
            },
        ] {
            assert_ne!(prove(&key, 9, on), prove(&key, 9, relayed), "{relayed:?}");
        }
        assert_ne!(nonce().expect("nonce"), nonce().expect("nonce"));
    }

    #[test]
    fn a_receive_that_times_out_says_so() {
        let (a, _b) = Channel::pair().expect("pair");
        match a.receive(Some(Duration::from_millis(20))) {
            Err(WireError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_peer_of_a_root_process_is_root() {
        let (a, _b) = Channel::pair().expect("pair");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(a.require_root_peer().is_ok(), root);
    }
}
