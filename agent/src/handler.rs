//! The credential endpoint's request flow, top to bottom, each step a call
//! into the module that owns it (docs/architecture.md §1; the order of
//! the reference's status table, §7):
//!
//! 0. Per-client rate limit (pod, system service, unverified, or source).
//! 1. Host check — the SDK must have called one of the served addresses.
//! 2. Token present (`Authorization`, raw, no `Bearer`).
//! 3. Token claims readable; `exp`/`nbf` valid.
//! 4. Who is calling: the kernel's record of the connection → pod
//!    (resolved once, when the connection was accepted).
//! 5. Caller checks before EKS Auth (pod, token binding, subject, node).
//! 6. Credentials from the cache or EKS Auth (single-flight).
//! 7. EKS Auth's subject must be the token's.
//! 8. Answer the SDK's JSON; one audit event per request.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use serde::Serialize;
use tracing::{debug, warn};

use crate::{
    admission::Connection,
    audit::{AuditEvent, Auditor},
    cgroup::PodCgroup,
    credentials::{CacheKey, Credentials, Source},
    hygiene::PodRegistry,
    identify::{Identified, Identifier},
    metrics::Metrics,
    policy::{self, Caller, Violation},
    ratelimit::ClientRateLimiter,
    server::{HttpResponse, go_error, not_found},
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
    pub auditor: Auditor,
    /// Caller verification; `None` when attribution is off.
    pub verification: Option<Verification>,
    /// Per-client request rate, in every mode (`None`: unlimited).
    pub limiter: Option<ClientRateLimiter>,
    /// The reference's rate for all clients together (`None`: unlimited).
    pub global_limiter: Option<governor::DefaultDirectRateLimiter>,
}

/// How callers are verified when attribution is on.
pub struct Verification {
    /// Refuse on a failed check (enforce) or only record it (audit).
    pub enforce: bool,
    pub identifier: Identifier,
    pub node_name: Option<String>,
    /// Which pod each identity cached for an attributed caller belongs to.
    pub registry: PodRegistry,
}

impl AppState {
    fn mode(&self) -> &'static str {
        match &self.verification {
            None => "off",
            Some(v) if v.enforce => "enforce",
            Some(_) => "audit",
        }
    }
}

/// The SDK's credential JSON (docs/architecture.md §6.1).
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
pub async fn handle(
    state: Arc<AppState>,
    conn: Arc<Connection>,
    req: Request<Incoming>,
) -> HttpResponse {
    if req.uri().path() != CREDENTIALS_PATH {
        return not_found();
    }
    let started = Instant::now();
    // The reference's limit for everyone together, before anything else.
    if let Some(global) = &state.global_limiter
        && global.check().is_err()
    {
        let response = go_error(429, "Too Many Requests");
        state.metrics.response(429, started);
        return response;
    }
    let _in_flight = state.metrics.in_flight();
    // Any method is a credential request, as the reference treats it: the
    // method carries nothing, the token is the request.
    let mut event = AuditEvent {
        time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        peer: conn.info.peer.to_string(),
        mode: state.mode(),
        ..AuditEvent::default()
    };
    let response = credentials(&state, &conn, &req, &mut event).await;
    event.status = response.status().as_u16();
    if event.decision.is_empty() {
        event.decision = if event.status == 200 { "allow" } else { "deny" };
    }
    event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    state.auditor.emit(&event);
    state.metrics.response(response.status().as_u16(), started);
    response
}

