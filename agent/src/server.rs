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
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{Semaphore, watch},
};
use tracing::{debug, warn};

pub type HttpResponse = Response<Full<Bytes>>;

/// What the server knows about a connection, handed to every request on it.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Limits that keep one slow or hostile client from hurting the others.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Headers must arrive within this (slowloris); needs hyper's timer.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Binds `host:port`, with SO_REUSEADDR so a restarted agent rebinds at
/// once despite connections in TIME_WAIT.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Binds every host; failures are returned, not fatal (one address family
/// missing must not take the other down).
pub fn bind_all(hosts: &[IpAddr], port: u16) -> (Vec<TcpListener>, Vec<(SocketAddr, io::Error)>) {
    let mut bound = Vec::new();
    let mut failed = Vec::new();
    for host in hosts {
        let addr = SocketAddr::new(*host, port);
        match bind(addr) {
            Ok(l) => bound.push(l),
            Err(e) => failed.push((addr, e)),
        }
    }
    (bound, failed)
}

/// Accepts on `listener` until `stop` flips, serving each connection with
/// `handle`; each connection holds one of `permits` (the connection cap,
/// shared by the listeners given the same semaphore). Connections are
/// registered with `graceful` so shutdown can let in-flight requests finish.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: HttpLimits,
    permits: Arc<Semaphore>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
    handle: H,
) where
    H: Fn(ConnInfo, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            _ = stop.changed() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
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
        let local = match stream.local_addr() {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "connection gone before it could be served");
                continue;
            }
        };
        let info = ConnInfo { peer, local };
        let handle = handle.clone();
        let service = service_fn(move |req| {
            let response = handle(info, req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(client = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// A plain-text response.
pub fn text(status: u16, body: impl Into<String>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body.into())));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
