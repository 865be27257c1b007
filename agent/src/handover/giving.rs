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
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    caller::{
        attribution::{Accepted, Attribution, OpenerLookup as _, Stamp},
        syn::SavedSyn,
    },
    handover::{
        binding::{Binding, End},
        wire::{self, Channel, Listener, Message, WireError},
    },
    serving::{pauses::Pauses, server::Accepting},
};

/// How long a successor may take between its hello and saying it serves
/// (loading or adopting the kernel programs, starting its listeners).
/// Below the pod's termination grace, so a stopping agent is never killed
/// waiting for one.
const SUCCESSOR_START: Duration = Duration::from_secs(20);
const HELLO: Duration = Duration::from_secs(5);
/// How long this agent's accept loops may take to see a pause (a turn of
/// their runtimes; milliseconds even on a loaded node).
const PAUSE_SETTLE: Duration = Duration::from_secs(2);

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

    /// Open again after a successor went, unless shutdown closed the offer;
    /// whether it is open.
    fn reopen(&self) -> bool {
        let mut phase = self.lock();
        if *phase == Phase::Closed {
            return false;
        }
        *phase = Phase::Open;
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
/// long as the process runs, on a thread of its own. `programs`: this agent's
/// kernel programs, whose pinned key a successor must prove it reads, and
/// which vouch for the connections they stamped while a successor runs
/// another build of them.
pub fn offer(
    path: PathBuf,
    listeners: Vec<(SocketAddr, OwnedFd)>,
    accepting: watch::Sender<Accepting>,
    pauses: Arc<Pauses>,
    programs: Option<Arc<Attribution>>,
) -> io::Result<Offer> {
    // No key, no offer: uid 0 on the socket is no proof of being an agent
    // (root confined to a container's capabilities, or root of a user
    // namespace it made itself — which root may make without a capability —
    // is uid 0 to SO_PEERCRED), and whoever holds the listeners receives
    // every pod's token. The next agent binds once this one is gone.
    let Some(programs) = programs.filter(|p| p.generation().is_some()) else {
        return Err(io::Error::other(
            "no pinned kernel programs (attribution off, or not pinned), so no successor could prove it holds their key",
        ));
    };
    let offer = Offer::new();
    let socket = bind_private(&path)?;
    let giver = Giver {
        listeners,
        path,
        accepting,
        pauses,
        offer: offer.clone(),
        programs,
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
    accepting: watch::Sender<Accepting>,
    /// When this agent's accept loops have all seen the pause.
    pauses: Arc<Pauses>,
    offer: Offer,
    programs: Arc<Attribution>,
}

/// How a conversation with the successor ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// It accepts on the listeners now.
    Serving,
    /// It passed the listeners on to its own successor.
    HandedOn,
    /// Its end closed: it is gone.
    Gone,
    /// It did not say it serves in time.
    TimedOut,
}

impl Giver {
    fn give_forever(&self, mut socket: Listener) {
        loop {
            let stream = match socket.accept() {
                Ok(stream) => stream,
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
            let mut vouched = 0;
            // It may ask about connections before it says it serves: it
            // accepts on the listeners from the moment it has them.
            let given = give(&stream, &self.listeners, &self.programs).map(|(pid, generation)| {
                let deadline = Instant::now() + SUCCESSOR_START;
                let ended = self.converse(&stream, Some(deadline), &mut vouched);
                (pid, generation, ended)
            });
            let (pid, generation) = match given {
                Ok((pid, generation, Ended::Serving)) => (pid, generation),
                Ok((pid, _, ended)) => {
                    self.offer.set(Phase::Open);
                    warn!(
                        successor_pid = pid,
                        ?ended,
                        "the successor took the listeners but did not say it serves; still serving"
                    );
                    continue;
                }
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
            // Its own build of the programs records new connections from
            // now on; ours would only stamp them with a key it cannot check.
            let shared = |own: &str| generation.as_deref() == Some(own);
            if !self.programs.generation().is_some_and(shared) {
                // Not before every accept loop here stands paused: one that
                // accepted a connection made after the switch could not
                // check its stamp (`serving::pauses`).
                if !self.pauses.wait_all_paused(PAUSE_SETTLE) {
                    warn!(
                        within = ?PAUSE_SETTLE,
                        "an accept loop did not stand paused in time; switching the kernel programs off anyway"
                    );
                }
                self.switch(false);
            }
            let ended = self.converse(&stream, None, &mut vouched);
            if vouched > 0 {
                info!(
                    vouched,
                    "vouched for connections this agent's kernel programs stamped"
                );
            }
            if ended == Ended::HandedOn {
                info!(
                    successor_pid = pid,
                    "the successor handed the listeners on; waiting to be stopped"
                );
                return;
            }
            if !self.offer.reopen() {
                return;
            }
            self.switch(true);
            // The successor's programs, if nothing holds them any more.
            let _ = self.programs.retire_others();
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

    fn switch(&self, active: bool) {
        match self.programs.set_active(active) {
            Ok(()) => info!(active, "kernel programs switched"),
            Err(e) => warn!(error = %e, active, "switching the kernel programs failed"),
        }
    }

    /// Answers the successor's lookups until it says it serves or hands
    /// on, goes, or (with a deadline) takes too long.
    fn converse(&self, stream: &Channel, deadline: Option<Instant>, vouched: &mut u64) -> Ended {
        loop {
            let wait = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ended::TimedOut,
                },
                None => None,
            };
            match stream.receive(wait) {
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
                    let (opener, refused) = match self.programs.opener(&conn) {
                        Ok(opener) => {
                            *vouched += u64::from(opener.is_some());
                            (opener, None)
                        }
                        Err(e) => (None, Some(e.to_string())),
                    };
                    if stream
                        .send(
                            &Message::Opened {
                                id,
                                mac,
                                peer,
                                local,
                                opener,
                                refused,
                            },
                            &[],
                        )
                        .is_err()
                    {
                        return Ended::Gone;
                    }
                }
                Ok((Message::Serving, _)) => return Ended::Serving,
                Ok((Message::HandedOn, _)) => return Ended::HandedOn,
                Ok((other, _)) => {
                    warn!(message = ?other, "unexpected message from the successor; ignored");
                }
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ended::TimedOut;
                }
                Err(_) => return Ended::Gone,
            }
        }
    }
}

/// The start of a handover: the successor's hello, then the listeners.
/// Returns the successor's pid and generation of the kernel programs. The
/// successor must prove it can read this agent's pinned key (the agent's
/// own privileges, not just uid 0), and this agent proves the same to it.
fn give(
    stream: &Channel,
    listeners: &[(SocketAddr, OwnedFd)],
    programs: &Attribution,
) -> Result<(i32, Option<String>), WireError> {
    let pid = stream.require_root_peer()?;
    let generation = match stream.receive(Some(HELLO))? {
        (
            Message::Hello {
                version,
                generation,
            },
            _,
        ) if version == wire::VERSION => generation,
        (Message::Hello { version, .. }, _) => return Err(WireError::Version(version)),
        (other, _) => return Err(WireError::Unexpected(Box::new(other))),
    };
    // Read before anything of the key is sent: what the proofs are bound to.
    let binding = Binding::of(stream, End::Giver)?;
    let challenge = wire::nonce()?;
    stream.send(
        &Message::Challenge {
            nonce: challenge,
            generation: programs.generation().map(str::to_owned),
        },
        &[],
    )?;
    let theirs = match stream.receive(Some(HELLO))? {
        (Message::Proof { mac, nonce }, _) => {
            if programs.prove(challenge, binding) != Some(mac) {
                return Err(WireError::BadProof);
            }
            nonce
        }
        (other, _) => return Err(WireError::Unexpected(Box::new(other))),
    };
    let (addresses, fds): (Vec<String>, Vec<RawFd>) = listeners
        .iter()
        .map(|(addr, fd)| (addr.to_string(), fd.as_raw_fd()))
        .unzip();
    stream.send(
        &Message::Listeners {
            addresses,
            proof: programs.prove(theirs, binding),
        },
        &fds,
    )?;
    Ok((pid, generation))
}

/// Binds the Unix socket at `path`, replacing whatever is there, in a
/// directory only root can enter; the socket itself is root's alone.
fn bind_private(path: &Path) -> io::Result<Listener> {
    if let Some(dir) = path.parent() {
        crate::private_dir::ensure(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = Listener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(socket)
}
