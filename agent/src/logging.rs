//! JSON logs on stderr through tracing, the reference agent's format.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. An unparsable level falls back to info
/// (and says so) rather than leaving the agent silent.
pub fn init(verbosity: &str) {
    let (filter, bad) = match EnvFilter::try_new(verbosity) {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new("info"), true),
    };
    let _ = fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_writer(std::io::stderr)
        .try_init();
    if bad {
        tracing::warn!(verbosity, "unrecognised verbosity, using info");
    }
}
