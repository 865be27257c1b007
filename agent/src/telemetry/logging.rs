//! Logs as the reference agent writes them (logrus' JSON formatter, on
//! stdout): one JSON object per line with `level`, `msg`, `time` and the
//! event's fields, named with dashes (`client-addr`, `cluster-name`), so
//! log pipelines built for the AWS agent keep parsing.
//!
//! `-v` sets the level of this agent's own logs only. Libraries (the AWS
//! SDK, hyper, rustls, aya) stay at `warn` whatever `-v` says — the SDK's
//! orchestrator traces whole requests at TRACE, and what it redacts is its
//! business, not a guarantee of ours — unless `--log-filter` names them.

use std::fmt;

use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

/// The reference's verbosity, as logrus names its levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Panic,
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    /// The tracing level (panic and fatal log as errors).
    fn directive(self) -> &'static str {
        match self {
            Level::Panic | Level::Fatal | Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// Parses a logrus level name (case-insensitive; `warning` too).
pub fn parse_level(raw: &str) -> Result<Level, String> {
    Ok(match raw.to_ascii_lowercase().as_str() {
        "panic" => Level::Panic,
        "fatal" => Level::Fatal,
        "error" => Level::Error,
        "warn" | "warning" => Level::Warn,
        "info" => Level::Info,
        "debug" => Level::Debug,
        "trace" => Level::Trace,
        _ => {
            return Err(format!(
                "not a logging verbosity: {raw:?} (panic, fatal, error, warn, info, debug, trace)"
            ));
        }
    })
}

/// Targets that are this agent's own: its library and binary crates, and
/// the audit trail.
const OWN_TARGETS: [&str; 3] = ["agent", "eks_pod_identity_agent", "audit"];

/// The filter for `-v level` and `--log-filter extra`.
pub fn filter_directives(level: Level, extra: Option<&str>) -> String {
    let mut directives = vec!["warn".to_owned()];
    directives.extend(
        OWN_TARGETS
            .iter()
            .map(|t| format!("{t}={}", level.directive())),
    );
    if let Some(extra) = extra.filter(|e| !e.trim().is_empty()) {
        directives.push(extra.to_owned());
    }
    directives.join(",")
}

/// Installs the global subscriber. An unusable `--log-filter` falls back to
/// the level alone (and says so) rather than leaving the agent silent.
pub fn init(level: Level, extra: Option<&str>) {
    let (filter, bad) = match EnvFilter::try_new(filter_directives(level, extra)) {
        Ok(f) => (f, false),
        Err(_) => (EnvFilter::new(filter_directives(level, None)), true),
    };
    let _ = tracing_subscriber::fmt()
        .event_format(LogrusJson)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
    if bad {
        tracing::warn!(log_filter = extra, "unusable --log-filter, ignored");
    }
}

/// logrus' JSON line: `level`, `msg`, `time` (RFC 3339), the fields with
/// `_` written as `-`.
struct LogrusJson;

impl<S, N> FormatEvent<S, N> for LogrusJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut line = fields.0;
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        line.insert("level".into(), level.into());
        line.insert("time".into(), now_rfc3339().into());
        if !line.contains_key("msg") {
            line.insert("msg".into(), "".into());
        }
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON, `message` as `msg`. A field named
/// [`RECORD_FIELD`] carries an already-encoded JSON object (an audit event)
/// and is embedded as an object, not as an escaped string.
struct Fields(Map<String, Value>);

/// See [`Fields`].
pub const RECORD_FIELD: &str = "audit";

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        let name = match field.name() {
            "message" => "msg".to_owned(),
            other => other.replace('_', "-"),
        };
        let value = match value {
            Value::String(text) if field.name() == RECORD_FIELD => {
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            }
            other => other,
        };
        self.0.insert(name, value);
    }
}

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}

/// The current time as logrus writes it (RFC 3339, seconds, UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_sets_our_targets_only() {
        assert_eq!(
            filter_directives(parse_level("trace").unwrap(), None),
            "warn,agent=trace,eks_pod_identity_agent=trace,audit=trace"
        );
        assert_eq!(
            filter_directives(Level::Fatal, Some("hyper=debug")),
            "warn,agent=error,eks_pod_identity_agent=error,audit=error,hyper=debug"
        );
        for (raw, ok) in [
            ("TRACE", true),
            ("warning", true),
            ("verbose", false),
            ("", false),
        ] {
            assert_eq!(parse_level(raw).is_ok(), ok, "{raw}");
        }
    }
}
