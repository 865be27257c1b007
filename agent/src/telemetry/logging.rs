//! Logs as the reference agent writes them (logrus' JSON formatter, on
//! stdout): one JSON object per line with `level`, `msg`, `time` and the
//! event's fields, named with dashes (`client-addr`, `cluster-name`), so
//! log pipelines built for the AWS agent keep parsing.
//!
//! `-v` sets the level of this agent's own logs only. Libraries (the AWS
//! SDK, hyper, rustls, aya) stay at `warn` whatever `-v` says — the SDK's
//! orchestrator traces whole requests at TRACE, and what it redacts is its
//! business, not a guarantee of ours — unless `--log-filter` names them.

use std::{fmt, sync::OnceLock};

use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    filter::Targets,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use super::spool::{Lost, Spool, SpoolGuard};

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

/// Bytes of log lines held while stdout is slow, at most; beyond them
/// lines are dropped (and counted), never waited for.
const PENDING_LIMIT: usize = 4 << 20;

/// What keeps the log writer alive: dropping it writes out what is pending.
pub struct LogOutput {
    _flush_on_drop: Option<SpoolGuard>,
}

/// The spool behind stdout, for its loss counts.
static STDOUT: OnceLock<Spool> = OnceLock::new();

/// What stdout's log lines lost so far.
pub fn stdout_lost() -> Lost {
    STDOUT.get().map_or_else(Lost::default, Spool::lost)
}

/// The filter for `-v level` alone.
fn levels_only(level: Level) -> Targets {
    parse_filter(&filter_directives(level, None))
        .unwrap_or_else(|_| Targets::new().with_default(tracing::Level::WARN))
}

/// `target=level` directives (and a bare default level), comma-separated,
/// spaces around them and empty ones ignored. Anything else — span or field
/// filters, a bare target — is refused rather than kept as a target that
/// matches nothing.
fn parse_filter(directives: &str) -> Result<Targets, String> {
    let path_like = |target: &str| {
        !target.is_empty()
            && target
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    let is_level = |level: &str| {
        level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok()
    };
    let mut kept = Vec::new();
    for directive in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        let valid = match directive.split_once('=') {
            Some((target, level)) => path_like(target.trim()) && is_level(level.trim()),
            None => is_level(directive),
        };
        if !valid {
            return Err(format!("not a target=level directive: {directive:?}"));
        }
        kept.push(directive.replace(' ', ""));
    }
    kept.join(",").parse().map_err(|e| format!("{e}"))
}

/// Installs the global subscriber, writing to stdout off the request path
/// (a log consumer that stalls stdout must not stall credential requests).
/// An unusable `--log-filter` falls back to the level alone (and says so)
/// rather than leaving the agent silent. Keep the returned value until
/// exit.
pub fn init(level: Level, extra: Option<&str>) -> LogOutput {
    let (filter, bad) = match parse_filter(&filter_directives(level, extra)) {
        Ok(f) => (f, false),
        Err(_) => (levels_only(level), true),
    };
    let layer = tracing_subscriber::fmt::layer().event_format(LogrusJson);
    let guard = match Spool::start(std::io::stdout(), "log-writer", PENDING_LIMIT) {
        Ok((spool, guard)) => {
            let writer = STDOUT.get_or_init(|| spool).clone();
            let _ = tracing_subscriber::registry()
                .with(layer.with_writer(writer))
                .with(filter)
                .try_init();
            Some(guard)
        }
        Err(e) => {
            // No thread for it: write in place rather than not at all.
            let _ = tracing_subscriber::registry()
                .with(layer.with_writer(std::io::stdout))
                .with(filter)
                .try_init();
            tracing::warn!(error = %e, "log writer thread unavailable; logging synchronously");
            None
        }
    };
    if bad {
        tracing::warn!(log_filter = extra, "unusable --log-filter, ignored");
    }
    LogOutput {
        _flush_on_drop: guard,
    }
}

