//! A fake EKS Auth that speaks the real rest-json protocol (docs/architecture.md §6.2):
//! `POST /clusters/{name}/assume-role-for-pod-identity`, SigV4-signed by the
//! SDK, `{"token": …}` in, the service's JSON or `x-amzn-ErrorType` errors
//! out. It verifies the token as the service does — RS256 signature against
//! the test issuer's key, audience, expiry — and looks the (namespace,
//! service account) up in its association table.
//!
//! Knobs for tests: an injected fault (error status/type, dropped
//! connection, malformed JSON), added latency, credential lifetime, a
//! different subject; and a call counter.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use crate::{netns::Netns, tokens::AUDIENCE};

pub const ACCOUNT: &str = "111122223333";
pub const REGION: &str = "us-west-2";

/// An injected failure, applied to every call until cleared.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An error response: status and exception name (`Throttling` →
    /// `ThrottlingException`).
    Error { status: u16, name: String },
    /// Close the connection without answering.
    DropConnection,
    /// 200 with a body that is not JSON.
    MalformedJson,
}

#[derive(Clone, Debug)]
pub struct Knobs {
    pub fault: Option<Fault>,
    pub latency: Duration,
    pub credential_lifetime: Duration,
    /// Answer with this (namespace, service account) as the subject.
    pub subject_override: Option<(String, String)>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            fault: None,
            latency: Duration::ZERO,
            credential_lifetime: Duration::from_secs(6 * 3600),
            subject_override: None,
        }
    }
}

struct State {
    key: DecodingKey,
    associations: Mutex<HashMap<(String, String), String>>,
    knobs: Mutex<Knobs>,
    calls: AtomicUsize,
    issued: AtomicUsize,
    issued_for: Mutex<HashMap<(String, String), usize>>,
    last_node_name: Mutex<Option<String>>,
    /// The access key id the last request was signed with.
    last_signing_key: Mutex<Option<String>>,
}

