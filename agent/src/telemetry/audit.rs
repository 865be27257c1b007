//! One audit event per credential request: who asked (from the kernel),
//! for what (from the token), what was decided and why. Never the token,
//! never a secret.
//!
//! Emitted on the `audit` tracing target — a log line with the reference's
//! `client-addr` and `cluster-name`, the event as an `audit` object — and,
//! if configured, appended to a file of its own, one JSON object per line,
//! by a writer thread (a slow disk never holds a request; what it cannot
//! keep up with is dropped and counted, see [`Auditor::lost`]).

use std::{
    borrow::Cow, cell::RefCell, fs::OpenOptions, net::SocketAddr, path::Path, sync::Arc,
    time::SystemTime,
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    caller::attribution::Comm,
    token::{Claims, Parsed},
};

use super::{
    logging::AUDIT_TARGET,
    metrics::Metrics,
    spool::{Lost, Spool, SpoolGuard},
};

/// What was decided for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Allow,
    #[default]
    Deny,
    /// A failed check, served because attribution is in audit mode.
    AuditOnly,
}

impl Decision {
    /// As metrics label it (and the audit event writes it).
    pub fn label(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::AuditOnly => "audit-only",
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct AuditEvent {
    pub time: Millis,
    /// `allow`, `deny`, or `audit-only`; a request is denied until decided.
    pub decision: Decision,
    /// Static but for EKS Auth's error codes.
    pub reason: Cow<'static, str>,
    pub status: u16,
    pub mode: &'static str,
    /// Shared with the cached caller: no copy per request.
    pub pod_uid: Option<Arc<str>>,
    /// `namespace`, `service_account`, `pod_name`.
    #[serde(flatten)]
    pub token: TokenNames,
    pub container_id: Option<Arc<str>>,
    pub pid: Option<u32>,
    pub process: Option<Comm>,
    pub cgroup_id: Option<u64>,
    pub peer: Peer,
    /// Shared with the cache entry: no copy per request.
    pub association_id: Option<Arc<str>>,
    pub role_arn: Option<Arc<str>>,
    pub cache: Option<&'static str>,
    pub latency_ms: f64,
}

/// A time as RFC 3339 with milliseconds, written straight into the event's
/// JSON (no string of its own per request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Millis(pub SystemTime);

impl Default for Millis {
    fn default() -> Millis {
        Millis(SystemTime::UNIX_EPOCH)
    }
}

impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

/// What the token names — its namespace, service account and pod — read
/// from the parsed token it shares (kept per connection): no copies per
/// request.
#[derive(Clone, Debug, Default)]
pub struct TokenNames(pub Option<Arc<Parsed>>);

impl Serialize for TokenNames {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let claims = self.0.as_ref().map(|parsed| &parsed.claims);
        let mut names = s.serialize_struct("TokenNames", 3)?;
        names.serialize_field("namespace", &claims.and_then(Claims::namespace))?;
        names.serialize_field("service_account", &claims.and_then(Claims::service_account))?;
        names.serialize_field("pod_name", &claims.and_then(Claims::pod_name))?;
        names.end()
    }
}

/// The client's address as `ip:port` text, formatted once per connection:
/// every request writes it twice (the event's `peer`, the log line's
/// `client-addr`), and formatting a socket address is most of the cost of
/// writing it.
#[derive(Clone, Copy)]
pub struct Peer {
    len: u8,
    text: [u8; PEER_TEXT],
}

/// The longest `ip:port`: `[` IPv6 with a scope id `]:` port (58 bytes).
const PEER_TEXT: usize = 64;

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let mut text = [0; PEER_TEXT];
        let mut rest = &mut text[..];
        // Writing into a slice fails only if it is too short: it is not.
        let _ = std::io::Write::write_fmt(&mut rest, format_args!("{addr}"));
        let len = (PEER_TEXT - rest.len()) as u8;
        Peer { len, text }
    }

    pub fn as_str(&self) -> &str {
        // Only a socket address's Display (ASCII) was written.
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl Default for Peer {
    fn default() -> Peer {
        Peer::new(SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One connect to the instance metadata service (or, `aggregated`, the
/// `count` further connects of the same pod and decision in one interval).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImdsAuditEvent {
    pub time: Millis,
    /// Always `imds-connect`: tells these from credential requests.
    pub event: &'static str,
    /// `allow`, `deny`, or `audit-only`.
    pub decision: &'static str,
    pub reason: &'static str,
    /// The guard's mode (`audit`, `enforce`).
    pub mode: &'static str,
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
    pub pid: u32,
    pub process: String,
    pub cgroup_id: u64,
    /// Whether the caller shares the node's network namespace (a
    /// hostNetwork pod, or a node process).
    pub host_network: bool,
    pub destination: String,
    pub count: u64,
    pub aggregated: bool,
}

/// Where audit events go. Each event is encoded once; the log line embeds
/// that encoding, the audit file gets it as a line. Neither write blocks
/// the request: both go through bounded spools whose drops are counted.
pub struct Auditor {
    cluster_name: String,
    file: Option<AuditFile>,
    metrics: Arc<Metrics>,
}

struct AuditFile {
    spool: Spool,
    /// Dropping it writes out what is pending.
    _flush_on_drop: SpoolGuard,
}

thread_local! {
    /// Each thread's buffer for encoding audit events (see
    /// [`Auditor::encoded`]).
    static EVENT_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A buffer grown beyond this by a rare long event is not kept.
const EVENT_BUFFER_KEPT: usize = 16 * 1024;

/// Bytes of audit lines held while the disk is slow, at most.
const PENDING_LIMIT: usize = 4 << 20;

impl Auditor {
    pub fn new(
        cluster_name: &str,
        path: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Auditor> {
        let file = match path {
            None => None,
            Some(p) => {
                let file = OpenOptions::new().create(true).append(true).open(p)?;
                let (spool, guard) = Spool::start(file, "audit-writer", PENDING_LIMIT)?;
                Some(AuditFile {
                    spool,
                    _flush_on_drop: guard,
                })
            }
        };
        Ok(Auditor {
            cluster_name: cluster_name.to_owned(),
            file,
            metrics,
        })
    }

    pub fn emit(&self, event: &AuditEvent) {
        self.encoded(event, |json| {
            // The request's one log line, with the reference agent's fields
            // and the event as an object.
            info!(
                target: AUDIT_TARGET,
                client_addr = event.peer.as_str(),
                cluster_name = self.cluster_name,
                audit = json,
                "credential request"
            );
        });
    }

    /// An IMDS guard event: same sinks, same shape (the event as an
    /// `audit` object in the log line).
    pub fn emit_imds(&self, event: &ImdsAuditEvent) {
        self.encoded(event, |json| {
            info!(
                target: AUDIT_TARGET,
                cluster_name = self.cluster_name,
                audit = json,
                "imds connect"
            );
        });
    }

    /// Encodes `event` once, into this thread's buffer (a fresh string per
    /// event was regrown three times on the way to a request's ~600
    /// bytes), hands the encoding to `log`, then appends it to the file as
    /// a line.
    fn encoded(&self, event: &impl Serialize, log: impl FnOnce(&str)) {
        let mut buffer = EVENT_BUFFER.try_with(RefCell::take).unwrap_or_default();
        buffer.clear();
        let json = serde_json::to_writer(&mut buffer, event)
            .map_err(|e| e.to_string())
            // serde_json writes UTF-8 only; checked, not assumed.
            .and_then(|()| std::str::from_utf8(&buffer).map_err(|e| e.to_string()));
        let encoded = match json {
            Ok(json) => {
                self.metrics.audit_event();
                log(json);
                true
            }
            Err(e) => {
                warn!(error = %e, "audit event could not be encoded");
                false
            }
        };
        if encoded && let Some(file) = &self.file {
            buffer.push(b'\n');
            // Whole lines: those of concurrent requests never interleave.
            file.spool.line(&buffer);
        }
        if buffer.capacity() <= EVENT_BUFFER_KEPT {
            let _ = EVENT_BUFFER.try_with(|kept| kept.replace(buffer));
        }
    }

    /// What the audit file lost so far.
    pub fn lost(&self) -> Lost {
        self.file
            .as_ref()
            .map_or_else(Lost::default, |f| f.spool.lost())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        caller::attribution::Opener,
        token::{KubernetesClaims, ObjectRef},
    };

    #[test]
    fn a_peer_is_its_socket_addresss_text_up_to_the_longest() {
        use std::net::{Ipv6Addr, SocketAddrV6};
        let longest = SocketAddrV6::new(Ipv6Addr::from([0xffff; 8]), 65535, 0, u32::MAX);
        for addr in [
            "10.0.0.1:5".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "[fd00:ec2::23]:80".parse().unwrap(),
            "[::ffff:255.255.255.255]:65535".parse().unwrap(),
            SocketAddr::V6(longest),
        ] {
            let peer = Peer::new(addr);
            assert_eq!(peer.as_str(), addr.to_string());
            assert_eq!(serde_json::to_value(peer).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn each_event_is_one_whole_line_and_the_reused_buffer_carries_nothing_over() {
        let dir = std::env::temp_dir().join(format!("epia-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let _ = std::fs::remove_file(&path);
        let auditor = Auditor::new("c", Some(&path), Arc::new(Metrics::new())).unwrap();
        let opener = Opener {
            cgroup_id: 7,
            pid: 42,
            comm: *b"pod-client\0\0\0\0\0\0",
        };
        let named = |name: &str| ObjectRef {
            name: Some(name.into()),
            uid: None,
        };
        let parsed = Parsed {
            raw: "t".into(),
            claims: Claims {
                kubernetes: Some(KubernetesClaims {
                    namespace: Some("ns".into()),
                    pod: Some(named("p")),
                    serviceaccount: Some(named("sa")),
                    node: None,
                }),
                ..Claims::default()
            },
            digest: [0; 32],
        };
        let long = AuditEvent {
            peer: Peer::new("10.0.0.1:5".parse().unwrap()),
            token: TokenNames(Some(Arc::new(parsed))),
            pod_uid: Some("u".repeat(300).into()),
            process: opener.process(),
            pid: Some(opener.pid),
            ..AuditEvent::default()
        };
        let short = AuditEvent {
            peer: Peer::new("[fd00:ec2::23]:80".parse().unwrap()),
            ..AuditEvent::default()
        };
        auditor.emit(&long);
        auditor.emit(&short);
        drop(auditor);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["peer"], "10.0.0.1:5");
        assert_eq!(lines[0]["process"], "pod-client");
        assert_eq!(lines[0]["pod_uid"].as_str().map(str::len), Some(300));
        assert_eq!(
            (
                &lines[0]["namespace"],
                &lines[0]["service_account"],
                &lines[0]["pod_name"]
            ),
            (&"ns".into(), &"sa".into(), &"p".into())
        );
        assert_eq!(lines[1]["peer"], "[fd00:ec2::23]:80");
        assert_eq!(lines[1]["process"], serde_json::Value::Null);
        assert_eq!(lines[1]["pod_uid"], serde_json::Value::Null);
        for name in ["namespace", "service_account", "pod_name"] {
            assert_eq!(lines[1][name], serde_json::Value::Null, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
