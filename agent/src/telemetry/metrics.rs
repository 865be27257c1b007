//! Prometheus metrics in the reference agent's exposition (text format
//! 0.0.4, as client_golang writes it): its three counters under their exact
//! names, labels and label meanings, so the operators' dashboards and
//! alerts keep working; plus ours (all named with their `_total`,
//! `_seconds` suffixes as exposed).
//!
//! | reference | meaning |
//! |---|---|
//! | `pod_identity_http_response{code}` | credential endpoint answers by status |
//! | `pod_identity_cache_state{state}` | `miss` per request that missed the cache, `hit` per successful renewal, `evicted` per entry dropped |
//! | `pod_identity_cache_errors{type,code}` | failed renewals: `type` `Recoverable`/`NonRecoverable`, `code` EKS Auth's error code (`Unknown` without one) |

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder, exponential_buckets,
};

/// `pod_identity_cache_state` label values, as the reference uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    /// A request found no servable entry.
    Miss,
    /// A renewal succeeded.
    Renewed,
    /// An entry was dropped (expired, size, refused renewal, pod gone).
    Evicted,
}

impl CacheState {
    fn label(self) -> &'static str {
        match self {
            CacheState::Miss => "miss",
            CacheState::Renewed => "hit",
            CacheState::Evicted => "evicted",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    http_response: IntCounterVec,
    cache_state: IntCounterVec,
    cache_errors: IntCounterVec,
    cache_lookups: IntCounterVec,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
    upstream_errors: IntCounterVec,
    cache_entries: IntGauge,
    in_flight: IntGauge,
    decisions: IntCounterVec,
    attribution_lookups: IntCounterVec,
    resolve_seconds: Histogram,
    attribution_mode: IntGaugeVec,
    connections_refused: IntCounterVec,
    audit_events: IntCounter,
    lines_dropped: IntCounterVec,
    imds_connects: IntCounterVec,
    imds_events_lost: IntCounter,
    imds_pods: IntGauge,
    /// The series every served request counts, looked up once.
    hot: Hot,
}

/// The labelled series of the common path (a cached credential served,
/// caller verified), each looked up on first use — so it appears when it
/// first happens, as client_golang's do — then counted without hashing
/// labels again.
#[derive(Default)]
struct Hot {
    ok: OnceLock<IntCounter>,
    cache_hit: OnceLock<IntCounter>,
    allowed: OnceLock<IntCounter>,
}

fn hot<'a>(cell: &'a OnceLock<IntCounter>, vec: &IntCounterVec, labels: &[&str]) -> &'a IntCounter {
    cell.get_or_init(|| vec.with_label_values(labels))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers what `make` builds. The names, help texts and buckets are
/// constants of this file: a failure is a programming error caught by the
/// unit test below, never a runtime condition.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    make: impl FnOnce() -> prometheus::Result<M>,
) -> M {
    let metric = make().unwrap_or_else(|e| panic!("metric definition: {e}"));
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    metric
}

fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(registry, || {
        IntCounterVec::new(Opts::new(name, help), labels)
    })
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    registered(registry, || {
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
    })
}

