//! The serving agent's side: waits on the handover socket for a successor,
//! passes it the listening sockets, and stops accepting once the successor
//! says it serves. The accept queues are the kernel's and are never closed,
//! so no connection is refused while the agents change places. If the
//! successor dies before this agent was told to stop, this agent accepts
//! again and waits for the next one.

use std::{
    io,
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, OwnedFd, RawFd},
        unix::{fs::PermissionsExt as _, net::UnixListener},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    handover::wire::{self, Message, WireError},
    serving::server::Accepting,
};

/// How long a successor may take between its hello and saying it serves
/// (loading or adopting the kernel programs, starting its listeners).
const SUCCESSOR_START: Duration = Duration::from_secs(60);
const HELLO: Duration = Duration::from_secs(5);

/// Whether this agent handed its listeners to a successor that is still
/// serving them (so its kernel programs must stay pinned when it exits).
#[derive(Clone, Default)]
pub struct HandedOver(Arc<AtomicBool>);

impl HandedOver {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Offers `listeners` on the Unix socket `path` (created root-only) for as
/// long as the process runs, on a thread of its own.
pub fn offer(
    path: PathBuf,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    accepting: watch::Sender<Accepting>,
) -> io::Result<HandedOver> {
    let handed_over = HandedOver::default();
    let socket = bind_private(&path)?;
    let state = handed_over.clone();
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || give_forever(socket, &path, &listeners, &accepting, &state))?;
    Ok(handed_over)
}

fn give_forever(
    mut socket: UnixListener,
    path: &Path,
    listeners: &[(SocketAddr, OwnedFd)],
    accepting: &watch::Sender<Accepting>,
    handed_over: &HandedOver,
) {
    let addresses: Vec<String> = listeners.iter().map(|(a, _)| a.to_string()).collect();
    let fds: Vec<RawFd> = listeners.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    loop {
        let stream = match socket.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "handover socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let pid = match give(&stream, &addresses, &fds) {
            Ok(pid) => pid,
            Err(e) => {
                warn!(error = %e, "a handover attempt failed; still serving");
                continue;
            }
        };
        if *accepting.borrow() == Accepting::Stop {
            return;
        }
        handed_over.0.store(true, Ordering::SeqCst);
        accepting.send_replace(Accepting::Paused);
        info!(
            successor_pid = pid,
            "handed the listeners over; no longer accepting, finishing this agent's connections"
        );
        match wire::wait_for_close(&stream) {
            Some(Message::HandedOn) => {
                info!(
                    successor_pid = pid,
                    "the successor handed the listeners on; waiting to be stopped"
                );
                return;
            }
            _ if *accepting.borrow() == Accepting::Stop => return,
            _ => {
                handed_over.0.store(false, Ordering::SeqCst);
                accepting.send_replace(Accepting::Yes);
                warn!(
                    successor_pid = pid,
                    "the successor is gone before this agent was stopped; serving again"
                );
                // The successor put its own socket at the path: ours again.
                match bind_private(path) {
                    Ok(fresh) => socket = fresh,
                    Err(e) => {
                        warn!(error = %e, path = %path.display(), "cannot offer a handover any more");
                        return;
                    }
                }
            }
        }
    }
}

/// One handover: hello, the listeners, the successor's word that it serves.
fn give(
    stream: &std::os::unix::net::UnixStream,
    addresses: &[String],
    fds: &[RawFd],
) -> Result<i32, WireError> {
    let pid = wire::require_root_peer(stream)?;
    match wire::receive(stream, Some(HELLO))? {
        (Message::Hello { version }, _) if version == wire::VERSION => {}
        (Message::Hello { version }, _) => return Err(WireError::Version(version)),
        (other, _) => return Err(WireError::Unexpected(other)),
    }
    wire::send(
        stream,
        &Message::Listeners {
            addresses: addresses.to_vec(),
        },
        fds,
    )?;
    match wire::receive(stream, Some(SUCCESSOR_START))? {
        (Message::Serving, _) => Ok(pid),
        (other, _) => Err(WireError::Unexpected(other)),
    }
}

/// Binds the Unix socket at `path`, replacing whatever is there, in a
/// directory only root can enter; the socket itself is root's alone.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(socket)
}