/// logrus' JSON line: `level`, `msg`, `time` (RFC 3339), the fields with
/// `_` written as `-`. Written straight into the line, field by field: no
/// map is built, nothing is encoded twice.
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
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warning",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        let mut line = Line {
            // Not there while the thread's locals are destroyed: a new one.
            text: LINE_BUFFER.try_with(|kept| kept.take()).unwrap_or_default(),
            has_message: false,
            // Only the audit trail's own events carry a pre-encoded record.
            takes_record: event.metadata().target() == AUDIT_TARGET,
        };
        line.text.push(b'{');
        event.record(&mut line);
        if !line.has_message {
            line.put_raw("msg", "\"\"");
        }
        line.put_str("level", level);
        // RFC 3339 has nothing to escape: written in place.
        line.put_value(
            "time",
            format_args!(
                "\"{}\"",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            ),
        );
        line.text.pop();
        line.text.push(b'}');
        // Only JSON (UTF-8) was written into it.
        let written = match std::str::from_utf8(&line.text) {
            Ok(text) => writeln!(writer, "{text}"),
            Err(_) => Err(fmt::Error),
        };
        line.text.clear();
        if line.text.capacity() <= LINE_BUFFER_KEPT {
            let _ = LINE_BUFFER.try_with(|kept| kept.replace(line.text));
        }
        written
    }
}

thread_local! {
    /// Each thread's line buffer, kept between lines: a line is written
    /// per request (its audit event), and needs no allocation of its own.
    /// (A line logged while another is formatted on the thread finds it
    /// taken, and makes its own.)
    static LINE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer grown beyond this by a rare long line is not kept.
const LINE_BUFFER_KEPT: usize = 16 * 1024;

/// A log line being written: `"key":value,` pairs, `message` as `msg`. A
/// field named [`RECORD_FIELD`] carries an already-encoded JSON object (an
/// audit event) and is written as that object, not as an escaped string.
struct Line {
    /// Bytes, so strings are escaped straight into it (serde_json writes
    /// to an `io::Write`): no allocation per field.
    text: Vec<u8>,
    has_message: bool,
    takes_record: bool,
}

/// The target audit events are logged on.
pub const AUDIT_TARGET: &str = "audit";

/// See [`Line`].
pub const RECORD_FIELD: &str = "audit";

impl Line {
    fn key(&mut self, field: &str) {
        let name = match field {
            "message" => {
                self.has_message = true;
                "msg"
            }
            other => other,
        };
        self.text.push(b'"');
        // Field names are Rust identifiers: nothing to escape.
        self.text
            .extend(name.bytes().map(|c| if c == b'_' { b'-' } else { c }));
        self.text.extend_from_slice(b"\":");
    }

    fn put_raw(&mut self, field: &str, json: &str) {
        self.key(field);
        self.text.extend_from_slice(json.as_bytes());
        self.text.push(b',');
    }

    fn put_str(&mut self, field: &str, value: &str) {
        self.key(field);
        // Writing a string into a Vec cannot fail.
        if serde_json::to_writer(&mut self.text, value).is_err() {
            self.text.extend_from_slice(b"\"\"");
        }
        self.text.push(b',');
    }

    fn put_value(&mut self, field: &str, value: impl fmt::Display) {
        self.key(field);
        // Numbers, booleans and quoted times: their Display is their JSON.
        let _ = std::io::Write::write_fmt(&mut self.text, format_args!("{value}"));
        self.text.push(b',');
    }
}

/// Writes what is formatted into it as the inside of a JSON string:
/// each fragment escaped by serde_json (as `put_str` does), its quotes
/// dropped.
struct Escaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let opening = self.0.len();
        serde_json::to_writer(&mut *self.0, s).map_err(|_| fmt::Error)?;
        self.0.pop();
        self.0.remove(opening);
        Ok(())
    }
}