fn buckets(start: f64, factor: f64, count: usize) -> Vec<f64> {
    exponential_buckets(start, factor, count).unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(e) = r.register(Box::new(process)) {
                tracing::warn!(error = %e, "process metrics unavailable");
            }
        }
        Metrics {
            http_response: counters(
                &r,
                "pod_identity_http_response",
                "Pod Identity http response code",
                &["code"],
            ),
            cache_state: counters(
                &r,
                "pod_identity_cache_state",
                "The state of credential in cache",
                &["state"],
            ),
            cache_errors: counters(
                &r,
                "pod_identity_cache_errors",
                "Removing credentials from cache, got non recoverable error",
                &["type", "code"],
            ),
            cache_lookups: counters(
                &r,
                "pod_identity_cache_lookups_total",
                "Credential requests answered from the cache (hit) or not (miss)",
                &["result"],
            ),
            request_seconds: histogram(
                &r,
                "pod_identity_request_duration_seconds",
                "Time to answer a credential request",
                buckets(0.000_1, 2.5, 14),
            ),
            upstream_seconds: histogram(
                &r,
                "pod_identity_upstream_duration_seconds",
                "Time of one AssumeRoleForPodIdentity call, retries included",
                buckets(0.001, 2.0, 14),
            ),
            upstream_errors: counters(
                &r,
                "pod_identity_upstream_errors_total",
                "AssumeRoleForPodIdentity failures by error code",
                &["code"],
            ),
            cache_entries: registered(&r, || {
                IntGauge::new("pod_identity_cache_entries", "Identities currently cached")
            }),
            in_flight: registered(&r, || {
                IntGauge::new(
                    "pod_identity_requests_in_flight",
                    "Credential requests being answered",
                )
            }),
            decisions: counters(
                &r,
                "pod_identity_caller_decisions_total",
                "Caller verification outcomes (result=allow|deny|audit-only, reason)",
                &["result", "reason"],
            ),
            attribution_lookups: counters(
                &r,
                "pod_identity_attribution_lookups_total",
                "Kernel attribution lookups per accepted connection (result=hit|miss|error|no-syn)",
                &["result"],
            ),
            resolve_seconds: histogram(
                &r,
                "pod_identity_caller_resolve_duration_seconds",
                "Time from connection to pod identity (map lookup + cgroup resolution)",
                buckets(0.000_002, 2.5, 12),
            ),
            attribution_mode: registered(&r, || {
                IntGaugeVec::new(
                    Opts::new(
                        "pod_identity_attribution_mode",
                        "1 for the caller attribution mode in force (enforce|audit|off)",
                    ),
                    &["mode"],
                )
            }),
            connections_refused: counters(
                &r,
                "pod_identity_connections_refused_total",
                "Connections closed at accept because their client held its share of the listener's budget (reason=client-limit), or evicted to make room for a newcomer when the listener held its total (reason=evicted)",
                &["listener", "reason"],
            ),
            audit_events: registered(&r, || {
                IntCounter::new(
                    "pod_identity_audit_events_total",
                    "Audit events emitted (one per credential request answered; one per IMDS connect or summary of connects)",
                )
            }),
            lines_dropped: counters(
                &r,
                "pod_identity_log_lines_dropped_total",
                "Log and audit lines lost: their writer's queue was full (reason=queue-full, the output too slow) or the output refused the write (reason=write-error); sink=stdout|audit-file",
                &["sink", "reason"],
            ),
            imds_connects: counters(
                &r,
                "pod_identity_imds_connects_total",
                "Connects to the instance metadata service by pod namespace (_node: node processes, _unclassified: pods not classified yet, _other: namespaces beyond the first 256) and decision (allow|deny|audit-only)",
                &["namespace", "decision"],
            ),
            imds_events_lost: registered(&r, || {
                IntCounter::new(
                    "pod_identity_imds_events_lost_total",
                    "IMDS connects the kernel could not report: its ring buffer was full",
                )
            }),
            imds_pods: registered(&r, || {
                IntGauge::new(
                    "pod_identity_imds_classified_pods",
                    "Pods the IMDS guard has classified (a verdict of their own in the kernel)",
                )
            }),
            hot: Hot::default(),
            registry: r,
        }
    }

    pub fn imds_connects(&self, namespace: &str, decision: &str, connects: u64) {
        self.imds_connects
            .with_label_values(&[namespace, decision])
            .inc_by(connects);
    }

    pub fn imds_events_lost(&self, events: u64) {
        self.imds_events_lost.inc_by(events);
    }

    pub fn set_imds_pods(&self, pods: usize) {
        self.imds_pods.set(pods as i64);
    }

    pub fn audit_event(&self) {
        self.audit_events.inc();
    }

    pub fn lines_dropped(&self, sink: &'static str, reason: &'static str, lines: u64) {
        self.lines_dropped
            .with_label_values(&[sink, reason])
            .inc_by(lines);
    }

    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .with_label_values(&[listener, reason])
            .inc();
    }

    pub fn decision(&self, result: crate::telemetry::audit::Decision, reason: &'static str) {
        if result == crate::telemetry::audit::Decision::Allow && reason == "ok" {
            hot(
                &self.hot.allowed,
                &self.decisions,
                &[result.label(), reason],
            )
            .inc();
            return;
        }
        self.decisions
            .with_label_values(&[result.label(), reason])
            .inc();
    }

    pub fn attribution_lookup(&self, result: &'static str) {
        self.attribution_lookups.with_label_values(&[result]).inc();
    }

    pub fn resolve_latency(&self, took: Duration) {
        self.resolve_seconds.observe(took.as_secs_f64());
    }

    pub fn set_attribution_mode(&self, mode: crate::config::ModeInForce) {
        for m in crate::config::ModeInForce::ALL {
            self.attribution_mode
                .with_label_values(&[m.label()])
                .set(i64::from(m == mode));
        }
    }

    pub fn response(&self, code: u16, started: Instant) {
        if code == 200 {
            hot(&self.hot.ok, &self.http_response, &["200"]).inc();
        } else {
            self.http_response
                .with_label_values(&[itoa_code(code)])
                .inc();
        }
        self.request_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn cache(&self, state: CacheState) {
        self.cache_state.with_label_values(&[state.label()]).inc();
    }

    /// A request answered from the cache (`true`) or not.
    pub fn cache_lookup(&self, hit: bool) {
        if hit {
            hot(&self.hot.cache_hit, &self.cache_lookups, &["hit"]).inc();
        } else {
            self.cache_lookups.with_label_values(&["miss"]).inc();
        }
    }

    /// A failed renewal, as the reference labels it.
    pub fn renewal_error(&self, recoverable: bool, code: &str) {
        let kind = if recoverable {
            "Recoverable"
        } else {
            "NonRecoverable"
        };
        self.cache_errors.with_label_values(&[kind, code]).inc();
    }

    pub fn upstream_call(&self, took: Duration, error_code: Option<&str>) {
        self.upstream_seconds.observe(took.as_secs_f64());
        if let Some(code) = error_code {
            self.upstream_errors.with_label_values(&[code]).inc();
        }
    }

    pub fn set_cache_entries(&self, n: u64) {
        self.cache_entries.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The text exposition (format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// HTTP status codes as label values without a per-request allocation.
fn itoa_code(code: u16) -> &'static str {
    match code {
        200 => "200",
        400 => "400",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => match code / 100 {
            2 => "2xx",
            4 => "4xx",
            _ => "5xx",
        },
    }
}

pub struct InFlight<'a>(&'a IntGauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_reference_metric_names_without_total() {
        let m = Metrics::new();
        m.response(200, Instant::now());
        m.cache(CacheState::Renewed);
        m.renewal_error(true, "ThrottlingException");
        m.cache_lookup(true);
        let text = m.encode();
        for needle in [
            "# TYPE pod_identity_http_response counter",
            r#"pod_identity_http_response{code="200"} 1"#,
            r#"pod_identity_cache_state{state="hit"} 1"#,
            r#"pod_identity_cache_errors{code="ThrottlingException",type="Recoverable"} 1"#,
            r#"pod_identity_cache_lookups_total{result="hit"} 1"#,
            "pod_identity_request_duration_seconds_bucket",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        assert!(!text.contains("pod_identity_http_response_total"));
    }
}
