//! The EKS Pod Identity Agent: serves pod credentials on the link-local
//! address and knows, from the kernel, which pod is asking.
//!
//! One module per concern; the request flow reads top to bottom in the
//! server's handler, each step a call into the module that owns it.

pub mod admission;
pub mod attribution;
pub mod audit;
pub mod capabilities;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod handler;
pub mod hygiene;
pub mod identify;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod node_credentials;
pub mod policy;
pub mod probes;
pub mod ratelimit;
pub mod server;
pub mod syn;
pub mod token;
pub mod upstream;
