//! `/healthz` and `/readyz` — on the probe port and on the metrics port, as
//! the reference serves them — and `/metrics`.
//!
//! Both probes do what the reference's do: a request to every credential
//! listener, which must come back with its 404 for `/`. So a listener that
//! stopped answering (its address removed, its accept loop stuck) fails
//! liveness and the kubelet restarts the agent. 200 when all answered, 408
//! when the 10 s budget ran out, 500 `Internal Server Error occurred`
//! otherwise. A 200's body says more (our addition): the listeners, the
//! addresses that could not be bound, the attribution mode.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, StatusCode, body::Incoming, header};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::warn;

use crate::{
    serving::server::{HttpResponse, bare, go_error, not_found, text},
    telemetry::metrics::{self, Metrics},
};

/// The reference's budget for checking every listener.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ProbeState {
    /// Listeners that were bound (each checked on every probe).
    pub bound: Vec<SocketAddr>,
    /// Served addresses that could not be bound, with why.
    pub unbound: Vec<String>,
    /// Extra lines for a 200's body (e.g. the attribution mode in force).
    pub details: Vec<String>,
}

/// The probe port: `/healthz`, `/readyz`.
pub async fn handle_probe(state: Arc<ProbeState>, req: Request<Incoming>) -> HttpResponse {
    match req.uri().path() {
        "/healthz" | "/readyz" => probe(&state).await,
        _ => not_found(),
    }
}

/// The metrics port: `/metrics`, and the probes too.
pub async fn handle_metrics(
    metrics: Arc<Metrics>,
    state: Arc<ProbeState>,
    req: Request<Incoming>,
) -> HttpResponse {
    match req.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        "/healthz" | "/readyz" => probe(&state).await,
        _ => not_found(),
    }
}

async fn probe(state: &ProbeState) -> HttpResponse {
    let checks = async {
        for addr in &state.bound {
            self_check(*addr)
                .await
                .map_err(|e| format!("listener {addr}: {e}"))?;
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, checks).await {
        Ok(Ok(())) => {
            let mut lines: Vec<String> = state
                .bound
                .iter()
                .map(|a| format!("listener {a}: ok"))
                .collect();
            lines.extend(state.unbound.iter().map(|u| format!("not served: {u}")));
            lines.extend(state.details.iter().cloned());
            text(StatusCode::OK, lines.join("\n"))
        }
        Ok(Err(e)) => {
            warn!(error = e, "failed probe");
            go_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error occurred",
            )
        }
        Err(_) => {
            warn!(timeout = ?PROBE_TIMEOUT, "failed probe: a listener did not answer in time");
            bare(StatusCode::REQUEST_TIMEOUT)
        }
    }
}

/// A request to a credential listener must come back with its 404.
async fn self_check(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let host = match addr {
        SocketAddr::V4(v4) => v4.ip().to_string(),
        SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
    };
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    if &head[9..12] == b"404" {
        Ok(())
    } else {
        Err(format!(
            "unexpected status code received, expected 404, got {:?}",
            String::from_utf8_lossy(&head[9..12])
        ))
    }
}
