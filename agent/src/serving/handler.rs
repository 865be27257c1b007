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
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Instant, SystemTime},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    header::{self, HeaderValue},
};
use tracing::{debug, warn};

use crate::{
    caller::cgroup::PodCgroup,
    caller::identify::{Identified, Identifier},
    caller::policy::{self, Caller, Violation},
    config::ModeInForce,
    credentials::{CacheKey, CredentialCache, Source},
    hygiene::PodRegistry,
    serving::admission::Connection,
    serving::ratelimit::ClientRateLimiter,
    serving::server::{HttpResponse, go_error, not_found},
    telemetry::audit::{AuditEvent, Auditor, Decision, Millis, TokenNames},
    telemetry::metrics::Metrics,
    token,
    upstream::Assumed,
};

pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// Everything the handler needs, shared by all connections.
pub struct AppState {
    pub cluster_name: String,
    /// Served addresses as the Host header must name them.
    pub served_hosts: Vec<IpAddr>,
    pub credentials: CredentialCache,
    pub metrics: Arc<Metrics>,
    pub auditor: Arc<Auditor>,
    /// Caller verification; `None` when attribution is off.
    pub verification: Option<Verification>,
    /// Who opened a connection (used when it is admitted); `None` when
    /// attribution is off.
    pub identifier: Option<Identifier>,
    /// Per-client request rate, in every mode (`None`: unlimited).
    pub limiter: Option<ClientRateLimiter>,
    /// The reference's rate for all clients together (`None`: unlimited).
    pub global_limiter: Option<governor::DefaultDirectRateLimiter>,
    /// Tokens parsed lately, for clients that connect per request.
    pub tokens: token::Recent,
}

/// Slots of [`AppState::tokens`]: more than the pods a node runs, so each
/// pod's current token stays parsed.
pub const RECENT_TOKENS: usize = 512;

/// How callers are verified when attribution is on.
pub struct Verification {
    /// Refuse on a failed check (enforce) or only record it (audit).
    pub enforce: bool,
    pub node_name: Option<String>,
    /// The host's cgroup2 mount: a pod's cgroup directory is below it.
    pub cgroup_mount: std::path::PathBuf,
    /// Which pod each identity cached for an attributed caller belongs to.
    pub registry: PodRegistry,
}

impl AppState {
    fn mode(&self) -> &'static str {
        let mode = match &self.verification {
            None => ModeInForce::Off,
            Some(v) if v.enforce => ModeInForce::Enforce,
            Some(_) => ModeInForce::Audit,
        };
        mode.label()
    }
}

/// Routes one request on the credential listener.
pub async fn handle<B>(
    state: Arc<AppState>,
    conn: Arc<Connection>,
    req: Request<B>,
) -> HttpResponse {
    if req.uri().path() != CREDENTIALS_PATH {
        return not_found();
    }
    let started = Instant::now();
    // The reference's limit for everyone together, before anything else.
    if let Some(global) = &state.global_limiter
        && global.check().is_err()
    {
        let response = go_error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
        state.metrics.response(429, started);
        return response;
    }
    let _in_flight = state.metrics.in_flight();
    // Any method is a credential request, as the reference treats it: the
    // method carries nothing, the token is the request.
    let mut event = AuditEvent {
        time: Millis(SystemTime::now()),
        peer: conn.peer,
        mode: state.mode(),
        ..AuditEvent::default()
    };
    let response = answer(&state, &conn, &req, &mut event).await;
    event.status = response.status().as_u16();
    if event.status == 200 && event.decision != Decision::AuditOnly {
        event.decision = Decision::Allow;
    }
    event.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    state.auditor.emit(&event);
    state.metrics.response(response.status().as_u16(), started);
    response
}

