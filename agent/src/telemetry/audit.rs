//! One audit event per credential request: who asked (from the kernel),
//! for what (from the token), what was decided and why. Never the token,
//! never a secret.
//!
//! Emitted on the `audit` tracing target — a log line with the reference's
//! `client-addr` and `cluster-name`, the event as an `audit` object — and,
//! if configured, appended to a file of its own, one JSON object per line,
//! by a writer thread (a slow disk never holds a request; what it cannot
//! keep up with is dropped and counted, see [`Auditor::lost`]).

use std::{borrow::Cow, fs::OpenOptions, path::Path, sync::Arc, time::SystemTime};

use serde::Serialize;
use tracing::{info, warn};

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
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<Arc<str>>,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub cgroup_id: Option<u64>,
    pub peer: String,
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
        let Some(json) = self.encode(event) else {
            return;
        };
        // The request's one log line, with the reference agent's fields
        // and the event as an object.
        info!(
            target: AUDIT_TARGET,
            client_addr = event.peer,
            cluster_name = self.cluster_name,
            audit = json.as_str(),
            "credential request"
        );
        self.append(json);
    }

    /// An IMDS guard event: same sinks, same shape (the event as an
    /// `audit` object in the log line).
    pub fn emit_imds(&self, event: &ImdsAuditEvent) {
        let Some(json) = self.encode(event) else {
            return;
        };
        info!(
            target: AUDIT_TARGET,
            cluster_name = self.cluster_name,
            audit = json.as_str(),
            "imds connect"
        );
        self.append(json);
    }

    fn encode(&self, event: &impl Serialize) -> Option<String> {
        match serde_json::to_string(event) {
            Ok(json) => {
                self.metrics.audit_event();
                Some(json)
            }
            Err(e) => {
                warn!(error = %e, "audit event could not be encoded");
                None
            }
        }
    }

    fn append(&self, mut json: String) {
        if let Some(file) = &self.file {
            json.push('\n');
            // Whole lines: those of concurrent requests never interleave.
            file.spool.line(json.as_bytes());
        }
    }

    /// What the audit file lost so far.
    pub fn lost(&self) -> Lost {
        self.file
            .as_ref()
            .map_or_else(Lost::default, |f| f.spool.lost())
    }
}
