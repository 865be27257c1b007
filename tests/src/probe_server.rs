//! A bare TCP server that asks the kernel attribution who opened each
//! accepted connection — from the stamp in the SYN it saved, as the agent
//! does: the server half of the attribution tests, without HTTP in the way.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use agent::{
    caller::attribution::{Accepted, Opener, OpenerLookup},
    caller::syn,
};
use anyhow::{Context as _, Result};

use crate::netns::{self, Netns};

/// What the server saw for one accepted connection.
#[derive(Debug)]
pub struct Observation {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub caller: Result<Option<Opener>, String>,
}

pub struct ProbeServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub observations: mpsc::Receiver<Observation>,
}

impl ProbeServer {
    /// Listens on `addrs` inside `ns`; every accepted connection is looked
    /// up, reported, answered with one byte and closed by the client.
    pub fn start(
        ns: &Netns,
        addrs: &[SocketAddr],
        lookup: Arc<dyn OpenerLookup>,
    ) -> Result<ProbeServer> {
        let ns_file = ns.open()?;
        let addrs = addrs.to_vec();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (tx, observations) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let listeners = netns::enter(&ns_file).and_then(|()| {
                addrs
                    .iter()
                    .map(|a| {
                        let l = TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
                        // Set after listen: SYNs arriving from now on are saved.
                        syn::save_syns(&l).context("TCP_SAVE_SYN")?;
                        l.set_nonblocking(true)?;
                        Ok(l)
                    })
                    .collect::<Result<Vec<_>>>()
            });
            let listeners = match listeners {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            serve(&listeners, &*lookup, &tx, &stop_flag);
        });
        ready_rx.recv().context("probe server thread died")??;
        Ok(ProbeServer {
            stop,
            thread: Some(thread),
            observations,
        })
    }
}

fn serve(
    listeners: &[TcpListener],
    lookup: &dyn OpenerLookup,
    tx: &mpsc::Sender<Observation>,
    stop: &AtomicBool,
) {
    let mut fds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        for listener in listeners {
            while let Ok((mut stream, peer)) = listener.accept() {
                let local = stream.local_addr().unwrap_or(peer);
                let caller = syn::saved_syn(&stream)
                    .map_err(anyhow::Error::from)
                    .and_then(|syn| Ok(lookup.opener(&Accepted { peer, local, syn })?))
                    .map_err(|e| format!("{e:#}"));
                let _ = tx.send(Observation {
                    peer,
                    local,
                    caller,
                });
                let _ = stream.set_nonblocking(false);
                let _ = stream.write_all(b".");
            }
        }
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