/// One credential request, top to bottom (the module doc lists the steps).
async fn answer<B>(
    state: &AppState,
    conn: &Connection,
    req: &Request<B>,
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
            return Rejection::RateLimited(who.to_string()).answer(state, client, event);
        }
    }
    // 1. Host.
    let host = host_of(req);
    debug!(client_addr = %client, target_host = host, "validating call to requested target host");
    let called = host.parse::<IpAddr>().ok();
    if !called.is_some_and(|ip| state.served_hosts.contains(&ip)) {
        return Rejection::InvalidHost(host.to_owned()).answer(state, client, event);
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
        return Rejection::NoToken.answer(state, client, event);
    }
    // 3. Claims (worked out once per connection for a repeated token).
    let parsed = match conn.token.parse(token, &state.tokens) {
        Ok(parsed) => parsed,
        Err(e) => return Rejection::Token(e).answer(state, client, event),
    };
    let claims = &parsed.claims;
    event.token = TokenNames(Some(parsed.clone()));
    if let Err(e) = token::validate_times(claims, SystemTime::now()) {
        return Rejection::Token(e).answer(state, client, event);
    }
    // 4. Who is calling (the kernel's record, resolved when the connection
    // was accepted), 5. checks before EKS Auth.
    let mut audit_only: Option<Violation> = None;
    let mut verified_pod: Option<&PodCgroup> = None;
    if let Some(verification) = &state.verification {
        // A connection the agent did not identify is nobody's: refused,
        // never waved through.
        static NOBODY: Caller = Caller::Unattributed;
        let caller = conn.identified.as_ref().map_or(&NOBODY, |i| &i.caller);
        match policy::before_upstream(caller, claims, verification.node_name.as_deref()) {
            Ok(()) => {
                if let Caller::Pod(pod) = caller {
                    verified_pod = Some(pod);
                }
            }
            Err(violation) if verification.enforce => {
                return Rejection::Caller(violation).answer(state, client, event);
            }
            Err(violation) => audit_only = Some(violation),
        }
    }
    // 7. Credentials. In enforce mode keyed by the kernel-verified pod and
    // its service account, so the kubelet's rotated tokens share the entry.
    let key = match (&state.verification, verified_pod) {
        (Some(verification), Some(pod)) if verification.enforce => CacheKey::pod(
            &pod.pod_uid,
            claims.namespace().unwrap_or_default(),
            claims.service_account().unwrap_or_default(),
        ),
        _ => CacheKey::TokenHash(parsed.digest),
    };
    let (assumed, source) = match state.credentials.get(&key, token, parsed.digest).await {
        Ok(found) => found,
        Err(e) => return Rejection::Upstream(e).answer(state, client, event),
    };
    if let (Some(verification), Some(pod), Source::Upstream | Source::Renewal) =
        (&state.verification, verified_pod, source)
    {
        // A newly cached (or renewed) identity: remember its pod, so the
        // entry goes when the pod does.
        let dir = verification.cgroup_mount.join(&pod.pod_path);
        verification.registry.record(key, dir);
    }
    event.association_id = Some(assumed.association_id.clone());
    event.role_arn = Some(assumed.role_arn.clone());
    event.cache = Some(source.label());
    // 8. EKS Auth's subject must be the token's.
    if let Some(verification) = &state.verification
        && audit_only.is_none()
        && let Err(violation) = policy::after_upstream(claims, &assumed)
    {
        if verification.enforce {
            return Rejection::Caller(violation).answer(state, client, event);
        }
        audit_only = Some(violation);
    }
    // 9. Answer (the audit event, emitted by the caller, is the log line).
    match (&state.verification, audit_only) {
        (Some(_), Some(violation)) => {
            event.decision = Decision::AuditOnly;
            event.reason = violation.reason().into();
            state
                .metrics
                .decision(Decision::AuditOnly, violation.reason());
            warn!(client_addr = %client, check = %violation, "caller check failed; served because attribution is in audit mode");
        }
        (Some(_), None) => {
            event.reason = "ok".into();
            state.metrics.decision(Decision::Allow, "ok");
        }
        (None, _) => event.reason = "ok".into(),
    }
    json_credentials(&assumed)
}

/// Every way a credential request is refused: its status, body, audit
/// reason, metric and log line, decided in one place, so each path is a row
/// of the handler's tests.
#[derive(Debug)]
enum Rejection {
    /// The client is over its request rate (its key, as text).
    RateLimited(String),
    /// The Host header names no served address (the header's host).
    InvalidHost(String),
    NoToken,
    /// Not a JWT, or `exp`/`nbf` failed.
    Token(token::TokenError),
    /// A caller check failed in enforce mode.
    Caller(Violation),
    /// EKS Auth refused, or did not answer.
    Upstream(crate::upstream::UpstreamError),
}

impl Rejection {
    fn status(&self) -> StatusCode {
        match self {
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::InvalidHost(_) => StatusCode::FORBIDDEN,
            Rejection::NoToken | Rejection::Token(_) => StatusCode::BAD_REQUEST,
            Rejection::Caller(violation) => violation.status(),
            Rejection::Upstream(e) => e.status(),
        }
    }