pub struct FakeEksAuth {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeEksAuth {
    /// Starts on 127.0.0.1 (an ephemeral port) inside `netns`, or in the
    /// caller's namespace if `None` (loopback only either way).
    pub fn start(netns: Option<&Netns>, key: DecodingKey) -> Result<FakeEksAuth> {
        let state = Arc::new(State {
            key,
            associations: Mutex::new(HashMap::new()),
            knobs: Mutex::new(Knobs::default()),
            calls: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            issued_for: Mutex::new(HashMap::new()),
            last_node_name: Mutex::new(None),
            last_signing_key: Mutex::new(None),
        });
        let ns_file = netns.map(Netns::open).transpose()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let served = state.clone();
        let thread = std::thread::spawn(move || {
            let setup = (|| -> Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                if let Some(ns) = &ns_file {
                    crate::netns::enter(ns)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                listener.set_nonblocking(true)?;
                Ok((rt, listener))
            })();
            let (rt, listener) = match setup {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
                tokio::select! {
                    _ = stop_rx => {}
                    _ = accept_loop(listener, served) => {}
                }
            });
        });
        let addr = ready_rx.recv().context("fake EKS Auth thread died")??;
        Ok(FakeEksAuth {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Associates (namespace, service account) with a role name.
    pub fn associate(&self, namespace: &str, service_account: &str, role: &str) {
        if let Ok(mut a) = self.state.associations.lock() {
            a.insert(
                (namespace.to_owned(), service_account.to_owned()),
                role.to_owned(),
            );
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut Knobs)) {
        if let Ok(mut k) = self.state.knobs.lock() {
            change(&mut k);
        }
    }

    /// Requests received (each SDK retry counts).
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Credentials handed out.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// The access key id that signed the last request.
    pub fn last_signing_key(&self) -> Option<String> {
        self.state
            .last_signing_key
            .lock()
            .ok()
            .and_then(|k| k.clone())
    }

    /// `eksNodeName` of the last request (None if it had none).
    pub fn last_node_name(&self) -> Option<String> {
        self.state
            .last_node_name
            .lock()
            .ok()
            .and_then(|n| n.clone())
    }

    /// Credentials handed out for one (namespace, service account).
    pub fn issued_for(&self, namespace: &str, service_account: &str) -> usize {
        self.state
            .issued_for
            .lock()
            .ok()
            .and_then(|m| {
                m.get(&(namespace.to_owned(), service_account.to_owned()))
                    .copied()
            })
            .unwrap_or(0)
    }
}

impl Drop for FakeEksAuth {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Answer = Response<Full<Bytes>>;

/// `Err` makes hyper drop the connection without an answer.
async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Answer, std::io::Error> {
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let request_id = format!("req-{n:06}");
    let knobs = state.knobs.lock().map(|k| k.clone()).unwrap_or_default();
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    match &knobs.fault {
        Some(Fault::DropConnection) => {
            return Err(std::io::Error::other("dropping the connection"));
        }
        Some(Fault::MalformedJson) => {
            return Ok(respond(
                200,
                &request_id,
                None,
                Bytes::from_static(b"{not json"),
            ));
        }
        Some(Fault::Error { status, name }) => {
            return Ok(error(*status, name, "injected by the test", &request_id));
        }
        None => {}
    }
    Ok(assume_role(&state, &knobs, req, &request_id).await)
}

async fn assume_role(
    state: &State,
    knobs: &Knobs,
    req: Request<Incoming>,
    request_id: &str,
) -> Answer {
    let path = req.uri().path().to_owned();
    let cluster = path
        .strip_prefix("/clusters/")
        .and_then(|rest| rest.strip_suffix("/assume-role-for-pod-identity"));
    if req.method() != hyper::Method::POST || cluster.is_none_or(str::is_empty) {
        return error(
            404,
            "ResourceNotFound",
            &format!("no such operation {path}"),
            request_id,
        );
    }
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let signed = authorization.starts_with("AWS4-HMAC-SHA256 ")
        && authorization.contains("/eks-auth/aws4_request");
    // `Credential=<access key id>/<date>/<region>/eks-auth/aws4_request`
    if let Ok(mut key) = state.last_signing_key.lock() {
        *key = authorization
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .map(str::to_owned);
    }
    if !signed {
        return error(
            403,
            "AccessDenied",
            "request is not SigV4-signed for eks-auth",
            request_id,
        );
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "InvalidRequest", "unreadable body", request_id),
    };
    let request = serde_json::from_slice::<Value>(&body).unwrap_or_default();
    if let Ok(mut node) = state.last_node_name.lock() {
        *node = request
            .get("eksNodeName")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    let token = request
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let Some(token) = token else {
        return error(400, "InvalidParameter", "token is required", request_id);
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[AUDIENCE]);
    validation.leeway = 0;
    let claims = match jsonwebtoken::decode::<Value>(&token, &state.key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    error(400, "ExpiredToken", "token is expired", request_id)
                }
                _ => error(
                    400,
                    "InvalidToken",
                    &format!("token is invalid: {e}"),
                    request_id,
                ),
            };
        }
    };
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .and_then(|s| s.split_once(':'))
        .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()));
    let Some((namespace, service_account)) = subject else {
        return error(
            400,
            "InvalidToken",
            "subject is not a service account",
            request_id,
        );
    };
    let role = state.associations.lock().ok().and_then(|a| {
        a.get(&(namespace.clone(), service_account.clone()))
            .cloned()
    });
    let Some(role) = role else {
        return error(
            404,
            "ResourceNotFound",
            &format!("no pod identity association for {namespace}/{service_account}"),
            request_id,
        );
    };
    let issued = state.issued.fetch_add(1, Ordering::SeqCst) + 1;
    if let Ok(mut per) = state.issued_for.lock() {
        *per.entry((namespace.clone(), service_account.clone()))
            .or_default() += 1;
    }
    let expiration = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d + knobs.credential_lifetime).as_secs())
        .unwrap_or(0);
    let (subject_ns, subject_sa) = knobs
        .subject_override
        .clone()
        .unwrap_or((namespace, service_account));
    let pod = claims
        .pointer("/kubernetes.io/pod/name")
        .and_then(Value::as_str)
        .unwrap_or("pod");
    let association_id = format!("a-{:017x}", fxhash(&role));
    let session = format!("eks-test-clust-{pod}-{issued:08x}");
    let body = json!({
        "subject": {"namespace": subject_ns, "serviceAccount": subject_sa},
        "audience": AUDIENCE,
        "podIdentityAssociation": {
            "associationArn": format!("arn:aws:eks:{REGION}:{ACCOUNT}:podidentityassociation/test-cluster/{association_id}"),
            "associationId": association_id,
        },
        "assumedRoleUser": {
            "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{session}"),
            "assumeRoleId": format!("AROAEXAMPLEID:{session}"),
        },
        "credentials": {
            "sessionToken": format!("session-token-{issued}"),
            "secretAccessKey": format!("secret-{issued}"),
            "accessKeyId": format!("ASIAFAKE{issued:08}"),
            "expiration": expiration,
        },
    });
    respond(200, request_id, None, Bytes::from(body.to_string()))
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn error(status: u16, name: &str, message: &str, request_id: &str) -> Answer {
    let body = json!({ "message": message }).to_string();
    respond(
        status,
        request_id,
        Some(&format!("{name}Exception")),
        Bytes::from(body),
    )
}

fn respond(status: u16, request_id: &str, error_type: Option<&str>, body: Bytes) -> Answer {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("x-amzn-RequestId", request_id);
    if let Some(t) = error_type {
        builder = builder.header("x-amzn-ErrorType", t);
    }
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
