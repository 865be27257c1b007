//! The credential listeners are served by `--worker-threads` threads: the
//! main runtime's worker, and the others started here. Each accepts on the
//! same listening sockets (descriptors of them: the kernel gives each new
//! connection to one accept) and serves what it accepted, start to end, on
//! its own single-threaded runtime — nginx's workers, in threads. A
//! connection's requests never cross threads, so there is no cross-thread
//! wake-up or work stealing per request: with one multi-threaded runtime
//! for all, that cost ~2 µs of CPU per cached request (`cargo xtask bench`,
//! CPU µs per request).
//!
//! Everything else (probes, metrics, the IMDS guard, housekeeping, an
//! upgrade's handover) stays on the main runtime.

use std::{
    future::Future,
    io,
    os::fd::{AsFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    thread::JoinHandle,
};

use tokio::{net::TcpListener, sync::watch};
use tracing::error;

/// One listener's accept loop, as a serving thread runs it.
pub type AcceptLoop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds a thread's accept loops from its own descriptors of the
/// listeners, inside the thread's runtime (a listener belongs to the
/// runtime that registered it).
pub type MakeLoops = dyn Fn(Vec<TcpListener>) -> Vec<AcceptLoop> + Send + Sync;

/// The serving threads beyond the main runtime's.
pub struct ServingThreads {
    threads: Vec<JoinHandle<()>>,
    /// How many threads' accept loops have ended.
    ended: watch::Receiver<usize>,
    /// Set once every connection was given its grace: the threads' runtimes
    /// (and whatever is left on them) go.
    release: watch::Sender<bool>,
}

impl ServingThreads {
    /// Starts `count` threads, each serving its own descriptors of
    /// `listeners` with the loops `make` builds. A thread that cannot start
    /// is logged and left out: the others, and the main runtime, serve.
    pub fn start(count: usize, listeners: &[TcpListener], make: &Arc<MakeLoops>) -> ServingThreads {
        let (ended_tx, ended) = watch::channel(0usize);
        let ended_tx = Arc::new(ended_tx);
        let (release, released) = watch::channel(false);
        let mut threads = Vec::with_capacity(count);
        for n in 1..=count {
            let started = Self::thread(
                n,
                listeners,
                make.clone(),
                ended_tx.clone(),
                released.clone(),
            );
            match started {
                Ok(thread) => threads.push(thread),
                Err(e) => error!(error = %e, thread = n, "a serving thread could not start"),
            }
        }
        ServingThreads {
            threads,
            ended,
            release,
        }
    }

    fn thread(
        n: usize,
        listeners: &[TcpListener],
        make: Arc<MakeLoops>,
        ended: Arc<watch::Sender<usize>>,
        mut released: watch::Receiver<bool>,
    ) -> io::Result<JoinHandle<()>> {
        let fds = listeners
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name(format!("serving-{n}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let adopted = fds
                        .into_iter()
                        .map(|fd| TcpListener::from_std(std::net::TcpListener::from(fd)))
                        .collect::<io::Result<Vec<_>>>();
                    match adopted {
                        Ok(listeners) => {
                            let loops = make(listeners);
                            // What the loops share (the shutdown handle
                            // among it) is held by them alone.
                            drop(make);
                            futures::future::join_all(loops).await;
                        }
                        Err(e) => {
                            error!(error = %e, thread = n, "a serving thread could not take its listeners");
                        }
                    }
                    ended.send_modify(|n| *n += 1);
                    // Its connections are still being answered.
                    let _ = released.wait_for(|go| *go).await;
                });
            })
    }

    /// Waits until every thread's accept loops ended (they end when
    /// accepting stops), and with them their hold on what they shared.
    pub async fn loops_ended(&mut self) {
        let all = self.threads.len();
        let _ = self.ended.wait_for(|n| *n >= all).await;
    }

    /// Lets the threads end; whatever they still serve is dropped.
    pub fn finish(self) {
        self.release.send_replace(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
