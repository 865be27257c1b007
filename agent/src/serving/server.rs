//! HTTP plumbing: binding each served address, accepting with a connection
//! cap, hyper with header timeouts and size caps, graceful shutdown.
//!
//! Routing and the request flow live in `handler`; this module only moves
//! connections and hands each request, with its connection's context, over.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{Notify, watch},
};
use tracing::{debug, warn};

use super::pauses::Pauses;
use crate::{
    caller::attribution::Accepted,
    caller::syn::{self, SavedSyn},
    sockopt,
};

pub type HttpResponse = Response<Full<Bytes>>;

/// A connection's context that the budget may evict: the server closes the
/// connection when this fires.
pub trait Evictable {
    fn eviction(&self) -> Arc<Notify>;
}

/// The kernel's listen backlog (capped by `net.core.somaxconn`). Deep, so a
/// burst is queued rather than answered with SYN cookies, which carry no
/// saved SYN and so no attribution.
const LISTEN_BACKLOG: u32 = 4096;

/// Data the client does not acknowledge for this long (a zero window held
/// open, a vanished peer) ends the connection and frees its place.
const UNACKED_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits that keep one slow or hostile client from hurting the others.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Headers must arrive within this (slowloris), also while a
    /// keep-alive connection waits for its next request (the connection's `HeaderClock`).
    pub header_read_timeout: Duration,
    /// A new connection must send its first byte within this, or it is
    /// closed before any HTTP state exists for it.
    pub first_request_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Binds `host:port`, with SO_REUSEADDR so a restarted agent rebinds at
/// once despite connections in TIME_WAIT. `save_syns`: keep each accepted
/// connection's SYN, where the kernel's attribution stamp travels.
pub fn bind(addr: SocketAddr, save_syns: bool) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    prepare(&socket, save_syns)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What every listener carries, and every connection it accepts inherits
/// from it (no syscall per connection): the SYN kept where the agent
/// attributes, and the unacknowledged-data timeout.
fn prepare(listener: &impl std::os::fd::AsRawFd, save_syns: bool) -> io::Result<()> {
    if save_syns {
        syn::save_syns(listener)?;
    }
    let unacked_ms = UNACKED_TIMEOUT.as_millis() as libc::c_int;
    sockopt::set(
        listener,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        unacked_ms,
    )
}

/// A listening socket inherited from the agent this one took over from,
/// made ready for this agent's accept loop.
pub fn adopt(listener: std::net::TcpListener, save_syns: bool) -> io::Result<TcpListener> {
    listener.set_nonblocking(true)?;
    prepare(&listener, save_syns)?;
    TcpListener::from_std(listener)
}

/// Opens every host with `open` (bind, or adopt an inherited socket);
/// failures are returned, not fatal (one address family missing must not
/// take the other down).
pub fn open_all(
    hosts: &[IpAddr],
    port: u16,
    mut open: impl FnMut(SocketAddr) -> io::Result<TcpListener>,
) -> (Vec<TcpListener>, Vec<(SocketAddr, io::Error)>) {
    let mut bound = Vec::new();
    let mut failed = Vec::new();
    for host in hosts {
        let addr = SocketAddr::new(*host, port);
        match open(addr) {
            Ok(l) => bound.push(l),
            Err(e) => failed.push((addr, e)),
        }
    }
    (bound, failed)
}

/// Whether the listeners accept: `Paused` once a successor agent accepts on
/// the same sockets (this agent then only finishes its connections, each
/// answered with `Connection: close`), `Stop` at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepting {
    Yes,
    Paused,
    Stop,
}

