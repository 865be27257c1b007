//! The EKS Pod Identity Agent: serves pod credentials on the link-local
//! address and knows, from the kernel, which pod is asking.
//!
//! Folders group what belongs together (docs/architecture.md §1):
//! `caller` — who opened a connection and whether that is the token's pod;
//! `serving` — listeners, admission, the request flow, probes;
//! `imds` — the IMDS guard; `telemetry` — metrics, the audit trail, logs. One module per concern
//! inside each; the request flow reads top to bottom in
//! `serving::handler`, each step a call into the module that owns it.

pub mod capabilities;
pub mod config;
pub mod credentials;
pub mod daemon;
pub(crate) mod hygiene;
pub mod link;
pub(crate) mod node_credentials;
pub(crate) mod private_dir;
pub(crate) mod sockopt;
pub mod token;
pub mod upstream;

/// Who opened a connection, and whether that is the token's pod.
pub mod caller {
    pub mod attribution;
    pub mod cgroup;
    pub(crate) mod identify;
    pub mod pins;
    pub(crate) mod policy;
    pub mod syn;
}

/// Listeners, admission, the credential endpoint, probes.
pub mod serving {
    pub mod admission;
    pub mod client;
    pub mod handler;
    pub(crate) mod pauses;
    pub mod ports;
    pub(crate) mod probes;
    pub(crate) mod ratelimit;
    pub(crate) mod server;
    pub(crate) mod threads;
}

/// Passing the node's listeners from a serving agent to its successor.
pub mod handover {
    pub mod binding;
    pub mod giving;
    pub mod taking;
    pub mod wire;
}

/// The IMDS guard: which pods reach for the node's own credentials, and
/// stopping those that may not.
pub mod imds {
    pub mod events;
    pub mod guard;
    pub mod handoff;
    pub mod inventory;
    pub mod policy;
    pub mod watch;
}

/// Metrics, the audit trail, logs.
pub mod telemetry {
    pub mod audit;
    pub mod logging;
    pub mod losses;
    pub mod metrics;
    pub mod spool;
}
