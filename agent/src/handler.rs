//! The credential endpoint's request flow, top to bottom, each step a call
//! into the module that owns it (DESIGN §2.2 order):
//!
//! 1. Host check — the SDK must have called one of the served addresses.
//! 2. Token present (`Authorization`, raw, no `Bearer`).
//! 3. Token claims readable; `exp`/`nbf` valid.
//! 4. Credentials from the cache or EKS Auth (single-flight).
//! 5. Answer the SDK's JSON; count and log.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    credentials::{CacheKey, Credentials, Source},
    metrics::Metrics,
    server::{ConnInfo, HttpResponse, text},
    token,
    upstream::Assumed,
};

pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// Everything the handler needs, shared by all connections.
pub struct AppState {
    pub cluster_name: String,
    /// Served addresses as the Host header must name them.
    pub served_hosts: Vec<IpAddr>,
    pub credentials: Credentials,
    pub metrics: Arc<Metrics>,
}

/// The SDK's credential JSON (DESIGN §2.1).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsBody<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
    expiration: String,
}

/// Routes one request on the credential listener.
pub async fn handle(state: Arc<AppState>, conn: ConnInfo, req: Request<Incoming>) -> HttpResponse {
    if req.uri().path() != CREDENTIALS_PATH {
        return text(404, "Not Found");
    }
    let started = Instant::now();
    let _in_flight = state.metrics.in_flight();
    let response = if req.method() == Method::GET {
        credentials(&state, conn, &req).await
    } else {
        // Only GET is meaningful; say which.
        let mut r = text(405, "Method Not Allowed: use GET");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        r
    };
    state.metrics.response(response.status().as_u16(), started);
    response
}

async fn credentials(state: &AppState, conn: ConnInfo, req: &Request<Incoming>) -> HttpResponse {
    let client = conn.peer.to_string();
    // 1. Host.
    let host = host_of(req);
    if !state
        .served_hosts
        .iter()
        .any(|h| Some(*h) == host.parse::<IpAddr>().ok())
    {
        let served: Vec<String> = state.served_hosts.iter().map(IpAddr::to_string).collect();
        warn!(
            client_addr = client,
            host, "called through an address that is not served"
        );
        return text(
            403,
            format!(
                "Access Denied. Called agent through invalid address, please use either [{}] address not {host}",
                served.join(" ")
            ),
        );
    }
    // 2. Token present.
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    if token.is_empty() {
        warn!(
            client_addr = client,
            "request without a service account token"
        );
        return text(400, "Service account token cannot be empty");
    }
    // 3. Claims.
    if let Err(e) =
        token::parse(token).and_then(|claims| token::validate_times(&claims, SystemTime::now()))
    {
        warn!(client_addr = client, error = %e, "token rejected before EKS Auth");
        return text(400, e.to_string());
    }
    // 4. Credentials.
    match state
        .credentials
        .get(CacheKey::of_token(token), token)
        .await
    {
        Ok((assumed, source)) => {
            info!(
                client_addr = client,
                cluster_name = state.cluster_name,
                association_id = assumed.association_id,
                cache = if source == Source::Cache {
                    "hit"
                } else {
                    "miss"
                },
                "served credentials"
            );
            json_credentials(&assumed)
        }
        Err(e) => {
            warn!(client_addr = client, cluster_name = state.cluster_name, error = %e, "EKS Auth call failed");
            text(e.status(), e.to_string())
        }
    }
}

/// The Host header without port or brackets (`[fd00:ec2::23]:80` → `fd00:ec2::23`).
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or_default();
    strip_port(raw).to_owned()
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        // Exactly one colon: `ipv4:port` or `name:port`; more is a bare IPv6.
        Some((h, _port)) if !h.contains(':') => h,
        _ => host,
    }
}

fn json_credentials(assumed: &Assumed) -> HttpResponse {
    let body = CredentialsBody {
        access_key_id: &assumed.access_key_id,
        secret_access_key: &assumed.secret_access_key,
        token: &assumed.session_token,
        account_id: assumed.account_id.as_deref(),
        expiration: humantime::format_rfc3339_seconds(assumed.expiration).to_string(),
    };
    match serde_json::to_vec(&body) {
        Ok(json) => {
            let mut r = Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            *r.status_mut() = StatusCode::OK;
            r
        }
        Err(e) => text(500, format!("encoding credentials failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_forms() {
        let cases = [
            ("169.254.170.23", "169.254.170.23"),
            ("169.254.170.23:80", "169.254.170.23"),
            ("[fd00:ec2::23]:80", "fd00:ec2::23"),
            ("[fd00:ec2::23]", "fd00:ec2::23"),
            ("fd00:ec2::23", "fd00:ec2::23"),
            ("localhost:80", "localhost"),
        ];
        for (raw, expected) in cases {
            assert_eq!(strip_port(raw), expected, "{raw}");
        }
    }
}