impl tracing::field::Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.takes_record && field.name() == RECORD_FIELD && value.starts_with('{') {
            self.put_raw(field.name(), value);
        } else {
            self.put_str(field.name(), value);
        }
    }

    /// Also every line's message (`fmt::Arguments`) and every `%`/`?`
    /// field: formatted straight into the line, escaped as it goes, not
    /// into a string of its own first.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field.name());
        let start = self.text.len();
        self.text.push(b'"');
        if fmt::Write::write_fmt(&mut Escaped(&mut self.text), format_args!("{value:?}")).is_ok() {
            self.text.push(b'"');
        } else {
            // A Debug that failed midway: an empty value, not a torn line.
            self.text.truncate(start);
            self.text.extend_from_slice(b"\"\"");
        }
        self.text.push(b',');
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put_value(field.name(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put_value(field.name(), value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put_value(field.name(), value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.put_value(field.name(), value);
        } else {
            self.put_raw(field.name(), "null");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A line as the agent writes it for `emit`.
    fn line_of(emit: impl FnOnce()) -> serde_json::Value {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(LogrusJson)
            .with_writer(move || Captured(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn messages_and_formatted_fields_are_escaped_in_place() {
        let tricky = "q\"b\\s\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é";
        let line =
            line_of(|| tracing::info!(shown = %tricky, debugged = ?tricky, "m\"sg {tricky}"));
        assert_eq!(line["shown"], tricky);
        assert_eq!(line["debugged"], format!("{tricky:?}"));
        assert_eq!(line["msg"], format!("m\"sg {tricky}"));
    }

    #[test]
    fn lines_are_logrus_json_with_the_audit_event_as_an_object() {
        let event = r#"{"decision":"allow","pod_uid":"u\"1"}"#;
        let line = line_of(|| {
            tracing::info!(
                target: "audit",
                client_addr = "10.0.0.1:5",
                count = 3u64,
                ratio = f64::NAN,
                quoted = "a \"b\"\n",
                audit = event,
                "credential request"
            )
        });
        assert_eq!(line["msg"], "credential request");
        assert_eq!(line["level"], "info");
        assert_eq!(line["client-addr"], "10.0.0.1:5");
        assert_eq!(line["count"], 3);
        assert_eq!(line["ratio"], serde_json::Value::Null);
        assert_eq!(line["quoted"], "a \"b\"\n");
        assert_eq!(line["audit"]["pod_uid"], "u\"1");
        assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        // Another target's `audit` field is a string like any other.
        let other = line_of(|| tracing::info!(audit = "{not json"));
        assert_eq!(other["audit"], "{not json");
        let bare = line_of(|| tracing::warn!(error = %"x"));
        assert_eq!(
            (bare["msg"].as_str(), bare["level"].as_str()),
            (Some(""), Some("warning"))
        );
        // The thread's buffer is reused: nothing of an earlier line stays.
        assert_eq!(bare.as_object().map(|o| o.len()), Some(4), "{bare}");
    }

    #[test]
    fn libraries_stay_at_warn_unless_the_log_filter_names_them() {
        let debug = tracing::Level::DEBUG;
        let plain = parse_filter(&filter_directives(Level::Trace, None)).unwrap();
        assert!(plain.would_enable("agent::serving::handler", &debug));
        assert!(plain.would_enable("audit", &tracing::Level::INFO));
        assert!(!plain.would_enable("aws_smithy_runtime::client", &debug));
        assert!(plain.would_enable("aws_smithy_runtime::client", &tracing::Level::WARN));
        let named = parse_filter(&filter_directives(
            Level::Info,
            Some("aws_smithy_runtime=debug"),
        ))
        .unwrap();
        assert!(named.would_enable("aws_smithy_runtime::client", &debug));
        assert!(!named.would_enable("agent::daemon", &debug));
        // Span and field filters, unknown levels: refused, so `init` falls
        // back to the level alone (and says so).
        let spaced = parse_filter(&filter_directives(
            Level::Info,
            Some(" hyper=debug, rustls = info ,"),
        ))
        .unwrap();
        assert!(spaced.would_enable("rustls::conn", &tracing::Level::INFO));
        assert!(spaced.would_enable("hyper::proto", &debug));
        // The trailing comma did not turn the default into ERROR.
        assert!(spaced.would_enable("aws_smithy_runtime", &tracing::Level::WARN));
        for bad in [
            "hyper[conn]=debug",
            "hyper{id=1}=trace",
            "hyper=loud",
            "hyper[conn]",
        ] {
            assert!(
                parse_filter(&filter_directives(Level::Info, Some(bad))).is_err(),
                "{bad}"
            );
        }
    }

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
