//! The starting agent's side: if an agent serves on this node, take its
//! listening sockets instead of binding new ones, and tell it when this
//! agent accepts on them.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    caller::{
        attribution::{Accepted, AttributionError, Opener, OpenerLookup, pinned_key},
        syn::SavedSyn,
    },
    handover::{
        binding::{Binding, End},
        wire::{self, Channel, Message, WireError},
    },
};

/// How long the serving agent may take to answer the hello.
const ANSWER: Duration = Duration::from_secs(10);

/// The listening sockets taken from the serving agent, and the connection
/// to it (it keeps accepting until told this agent serves).
pub struct Inherited {
    listeners: Vec<(SocketAddr, TcpListener)>,
    predecessor: Channel,
    pid: i32,
}

/// Asks the agent serving at `path` for its listeners, saying which
/// generation of the kernel programs this agent runs (pinned under
/// `pin_dir`). `Ok(None)`: no agent serves there (first start, or the
/// previous one died). Each side proves it can read the serving agent's
/// pinned stamp key: no key, no handover. The socket and the key are
/// looked for only in directories this agent would itself use (its own or
/// root's, see `private_dir`): in one another user made first, they could be
/// anyone's.
pub fn take_over(
    path: &Path,
    generation: Option<&str>,
    pin_dir: Option<&Path>,
) -> Result<Option<Inherited>, WireError> {
    if let Some(dir) = path.parent() {
        crate::private_dir::ensure(dir)?;
    }
    let stream = match Channel::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let pid = stream.require_root_peer()?;
    stream.send(
        &Message::Hello {
            version: wire::VERSION,
            generation: generation.map(str::to_owned),
        },
        &[],
    )?;
    let (challenge, theirs) = match stream.receive(Some(ANSWER))? {
        (Message::Challenge { nonce, generation }, _) => (nonce, generation),
        (other, _) => return Err(WireError::Unexpected(Box::new(other))),
    };
    // Uid 0 alone is no proof of being the serving agent (a process posing
    // as one would be handed every pod's token through sockets of its own).
    let key = match (theirs, pin_dir) {
        (Some(theirs), Some(pin_dir)) => {
            crate::private_dir::ensure(pin_dir)?;
            pinned_key(pin_dir, &theirs).map_err(|_| WireError::BadProof)?
        }
        (None, _) => return Err(WireError::BadProof),
        (Some(_), None) => return Err(WireError::NoKey),
    };
    let binding = Binding::of(&stream, End::Taker)?;
    let ours = wire::nonce()?;
    stream.send(
        &Message::Proof {
            mac: wire::prove(&key, challenge, binding),
            nonce: ours,
        },
        &[],
    )?;
    let (addresses, fds) = match stream.receive(Some(ANSWER))? {
        (Message::Listeners { addresses, proof }, fds) => {
            if proof != Some(wire::prove(&key, ours, binding)) {
                return Err(WireError::BadProof);
            }
            (addresses, fds)
        }
        (other, _) => return Err(WireError::Unexpected(Box::new(other))),
    };
    if fds.len() != addresses.len() {
        return Err(WireError::Descriptors(fds.len(), addresses.len()));
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for fd in fds {
        let listener = TcpListener::from(fd);
        // The kernel's word for what the socket is, not the message's.
        let addr = listener.local_addr()?;
        listeners.push((addr, listener));
    }
    Ok(Some(Inherited {
        listeners,
        predecessor: stream,
        pid,
    }))
}

impl Inherited {
    /// The inherited listener bound to `addr`, if any.
    pub fn take(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        let at = self.listeners.iter().position(|(a, _)| *a == addr)?;
        Some(self.listeners.swap_remove(at).1)
    }

    /// The previous agent, once the listeners this agent serves are taken
    /// (any other — an address this agent no longer serves — is closed
    /// here, and goes when the previous agent exits). In place before this
    /// agent accepts: it vouches for connections its programs stamped.
    pub fn into_predecessor(self) -> Predecessor {
        Predecessor {
            stream: Mutex::new(self.predecessor),
            pid: self.pid,
            desynchronised: AtomicBool::new(false),
        }
    }
}

/// The agent this one took over from, while it finishes its connections.
/// Dropping this closes the connection: if it still runs, it takes that for
/// this agent's death and accepts again.
pub struct Predecessor {
    /// One exchange at a time: lookups are request–answer pairs.
    stream: Mutex<Channel>,
    pid: i32,
    /// A lookup timed out: answers may be out of step, none is trusted.
    desynchronised: AtomicBool,
}

/// How long a lookup may wait for the previous agent's answer.
const LOOKUP: Duration = Duration::from_millis(500);

impl Predecessor {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Tells the previous agent that this one accepts now: it stops
    /// accepting and finishes its own connections.
    pub fn serving(&self) -> Result<(), WireError> {
        self.stream().send(&Message::Serving, &[])
    }

    fn stream(&self) -> MutexGuard<'_, Channel> {
        // A socket handle is not left inconsistent by a panic elsewhere.
        self.stream.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the previous agent who opened `conn`, whose stamp only its
    /// kernel programs can vouch for (it checks the MAC under its own key).
    pub fn opener(&self, conn: &Accepted) -> Result<Option<Opener>, AttributionError> {
        let SavedSyn::Kept(Some(stamp)) = conn.syn else {
            return Ok(None);
        };
        if self.desynchronised.load(Ordering::SeqCst) {
            return Err(AttributionError::Predecessor(
                "an earlier lookup went unanswered; no longer asked".into(),
            ));
        }
        let stream = self.stream();
        let lookup = Message::Lookup {
            id: stamp.id,
            mac: stamp.mac,
            peer: conn.peer,
            local: conn.local,
        };
        let failed = |e: WireError| AttributionError::Predecessor(e.to_string());
        stream.send(&lookup, &[]).map_err(failed)?;
        let deadline = Instant::now() + LOOKUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let answer = stream.receive(Some(left)).map_err(|e| {
                // Unanswered: whatever arrives later could be taken for the
                // next lookup's answer, so the channel is not used again.
                self.desynchronised.store(true, Ordering::SeqCst);
                failed(e)
            })?;
            match answer {
                // Not this lookup's answer, whole: never taken for it.
                (
                    Message::Opened {
                        id,
                        mac,
                        peer,
                        local,
                        ..
                    },
                    _,
                ) if (id, mac, peer, local) != (stamp.id, stamp.mac, conn.peer, conn.local) => {
                    continue;
                }
                (
                    Message::Opened {
                        opener: Some(opener),
                        ..
                    },
                    _,
                ) => return Ok(Some(opener)),
                (
                    Message::Opened {
                        refused: Some(why), ..
                    },
                    _,
                ) => {
                    return Err(AttributionError::Predecessor(why));
                }
                (Message::Opened { .. }, _) => return Ok(None),
                (other, _) => return Err(failed(WireError::Unexpected(Box::new(other)))),
            }
        }
    }

    /// Says this agent passed the listeners on to a successor, so the
    /// predecessor must not take them back when this agent exits.
    pub fn handed_on(&self) {
        let _ = self.stream().send(&Message::HandedOn, &[]);
    }
}

/// This agent's kernel programs first; for a stamp they did not make, the
/// previous agent's, while it runs (another build of the programs stamped
/// the connections opened before this agent's were attached).
pub struct WithPredecessor {
    pub own: Arc<dyn OpenerLookup>,
    pub predecessor: Arc<OnceLock<Predecessor>>,
}

impl OpenerLookup for WithPredecessor {
    fn opener(&self, conn: &Accepted) -> Result<Option<Opener>, AttributionError> {
        match self.own.opener(conn) {
            Err(AttributionError::ForgedStamp) => match self.predecessor.get() {
                // A blocking exchange (bounded): on a multi-threaded runtime
                // the worker's other tasks move elsewhere meanwhile.
                Some(predecessor) => match tokio::runtime::Handle::try_current() {
                    Ok(runtime)
                        if runtime.runtime_flavor()
                            == tokio::runtime::RuntimeFlavor::MultiThread =>
                    {
                        tokio::task::block_in_place(|| predecessor.opener(conn))
                    }
                    _ => predecessor.opener(conn),
                },
                None => Err(AttributionError::ForgedStamp),
            },
            other => other,
        }
    }
}