async fn credentials(
    state: &AppState,
    conn: &Connection,
    req: &Request<Incoming>,
    event: &mut AuditEvent,
) -> HttpResponse {
    let client = conn.info.peer;
    if let Some(identified) = &conn.identified {
        fill_caller(event, identified);
    }
    // 0. Rate, before anything else: a flood of bad requests costs no
    // more than a flood of good ones (and floods no log).
    if let Some(limiter) = &state.limiter {
        let who = conn.admitted.client();
        if !limiter.allow(who) {
            event.reason = "rate-limited".into();
            state.metrics.decision("deny", "rate-limited");
            debug!(client_addr = %client, client = %who, "client exceeded its credential request rate");
            return go_error(
                429,
                format!("Too Many Requests: {who} exceeded its credential request rate"),
            );
        }
    }
    // 1. Host.
    let host = host_of(req);
    debug!(client_addr = %client, target_host = host, "validating call to requested target host");
    let called = host.parse::<IpAddr>().ok();
    if !called.is_some_and(|ip| state.served_hosts.contains(&ip)) {
        let served: Vec<String> = state.served_hosts.iter().map(IpAddr::to_string).collect();
        warn!(client_addr = %client, host, "called through an address that is not served");
        event.reason = "invalid-host".into();
        return go_error(
            403,
            format!(
                "Access Denied. Called agent through invalid address, please use either [{}] address not {host}",
                served.join(" ")
            ),
        );
    }
    debug!(client_addr = %client, "target host valid");
    // 2. Token present.
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim();
    if token.is_empty() {
        warn!(client_addr = %client, "request without a service account token");
        event.reason = "no-token".into();
        return go_error(400, "Service account token cannot be empty");
    }
    // 3. Claims.
    let claims = match token::parse(token) {
        Ok(claims) => claims,
        Err(e) => return reject_token(client, e, event),
    };
    event.namespace = claims.namespace().map(str::to_owned);
    event.service_account = claims.service_account().map(str::to_owned);
    event.pod_name = claims.pod_name().map(str::to_owned);
    if let Err(e) = token::validate_times(&claims, SystemTime::now()) {
        return reject_token(client, e, event);
    }
    // 4. Who is calling (the kernel's record, resolved when the connection
    // was accepted), 5. checks before EKS Auth.
    let mut audit_only: Option<Violation> = None;
    let mut verified_pod: Option<PodCgroup> = None;
    if let (Some(verification), Some(identified)) = (&state.verification, &conn.identified) {
        match policy::before_upstream(
            &identified.caller,
            &claims,
            verification.node_name.as_deref(),
        ) {
            Ok(()) => {
                if let Caller::Pod(pod) = &identified.caller {
                    verified_pod = Some(pod.clone());
                }
            }
            Err(violation) if verification.enforce => {
                return refuse(state, client, violation, event);
            }
            Err(violation) => audit_only = Some(violation),
        }
    }
    // 7. Credentials. In enforce mode keyed by the kernel-verified pod and
    // its service account, so the kubelet's rotated tokens share the entry.
    let key = match (&state.verification, &verified_pod) {
        (Some(verification), Some(pod)) if verification.enforce => CacheKey::Pod {
            uid: pod.pod_uid.clone(),
            namespace: claims.namespace().unwrap_or_default().to_owned(),
            service_account: claims.service_account().unwrap_or_default().to_owned(),
        },
        _ => CacheKey::of_token(token),
    };
    let (assumed, source) = match state.credentials.get(&key, token).await {
        Ok(found) => found,
        Err(e) => {
            warn!(client_addr = %client, cluster_name = state.cluster_name, error = %e, "EKS Auth call failed");
            event.reason = format!("upstream:{}", e.code());
            return go_error(e.status(), e);
        }
    };
    if let (Some(verification), Some(pod), Source::Upstream) =
        (&state.verification, &verified_pod, source)
    {
        // A newly cached identity: remember its pod, so the entry goes
        // when the pod does.
        let dir = verification
            .identifier
            .resolver()
            .mount()
            .join(&pod.pod_path);
        verification.registry.record(key, dir);
    }
    event.association_id = Some(assumed.association_id.clone());
    event.role_arn = Some(assumed.role_arn.clone());
    event.cache = Some(source.label());
    // 8. EKS Auth's subject must be the token's.
    if let Some(verification) = &state.verification
        && audit_only.is_none()
        && let Err(violation) = policy::after_upstream(&claims, &assumed)
    {
        if verification.enforce {
            return refuse(state, client, violation, event);
        }
        audit_only = Some(violation);
    }
    // 9. Answer (the audit event, emitted by the caller, is the log line).
    match (&state.verification, audit_only) {
        (Some(_), Some(violation)) => {
            event.decision = "audit-only";
            event.reason = violation.reason().into();
            state.metrics.decision("audit-only", violation.reason());
            warn!(client_addr = %client, check = %violation, "caller check failed; served because attribution is in audit mode");
        }
        (Some(_), None) => {
            event.reason = "ok".into();
            state.metrics.decision("allow", "ok");
        }
        (None, _) => event.reason = "ok".into(),
    }
    json_credentials(&assumed)
}

fn reject_token(client: SocketAddr, e: token::TokenError, event: &mut AuditEvent) -> HttpResponse {
    warn!(client_addr = %client, error = %e, "token rejected before EKS Auth");
    event.reason = "invalid-token".into();
    go_error(400, e)
}

fn refuse(
    state: &AppState,
    client: SocketAddr,
    violation: Violation,
    event: &mut AuditEvent,
) -> HttpResponse {
    event.decision = "deny";
    event.reason = violation.reason().into();
    state.metrics.decision("deny", violation.reason());
    warn!(client_addr = %client, check = %violation, "caller check failed; refused");
    match violation.status() {
        403 => go_error(403, format!("Access Denied: {violation}")),
        status => {
            let mut response = go_error(status, format!("Service Unavailable: {violation}"));
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

fn fill_caller(event: &mut AuditEvent, identified: &Identified) {
    if let Some(kernel) = identified.kernel {
        event.pid = Some(kernel.pid);
        event.cgroup_id = Some(kernel.cgroup_id);
    }
    event.process = identified.process.clone();
    if let Caller::Pod(pod) = &identified.caller {
        event.pod_uid = Some(pod.pod_uid.clone());
        event.container_id = pod.container_id.clone();
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
        Err(_) => go_error(500, "Unable to serialize credentials"),
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