    /// The audit event's `reason`.
    fn reason(&self) -> Cow<'static, str> {
        match self {
            Rejection::RateLimited(_) => "rate-limited".into(),
            Rejection::InvalidHost(_) => "invalid-host".into(),
            Rejection::NoToken => "no-token".into(),
            Rejection::Token(_) => "invalid-token".into(),
            Rejection::Caller(violation) => violation.reason().into(),
            Rejection::Upstream(e) => format!("upstream:{}", e.code()).into(),
        }
    }

    /// The body, in the reference's words where it has them.
    fn body(&self, state: &AppState) -> String {
        match self {
            Rejection::RateLimited(who) => {
                format!("Too Many Requests: {who} exceeded its credential request rate")
            }
            Rejection::InvalidHost(host) => {
                let served: Vec<String> =
                    state.served_hosts.iter().map(IpAddr::to_string).collect();
                format!(
                    "Access Denied. Called agent through invalid address, please use either [{}] address not {host}",
                    served.join(" ")
                )
            }
            Rejection::NoToken => "Service account token cannot be empty".into(),
            Rejection::Token(e) => e.to_string(),
            Rejection::Caller(violation) if violation.status() == StatusCode::FORBIDDEN => {
                format!("Access Denied: {violation}")
            }
            Rejection::Caller(violation) => format!("Service Unavailable: {violation}"),
            Rejection::Upstream(e) => e.to_string(),
        }
    }

    /// Records the refusal (audit fields, the decision metric for the
    /// caller's own checks, one log line) and writes the answer.
    fn answer(self, state: &AppState, client: SocketAddr, event: &mut AuditEvent) -> HttpResponse {
        event.decision = Decision::Deny;
        event.reason = self.reason();
        match &self {
            Rejection::RateLimited(who) => {
                state.metrics.decision(Decision::Deny, "rate-limited");
                debug!(client_addr = %client, client = %who, "client exceeded its credential request rate");
            }
            Rejection::InvalidHost(host) => {
                warn!(client_addr = %client, host, "called through an address that is not served");
            }
            Rejection::NoToken => {
                warn!(client_addr = %client, "request without a service account token")
            }
            Rejection::Token(e) => {
                warn!(client_addr = %client, error = %e, "token rejected before EKS Auth");
            }
            Rejection::Caller(violation) => {
                state.metrics.decision(Decision::Deny, violation.reason());
                warn!(client_addr = %client, check = %violation, "caller check failed; refused");
            }
            Rejection::Upstream(e) => {
                warn!(client_addr = %client, cluster_name = state.cluster_name, error = %e, "EKS Auth call failed");
            }
        }
        let mut response = go_error(self.status(), self.body(state));
        if matches!(&self, Rejection::Caller(v) if v.status() == StatusCode::SERVICE_UNAVAILABLE) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn fill_caller(event: &mut AuditEvent, identified: &Identified) {
    if let Some(kernel) = identified.kernel {
        event.pid = Some(kernel.pid);
        event.cgroup_id = Some(kernel.cgroup_id);
    }
    event.process = identified.process();
    if let Caller::Pod(pod) = &identified.caller {
        event.pod_uid = Some(pod.pod_uid.clone());
        event.container_id = pod.container_id.clone();
    }
}

/// The Host header without port or brackets (`[fd00:ec2::23]:80` → `fd00:ec2::23`).
fn host_of<B>(req: &Request<B>) -> &str {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or_default();
    strip_port(raw)
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

/// The SDK's answer, as encoded when EKS Auth answered: every request the
/// credentials serve shares the one buffer.
fn json_credentials(assumed: &Assumed) -> HttpResponse {
    if assumed.answer.is_empty() {
        return go_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Unable to serialize credentials",
        );
    }
    let mut r = Response::new(Full::new(assumed.answer.clone()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::Mutex,
        time::{Duration, SystemTime},
    };

    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

    use super::*;
    use crate::{
        caller::{
            attribution::{Accepted, Opener},
            syn::SavedSyn,
        },
        credentials::{CacheOptions, CredentialCache},
        serving::{admission::ConnectionBudget, client::ClientKey},
        telemetry::audit::Peer,
        upstream::{Upstream, UpstreamError, UpstreamFuture},
    };

    const POD: &str = "0cc175b9-c0f1-b6a8-31c3-99e269772661";
    const OTHER: &str = "92eb5ffe-e6ae-2fec-3ad7-1c777531578f";

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

    /// EKS Auth answering for default/app, or failing as told.
    struct FakeUpstream(Mutex<Option<UpstreamError>>);

    impl Upstream for FakeUpstream {
        fn assume(&self, _token: String) -> UpstreamFuture {
            let failure = self.0.lock().map(|f| f.clone()).unwrap_or(None);
            Box::pin(async move {
                if let Some(err) = failure {
                    return Err(err);
                }
                Ok(crate::upstream::Assumed {
                    answer: crate::upstream::SdkAnswer {
                        access_key_id: "ASIATEST",
                        secret_access_key: "secret",
                        session_token: "session",
                        account_id: Some("111122223333"),
                        expiration: SystemTime::now() + Duration::from_secs(3600),
                    }
                    .encode(),
                    expiration: SystemTime::now() + Duration::from_secs(3600),
                    association_id: "a-1".into(),
                    role_arn: "arn:aws:sts::111122223333:assumed-role/r/s".into(),
                    subject: "default/app".into(),
                })
            })
        }
    }

    /// A projected-token-shaped JWT (unsigned: the agent never verifies).
    fn token(pod_uid: &str, exp: i64) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k"}"#);
        let claims = format!(
            r#"{{"exp":{exp},"sub":"system:serviceaccount:default:app","kubernetes.io":{{"namespace":"default","pod":{{"name":"p","uid":"{pod_uid}"}},"serviceaccount":{{"name":"app"}}}}}}"#
        );
        format!("{header}.{}.c2ln", URL_SAFE_NO_PAD.encode(claims))
    }

    fn pod_caller(uid: &str) -> policy::Caller {
        policy::Caller::Pod(PodCgroup {
            pod_uid: uid.into(),
            container_id: None,
            pod_path: format!("kubepods/pod{uid}"),
        })
    }

    /// One request's circumstances: the mode, who the kernel says called,
    /// what was sent, what EKS Auth does.
    struct Row {
        what: &'static str,
        mode: Option<bool>,
        /// Whether admission identified the connection (with a mode).
        identified: bool,
        caller: policy::Caller,
        host: &'static str,
        token: Option<String>,
        upstream: Option<UpstreamError>,
        rate_limited: bool,
        status: u16,
        reason: &'static str,
        decision: &'static str,
    }

    impl Default for Row {
        fn default() -> Row {
            Row {
                what: "",
                mode: Some(true),
                identified: true,
                caller: pod_caller(POD),
                host: "169.254.170.23",
                token: Some(token(POD, 4_000_000_000)),
                upstream: None,
                rate_limited: false,
                status: 200,
                reason: "ok",
                decision: "allow",
            }
        }
    }

    fn run(row: &Row, dir: &std::path::Path) -> (HttpResponse, serde_json::Value) {
        let metrics = Arc::new(Metrics::new());
        let audit_file = dir.join(format!("audit-{}.jsonl", row.what.replace(' ', "-")));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let response = runtime.block_on(async {
            let state = Arc::new(AppState {
                cluster_name: "c".into(),
                served_hosts: vec!["169.254.170.23".parse().unwrap()],
                credentials: CredentialCache::new(
                    Arc::new(FakeUpstream(Mutex::new(row.upstream.clone()))),
                    metrics.clone(),
                    CacheOptions {
                        max_entries: 10,
                        retention: Duration::from_secs(3600),
                        max_service_qps: 1.0,
                    },
                ),
                metrics: metrics.clone(),
                auditor: Arc::new(Auditor::new("c", Some(&audit_file), metrics.clone()).unwrap()),
                verification: row.mode.map(|enforce| Verification {
                    enforce,
                    node_name: None,
                    cgroup_mount: "/sys/fs/cgroup".into(),
                    registry: PodRegistry::default(),
                }),
                identifier: None,
                limiter: row
                    .rate_limited
                    .then(|| ClientRateLimiter::new(1, 1))
                    .flatten(),
                global_limiter: None,
                tokens: token::Recent::new(RECENT_TOKENS),
            });
            let peer: SocketAddr = "198.18.0.2:40000".parse().unwrap();
            let budget = ConnectionBudget::new(10, 10);
            let (admitted, _) = budget.admit(ClientKey::Pod(POD.into())).unwrap();
            let conn = Arc::new(Connection {
                peer: Peer::new(peer),
                info: Accepted {
                    peer,
                    local: "169.254.170.23:80".parse().unwrap(),
                    syn: SavedSyn::Kept(None),
                },
                identified: (row.mode.is_some() && row.identified).then(|| Identified {
                    caller: row.caller.clone(),
                    kernel: Some(Opener {
                        cgroup_id: 7,
                        pid: 42,
                        comm: *b"app\0\0\0\0\0\0\0\0\0\0\0\0\0",
                    }),
                }),
                admitted,
                token: Default::default(),
            });
            if row.rate_limited {
                let first = Request::builder()
                    .uri(CREDENTIALS_PATH)
                    .header(header::HOST, row.host)
                    .body(())
                    .unwrap();
                handle(state.clone(), conn.clone(), first).await;
            }
            let mut req = Request::builder()
                .uri(CREDENTIALS_PATH)
                .header(header::HOST, row.host);
            if let Some(token) = &row.token {
                req = req.header(header::AUTHORIZATION, token.as_str());
            }
            handle(state, conn, req.body(()).unwrap()).await
        });
        let trail = std::fs::read_to_string(&audit_file).unwrap_or_default();
        let event = trail
            .lines()
            .last()
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap_or_default();
        (response, event)
    }

    /// Every path through the handler, as a row: no kernel, no root.
    #[test]
    fn every_path_through_the_handler() {
        let dir = std::env::temp_dir().join(format!("epia-handler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let service_error = |status: u16, code: &str| UpstreamError::Service {
            status: StatusCode::from_u16(status).expect("a status"),
            code: code.into(),
            message: "m".into(),
            request_id: "r".into(),
            fault: "client",
        };
        let rows = [
            Row {
                what: "served",
                ..Row::default()
            },
            Row {
                what: "rate limited",
                rate_limited: true,
                status: 429,
                reason: "rate-limited",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "wrong host",
                host: "example.com",
                status: 403,
                reason: "invalid-host",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "no token",
                token: None,
                status: 400,
                reason: "no-token",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "not a JWT",
                token: Some("garbage".into()),
                status: 400,
                reason: "invalid-token",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "expired",
                token: Some(token(POD, 1)),
                status: 400,
                reason: "invalid-token",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "another pod's token",
                caller: pod_caller(OTHER),
                status: 403,
                reason: "pod-mismatch",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "not a pod",
                caller: policy::Caller::Unattributed,
                status: 403,
                reason: "caller-not-a-pod",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "no SYN kept",
                caller: policy::Caller::NoSynKept,
                status: 503,
                reason: "syn-not-kept",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "stamped by a previous agent that is gone",
                caller: policy::Caller::Unvouched,
                status: 503,
                reason: "previous-agent-gone",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "audit mode serves a replay",
                mode: Some(false),
                caller: pod_caller(OTHER),
                reason: "pod-mismatch",
                decision: "audit-only",
                ..Row::default()
            },
            Row {
                what: "enforce, connection never identified",
                identified: false,
                status: 403,
                reason: "caller-not-a-pod",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "attribution off",
                mode: None,
                ..Row::default()
            },
            Row {
                what: "EKS Auth refuses",
                upstream: Some(service_error(400, "AccessDeniedException")),
                status: 400,
                reason: "upstream:AccessDeniedException",
                decision: "deny",
                ..Row::default()
            },
            Row {
                what: "EKS Auth down",
                upstream: Some(UpstreamError::no_answer(
                    crate::upstream::NoAnswer::Unreachable,
                    "no answer",
                )),
                status: 500,
                reason: "upstream:Unreachable",
                decision: "deny",
                ..Row::default()
            },
        ];
        for row in &rows {
            let (response, event) = run(row, &dir);
            assert_eq!(response.status().as_u16(), row.status, "{}", row.what);
            assert_eq!(event["reason"], row.reason, "{}: {event}", row.what);
            assert_eq!(event["decision"], row.decision, "{}: {event}", row.what);
            assert_eq!(event["status"], row.status, "{}", row.what);
            // RFC 3339, UTC, milliseconds: `2026-01-02T03:04:05.678Z`.
            let time = event["time"].as_str().unwrap_or_default();
            assert!(
                time.len() == 24 && humantime::parse_rfc3339(time).is_ok(),
                "{}: {event}",
                row.what
            );
            if row.status != 200 {
                assert_eq!(
                    response
                        .headers()
                        .get("x-content-type-options")
                        .map(|v| v.to_str().unwrap()),
                    Some("nosniff"),
                    "{}",
                    row.what
                );
            }
            assert_eq!(
                response.headers().contains_key(header::RETRY_AFTER),
                row.status == 503,
                "{}",
                row.what
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
