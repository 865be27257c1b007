//! The credential listeners are served by `--worker-threads` threads: the
//! main runtime's worker, and one runtime of one worker each started here.
//! Each accepts on the same listening sockets (descriptors of them: the
//! kernel gives each new connection to one accept) and serves what it
//! accepted, start to end, on its own worker — nginx's workers, in
//! threads. A cached request never crosses threads, so there is no
//! cross-thread wake-up or work stealing per request: with one runtime of
//! several workers for all, that cost ~2 µs of CPU per cached request
//! (`cargo xtask bench`, CPU µs per request). (An EKS Auth call runs where
//! it was first asked for; others asking for the same identity wait on it.)
//!
//! The runtimes are multi-threaded in kind, though of one worker: a
//! blocking section (the previous agent vouching for a connection during an
//! upgrade) hands the worker on (`block_in_place`) instead of stalling the
//! thread's other connections.
//!
//! Everything else (probes, metrics, the IMDS guard, housekeeping, an
//! upgrade's handover) stays on the main runtime.

use std::{
    future::Future,
    io,
    os::fd::{AsFd as _, OwnedFd},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    runtime::{Builder, Runtime},
    sync::watch,
};
use tracing::error;

/// One listener's accept loop, as a serving thread runs it.
pub type AcceptLoop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Builds a thread's accept loops from its own descriptors of the
/// listeners, inside the thread's runtime (a listener belongs to the
/// runtime that registered it).
pub type MakeLoops = dyn Fn(Vec<TcpListener>) -> Vec<AcceptLoop> + Send + Sync;

/// The serving runtimes beyond the main one.
pub struct ServingThreads {
    runtimes: Vec<Runtime>,
    /// How many runtimes' accept loops have ended.
    ended: watch::Receiver<usize>,
}

/// Counts a runtime's accept loops as ended however they end (a panic
/// included): shutdown waits for all of them.
struct Ended(Arc<watch::Sender<usize>>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n += 1);
    }
}

/// What is left on a serving runtime after the grace gets this long to go.
const LEFTOVER_WAIT: Duration = Duration::from_secs(1);

impl ServingThreads {
    /// Starts `count` runtimes, each serving its own descriptors of
    /// `listeners` with the loops `make` builds. One that cannot start is
    /// logged and left out: the others, and the main runtime, serve.
    pub fn start(count: usize, listeners: &[TcpListener], make: &Arc<MakeLoops>) -> ServingThreads {
        let (ended_tx, ended) = watch::channel(0usize);
        let ended_tx = Arc::new(ended_tx);
        let mut runtimes = Vec::with_capacity(count);
        for n in 1..=count {
            match Self::runtime(n, listeners, make.clone(), ended_tx.clone()) {
                Ok(runtime) => runtimes.push(runtime),
                Err(e) => error!(error = %e, thread = n, "a serving thread could not start"),
            }
        }
        ServingThreads { runtimes, ended }
    }

    fn runtime(
        n: usize,
        listeners: &[TcpListener],
        make: Arc<MakeLoops>,
        ended: Arc<watch::Sender<usize>>,
    ) -> io::Result<Runtime> {
        let fds = listeners
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<io::Result<Vec<OwnedFd>>>()?;
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("serving-{n}"))
            .enable_all()
            .build()?;
        runtime.spawn(async move {
            let _ended = Ended(ended);
            let loops = fds
                .into_iter()
                .map(|fd| TcpListener::from_std(std::net::TcpListener::from(fd)))
                .collect::<io::Result<Vec<_>>>()
                .map(|listeners| make(listeners));
            // What the loops share (the shutdown handle among it) is held
            // by them alone.
            drop(make);
            match loops {
                Ok(loops) => {
                    futures::future::join_all(loops).await;
                }
                Err(e) => {
                    error!(error = %e, thread = n, "a serving thread could not take its listeners");
                }
            }
        });
        Ok(runtime)
    }

    /// Waits until every runtime's accept loops ended (they end when
    /// accepting stops), and with them their hold on what they shared.
    pub async fn loops_ended(&mut self) {
        let all = self.runtimes.len();
        let _ = self.ended.wait_for(|n| *n >= all).await;
    }

    /// Ends the runtimes; whatever they still serve is dropped. Blocks:
    /// not from an async context.
    pub fn finish(self) {
        for runtime in self.runtimes {
            runtime.shutdown_timeout(LEFTOVER_WAIT);
        }
    }
}
