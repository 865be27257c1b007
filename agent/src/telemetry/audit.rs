//! One audit event per credential request: who asked (from the kernel),
//! for what (from the token), what was decided and why. Never the token,
//! never a secret.
//!
//! Emitted on the `audit` tracing target — a log line with the reference's
//! `client-addr` and `cluster-name`, the event as an `audit` object — and,
//! if configured, appended to a file of its own, one JSON object per line.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::Path,
    sync::Mutex,
};

use serde::Serialize;
use tracing::{info, warn};

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

pub struct Auditor {
    cluster_name: String,
    file: Option<Mutex<File>>,
}

impl Auditor {
    pub fn new(cluster_name: &str, path: Option<&Path>) -> std::io::Result<Auditor> {
        let file = path
            .map(|p| OpenOptions::new().create(true).append(true).open(p))
            .transpose()?
            .map(Mutex::new);
        Ok(Auditor {
            cluster_name: cluster_name.to_owned(),
            file,
        })
    }

    pub fn emit(&self, event: &AuditEvent) {
        let json = match serde_json::to_string(event) {
            Ok(j) => j,
            Err(e) => {
                warn!(error = %e, "audit event could not be encoded");
                return;
            }
        };
        // The request's one log line, with the reference agent's fields.
        info!(
            target: "audit",
            client_addr = event.peer,
            cluster_name = self.cluster_name,
            audit = json.as_str(),
            "credential request"
        );
        if let Some(file) = &self.file
            && let Ok(mut f) = file.lock()
            // One write per event: lines from concurrent requests never interleave.
            && let Err(e) = f.write_all(format!("{json}\n").as_bytes())
        {
            warn!(error = %e, "writing the audit log failed");
        }
    }
}
