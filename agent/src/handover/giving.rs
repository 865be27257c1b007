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
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    caller::{
        attribution::{Accepted, OpenerLookup, Stamp},
        syn::SavedSyn,
    },
    handover::wire::{self, Message, WireError},
    serving::server::Accepting,
};

/// How long a successor may take between its hello and saying it serves
/// (loading or adopting the kernel programs, starting its listeners).
const SUCCESSOR_START: Duration = Duration::from_secs(60);
const HELLO: Duration = Duration::from_secs(5);

/// Where the offer stands. Shutdown and a handover in progress must agree:
/// an agent that stops must know whether a successor now relies on its
/// pinned kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Giving,
    HandedOver,
    Closed,
}

/// The offer's state, shared by the handover thread and shutdown.
#[derive(Clone)]
pub struct Offer(Arc<(Mutex<Phase>, Condvar)>);

impl Offer {
    fn new() -> Offer {
        Offer(Arc::new((Mutex::new(Phase::Open), Condvar::new())))
    }

    fn lock(&self) -> MutexGuard<'_, Phase> {
        // A plain enum cannot be left half-written by a panic.
        self.0.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, phase: Phase) {
        *self.lock() = phase;
        self.0.1.notify_all();
    }

    /// Starts a handover unless shutdown closed the offer.
    fn begin(&self) -> bool {
        let mut phase = self.lock();
        if *phase == Phase::Closed {
            return false;
        }
        *phase = Phase::Giving;
        true
    }

    /// Waits (bounded) until a successor has taken the listeners.
    pub fn wait_for_successor(&self, within: Duration) -> bool {
        let guard = self.lock();
        let (phase, _) = self
            .0
            .1
            .wait_timeout_while(guard, within, |p| *p != Phase::HandedOver)
            .unwrap_or_else(PoisonError::into_inner);
        *phase == Phase::HandedOver
    }

    /// Closes the offer at shutdown, first letting a handover in progress
    /// finish (bounded); returns whether a successor serves the listeners.
    pub fn close(&self) -> bool {
        let guard = self.lock();
        let (mut phase, _) = self
            .0
            .1
            .wait_timeout_while(guard, SUCCESSOR_START, |p| *p == Phase::Giving)
            .unwrap_or_else(PoisonError::into_inner);
        let handed_over = *phase == Phase::HandedOver;
        *phase = Phase::Closed;
        handed_over
    }
}

/// Offers `listeners` on the Unix socket `path` (created root-only) for as
/// long as the process runs, on a thread of its own. `lookup`: this agent's
/// kernel programs, which vouch for the connections they stamped while a
/// successor runs another build of them.
pub fn offer(
    path: PathBuf,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    accepting: watch::Sender<Accepting>,
    lookup: Option<Arc<dyn OpenerLookup>>,
) -> io::Result<Offer> {
    let offer = Offer::new();
    let socket = bind_private(&path)?;
    let giver = Giver {
        addresses: listeners.iter().map(|(a, _)| a.to_string()).collect(),
        listeners,
        path,
        accepting,
        offer: offer.clone(),
        lookup,
    };
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || giver.give_forever(socket))?;
    Ok(offer)
}

/// What the handover thread works with.
struct Giver {
    path: PathBuf,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    addresses: Vec<String>,
    accepting: watch::Sender<Accepting>,
    offer: Offer,
    lookup: Option<Arc<dyn OpenerLookup>>,
}

impl Giver {
    fn give_forever(&self, mut socket: UnixListener) {
        let fds: Vec<RawFd> = self
            .listeners
            .iter()
            .map(|(_, fd)| fd.as_raw_fd())
            .collect();
        loop {
            let stream = match socket.accept() {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "handover socket: accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if !self.offer.begin() {
                // Shutting down: the successor binds once this agent is gone.
                return;
            }
            let pid = match give(&stream, &self.addresses, &fds) {
                Ok(pid) => pid,
                Err(e) => {
                    self.offer.set(Phase::Open);
                    warn!(error = %e, "a handover attempt failed; still serving");
                    continue;
                }
            };
            if *self.accepting.borrow() != Accepting::Stop {
                self.accepting.send_replace(Accepting::Paused);
            }
            self.offer.set(Phase::HandedOver);
            info!(
                successor_pid = pid,
                "handed the listeners over; no longer accepting, finishing this agent's connections"
            );
            if self.answer_lookups(&stream) == Some(Message::HandedOn) {
                info!(
                    successor_pid = pid,
                    "the successor handed the listeners on; waiting to be stopped"
                );
                return;
            }
            if !self.offer.begin() {
                return;
            }
            self.offer.set(Phase::Open);
            self.accepting.send_replace(Accepting::Yes);
            warn!(
                successor_pid = pid,
                "the successor is gone before this agent was stopped; serving again"
            );
            // The successor put its own socket at the path: ours again.
            match bind_private(&self.path) {
                Ok(fresh) => socket = fresh,
                Err(e) => {
                    warn!(error = %e, path = %self.path.display(), "cannot offer a handover any more");
                    return;
                }
            }
        }
    }

    /// Answers the successor's lookups until it says `HandedOn` (returned)
    /// or its end closes (`None`: it is gone).
    fn answer_lookups(&self, stream: &UnixStream) -> Option<Message> {
        loop {
            match wire::receive(stream, None) {
                Ok((
                    Message::Lookup {
                        id,
                        mac,
                        peer,
                        local,
                    },
                    _,
                )) => {
                    let conn = Accepted {
                        peer,
                        local,
                        syn: SavedSyn::Kept(Some(Stamp { id, mac })),
                    };
                    let (opener, refused) = match self.lookup.as_ref().map(|l| l.opener(&conn)) {
                        Some(Ok(opener)) => (opener, None),
                        Some(Err(e)) => (None, Some(e.to_string())),
                        None => (None, None),
                    };
                    if wire::send(stream, &Message::Opened { opener, refused }, &[]).is_err() {
                        return None;
                    }
                }
                Ok((Message::HandedOn, _)) => return Some(Message::HandedOn),
                Ok((other, _)) => {
                    warn!(message = ?other, "unexpected message from the successor; ignored");
                }
                Err(_) => return None,
            }
        }
    }
}

/// One handover: hello, the listeners, the successor's word that it serves.
fn give(stream: &UnixStream, addresses: &[String], fds: &[RawFd]) -> Result<i32, WireError> {
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
