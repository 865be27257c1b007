//! `/healthz`, `/readyz` (probe port, localhost) and `/metrics`.
//!
//! Ready means what the reference means — a request to each served
//! listener comes back (its 404 for an unknown path) — plus the upstream
//! client exists (it is built before anything listens) and which served
//! addresses could not be bound, so a missing family is visible.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{Request, body::Incoming, header};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    metrics::Metrics,
    server::{HttpResponse, text},
};

pub struct ProbeState {
    /// Listeners that were bound (self-checked on every /readyz).
    pub bound: Vec<SocketAddr>,
    /// Served addresses that could not be bound, with why.
    pub unbound: Vec<String>,
    /// Extra lines for /readyz (e.g. the attribution mode in force).
    pub details: Vec<String>,
}

pub async fn handle_probe(state: Arc<ProbeState>, req: Request<Incoming>) -> HttpResponse {
    match req.uri().path() {
        "/healthz" => text(200, "ok"),
        "/readyz" => readiness(&state).await,
        _ => text(404, "Not Found"),
    }
}

async fn readiness(state: &ProbeState) -> HttpResponse {
    let mut lines = Vec::new();
    let mut ready = !state.bound.is_empty();
    for addr in &state.bound {
        match self_check(*addr).await {
            Ok(()) => lines.push(format!("listener {addr}: ok")),
            Err(e) => {
                ready = false;
                lines.push(format!("listener {addr}: {e}"));
            }
        }
    }
    lines.extend(state.unbound.iter().map(|u| format!("not served: {u}")));
    lines.extend(state.details.iter().cloned());
    text(if ready { 200 } else { 503 }, lines.join("\n") + "\n")
}

/// A request to a served listener must come back with its 404.
async fn self_check(addr: SocketAddr) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let host = match addr {
            SocketAddr::V4(v4) => v4.ip().to_string(),
            SocketAddr::V6(v6) => format!("[{}]", v6.ip()),
        };
        let request =
            format!("GET /readyz-self-check HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
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
                "unexpected answer {:?}",
                String::from_utf8_lossy(&head)
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 2s".into()))
}

pub async fn handle_metrics(metrics: Arc<Metrics>, req: Request<Incoming>) -> HttpResponse {
    if req.uri().path() != "/metrics" {
        return text(404, "Not Found");
    }
    let mut response = text(200, metrics.encode());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    response
}
