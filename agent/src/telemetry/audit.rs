//! One audit event per credential request: who asked (from the kernel),
//! for what (from the token), what was decided and why. Never the token,
//! never a secret.
//!
//! Emitted on the `audit` tracing target — a log line with the reference's
//! `client-addr` and `cluster-name`, the event as an `audit` object — and,
//! if configured, appended to a file of its own, one JSON object per line,
//! by a writer thread (a slow disk never holds a request; what it cannot
//! keep up with is dropped and counted, see [`Auditor::losses`]).

use std::{
    fs::OpenOptions,
    io::Write,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tracing::{info, warn};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, WorkerGuard};

use super::{logging::lines_writer, metrics::Metrics};

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
    pub time: String,
    /// `allow`, `deny`, or `audit-only`; a request is denied until decided.
    pub decision: Decision,
    pub reason: String,
    pub status: u16,
    pub mode: &'static str,
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    pub container_id: Option<String>,
    pub pid: Option<u32>,
    pub process: Option<String>,
    pub cgroup_id: Option<u64>,
    pub peer: String,
    pub association_id: Option<String>,
    pub role_arn: Option<String>,
    pub cache: Option<&'static str>,
    pub latency_ms: f64,
}

/// Where audit events go. Each event is encoded once; the log line embeds
/// that encoding, the audit file gets it as a line. Neither write blocks
/// the request: both go through bounded queues whose drops are counted.
pub struct Auditor {
    cluster_name: String,
    file: Option<AuditFile>,
    metrics: Arc<Metrics>,
}

struct AuditFile {
    queue: NonBlocking,
    dropped: ErrorCounter,
    failed: Arc<AtomicU64>,
    /// Dropping it writes out what is queued.
    _flush_on_drop: WorkerGuard,
}

/// What became of the audit trail's lines so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuditLosses {
    /// Dropped because the file's writer was that far behind.
    pub dropped: u64,
    /// Writes the file refused (a full disk, an I/O error).
    pub failed: u64,
}

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
                let failed = Arc::new(AtomicU64::new(0));
                let (queue, guard) = lines_writer(
                    Counted {
                        inner: file,
                        failed: failed.clone(),
                    },
                    "audit-writer",
                );
                Some(AuditFile {
                    dropped: queue.error_counter(),
                    queue,
                    failed,
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
        let mut json = match serde_json::to_string(event) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "audit event could not be encoded");
                return;
            }
        };
        self.metrics.audit_event();
        // The request's one log line, with the reference agent's fields
        // and the event as an object.
        info!(
            target: "audit",
            client_addr = event.peer,
            cluster_name = self.cluster_name,
            audit = json.as_str(),
            "credential request"
        );
        if let Some(file) = &self.file {
            json.push('\n');
            // One line per write: lines of concurrent requests never
            // interleave. A full queue drops the line and counts it.
            let _ = file.queue.clone().write_all(json.as_bytes());
        }
    }

    /// Lines of the audit file lost so far.
    pub fn losses(&self) -> AuditLosses {
        self.file
            .as_ref()
            .map_or_else(AuditLosses::default, |f| AuditLosses {
                dropped: f.dropped.dropped_lines() as u64,
                failed: f.failed.load(Ordering::Relaxed),
            })
    }
}

/// A writer that counts the writes its target refused.
struct Counted<W> {
    inner: W,
    failed: Arc<AtomicU64>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|_| {
            self.failed.fetch_add(1, Ordering::Relaxed);
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