/// Accepts on `listener` while `accepting` says so, until it says `Stop`;
/// `pauses` knows when it stands paused. Accepting never waits: each
/// connection gets its own task, which reads the SYN's stamp and asks
/// `admit` for the connection's context (who is calling, its place in the
/// budget); `None` closes the connection at once. Admitted connections are
/// served with `handle` and registered with `graceful` so shutdown lets
/// in-flight requests finish.
pub async fn serve<A, C, H, F>(
    listener: TcpListener,
    limits: HttpLimits,
    graceful: Arc<GracefulShutdown>,
    mut accepting: watch::Receiver<Accepting>,
    pauses: Arc<Pauses>,
    admit: A,
    handle: H,
) where
    A: Fn(Accepted) -> Option<C> + Send + Sync + 'static,
    C: Evictable + Send + Sync + 'static,
    H: Fn(Arc<C>, Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        // The header deadline is the connection's own (`HeaderClock`):
        // hyper's makes and drops a timer per request.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    let admit = Arc::new(admit);
    let handle = Arc::new(handle);
    // Asked once: a listener that keeps no SYNs has none to read.
    let saves_syns = syn::saves_syns(&listener);
    // A listener bound to one address accepts only on it: its connections'
    // local address needs no syscall each (a wildcard one's does).
    let bound_to = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    let _running = pauses.running();
    loop {
        let now = *accepting.borrow_and_update();
        match now {
            Accepting::Yes => {}
            Accepting::Stop => return,
            Accepting::Paused => {
                // The socket stays open (the successor accepts on it), and
                // this agent takes it back if the successor goes.
                let _standing = pauses.paused();
                if accepting.changed().await.is_err() {
                    return;
                }
                continue;
            }
        }
        let (stream, peer) = tokio::select! {
            changed = accepting.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (builder, admit, handle) = (builder.clone(), admit.clone(), handle.clone());
        let (watcher, first_request) = (graceful.watcher(), limits.first_request_timeout);
        let header_limit = limits.header_read_timeout;
        let draining = accepting.clone();
        tokio::spawn(async move {
            let Some(local) = bound_to.or_else(|| stream.local_addr().ok()) else {
                return;
            };
            let syn = if saves_syns {
                syn::saved_syn(&stream).unwrap_or_else(|e| {
                    // EINVAL (a SYN longer than the buffer) or any other
                    // error: a SYN without a stamp, so unattributed.
                    debug!(client = %peer, error = %e, "reading the saved SYN failed");
                    SavedSyn::Kept(None)
                })
            } else {
                SavedSyn::Missing
            };
            let Some(context) = admit(Accepted { peer, local, syn }) else {
                return;
            };
            let eviction = context.eviction();
            // Idle openers go before any HTTP state is made for them.
            tokio::select! {
                ready = tokio::time::timeout(first_request, stream.readable()) => {
                    if !matches!(ready, Ok(Ok(()))) {
                        debug!(client = %peer, "no request within the first-request deadline");
                        return;
                    }
                }
                () = eviction.notified() => return,
            }
            let context = Arc::new(context);
            let clock = Arc::new(HeaderClock::new());
            let waiting = clock.clone();
            let service = service_fn(move |req| {
                // The headers are in: no deadline while it is answered.
                waiting.answering();
                let response = handle(context.clone(), req);
                let (draining, waiting) = (draining.clone(), waiting.clone());
                async move {
                    let mut response = response.await;
                    waiting.waiting();
                    // Handed over: this answer is the connection's last, so
                    // the client opens its next one to the successor. (An
                    // idle connection is left to its client or to the
                    // shutdown grace: closing it now could race a request.)
                    if *draining.borrow() != Accepting::Yes {
                        response.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // The connection first: headers that came in just before the
                // deadline are read (and the clock stopped) before it is
                // looked at, as hyper's own deadline did.
                biased;
                result = watcher.watch(conn) => {
                    if let Err(e) = result {
                        debug!(client = %peer, error = %e, "connection ended with an error");
                    }
                }
                () = eviction.notified() => {
                    debug!(client = %peer, "connection evicted to make room");
                }
                () = clock.overdue(header_limit) => {
                    debug!(client = %peer, "no request headers within the header-read deadline");
                }
            }
        });
    }
}

/// A connection's header-read deadline (slowloris): a request's headers
/// must be in within the limit of the connection being made, or of its
/// last answer — so a keep-alive connection that idles that long is closed
/// too. Kept per connection, with one timer that is set again only when it
/// fires: hyper's own deadline made, registered and dropped a timer for
/// every request.
struct HeaderClock {
    /// What `since` counts from.
    start: Instant,
    /// Nanoseconds from `start` to when the connection began waiting for
    /// headers, or [`ANSWERING`].
    since: AtomicU64,
}

/// `HeaderClock::since` while a request is answered.
const ANSWERING: u64 = u64::MAX;

impl HeaderClock {
    fn new() -> HeaderClock {
        HeaderClock {
            start: Instant::now(),
            since: AtomicU64::new(0),
        }
    }

    fn answering(&self) {
        self.since.store(ANSWERING, Ordering::Relaxed);
    }

    fn waiting(&self) {
        let since = self.start.elapsed().as_nanos();
        self.since.store(
            u64::try_from(since).unwrap_or(ANSWERING - 1),
            Ordering::Relaxed,
        );
    }

    /// Since when it waits for headers; `None` while answering.
    fn waiting_since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            ANSWERING => None,
            nanos => Some(self.start + Duration::from_nanos(nanos)),
        }
    }

    /// Resolves once headers were waited for longer than `limit` (never,
    /// for a limit beyond what the clock can count).
    async fn overdue(&self, limit: Duration) {
        loop {
            let deadline = match self.waiting_since() {
                Some(since) => since.checked_add(limit),
                // Answering: nothing is due before a whole limit from now.
                None => Instant::now().checked_add(limit),
            };
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(deadline.into()).await;
            let due = self
                .waiting_since()
                .and_then(|since| since.checked_add(limit));
            if due.is_some_and(|due| due <= Instant::now()) {
                return;
            }
        }
    }
}

/// A plain-text response (a success's body, as written).
pub fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// An error as Go's `http.Error` writes it, which is what operators of the
/// reference grep for: `text/plain; charset=utf-8`,
/// `X-Content-Type-Options: nosniff`, the message and a newline.
pub fn go_error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    let mut response = text(status, format!("{message}\n"));
    response.headers_mut().insert(
        hyper::header::X_CONTENT_TYPE_OPTIONS,
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    response
}

/// Go's `http.NotFound`.
pub fn not_found() -> HttpResponse {
    go_error(StatusCode::NOT_FOUND, "404 page not found")
}

/// A status with an empty body (Go's `WriteHeader` alone).
pub fn bare(status: StatusCode) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_unacked_timeout() {
        let listener = bind(([127, 0, 0, 1], 0).into(), false).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let got =
            sockopt::get(&accepted, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT).expect("getsockopt");
        assert_eq!(got, UNACKED_TIMEOUT.as_millis() as libc::c_int);
    }
}
