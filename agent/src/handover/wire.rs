//! The handover socket's wire: newline-delimited JSON messages over a Unix
//! stream socket, listening sockets passed as `SCM_RIGHTS`, and the peer's
//! credentials checked on both ends (root only: whoever holds the listeners
//! receives every pod's token).

use std::{
    io::{self, IoSlice, IoSliceMut, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sendmsg, sockopt,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::caller::attribution::Opener;

/// The protocol's version; a peer speaking another is refused (the old
/// agent keeps serving, the new one binds when the old one is gone).
pub const VERSION: u32 = 1;

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
    },
    Listeners {
        addresses: Vec<String>,
    },
    Serving,
    Lookup {
        id: u64,
        mac: u64,
        peer: SocketAddr,
        local: SocketAddr,
    },
    Opened {
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
    Unexpected(Message),
    #[error("handover peer closed the connection")]
    Closed,
    #[error("handover message is not valid: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("handover peer speaks protocol {0}, this agent {VERSION}")]
    Version(u32),
    #[error("the listeners arrived without their sockets ({0} descriptors for {1} addresses)")]
    Descriptors(usize, usize),
}

/// Refuses any peer that is not root; returns its pid.
pub fn require_root_peer(stream: &UnixStream) -> Result<i32, WireError> {
    let cred = getsockopt(stream, sockopt::PeerCredentials).map_err(io::Error::from)?;
    if cred.uid() != 0 {
        return Err(WireError::NotRoot {
            uid: cred.uid(),
            pid: cred.pid(),
        });
    }
    Ok(cred.pid())
}

/// Sends `message`, with `fds` attached when there are any.
pub fn send(stream: &UnixStream, message: &Message, fds: &[RawFd]) -> Result<(), WireError> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    if fds.is_empty() {
        (&*stream).write_all(&line)?;
        return Ok(());
    }
    let rights = [ControlMessage::ScmRights(fds)];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &rights,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    // The descriptors travel with the first byte; the rest is plain data.
    (&*stream).write_all(&line[sent..])?;
    Ok(())
}

/// Receives one message and any descriptors sent with it, waiting at most
/// `timeout` (`None`: until the peer writes or closes).
pub fn receive(
    stream: &UnixStream,
    timeout: Option<Duration>,
) -> Result<(Message, Vec<OwnedFd>), WireError> {
    stream.set_read_timeout(timeout)?;
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    while !line.contains(&b'\n') {
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let received = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let read = received.bytes;
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
        if read == 0 {
            return Err(WireError::Closed);
        }
        line.extend_from_slice(&chunk[..read]);
        if line.len() > 64 * 1024 {
            return Err(WireError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover message too long",
            )));
        }
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    Ok((serde_json::from_slice(&line[..end])?, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn messages_and_descriptors_cross_a_socket_pair() {
        let (a, b) = UnixStream::pair().expect("pair");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        send(
            &a,
            &Message::Listeners {
                addresses: vec![addr.to_string()],
            },
            &[listener.as_fd().as_raw_fd()],
        )
        .expect("send");
        let (message, fds) = receive(&b, Some(Duration::from_secs(5))).expect("receive");
        assert_eq!(
            message,
            Message::Listeners {
                addresses: vec![addr.to_string()]
            }
        );
        assert_eq!(fds.len(), 1);
        let received = std::net::TcpListener::from(fds.into_iter().next().expect("fd"));
        assert_eq!(
            received.local_addr().expect("addr"),
            addr,
            "the same socket"
        );
        send(&b, &Message::Serving, &[]).expect("send");
        assert_eq!(
            receive(&a, Some(Duration::from_secs(5)))
                .expect("receive")
                .0,
            Message::Serving
        );
        drop(b);
        assert!(matches!(
            receive(&a, Some(Duration::from_secs(5))),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn the_peer_of_a_root_process_is_root() {
        let (a, _b) = UnixStream::pair().expect("pair");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(require_root_peer(&a).is_ok(), root);
    }
}
