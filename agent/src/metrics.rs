//! Prometheus metrics: the reference agent's names (operators' dashboards
//! keep working) plus what it lacks: request and upstream latency, upstream
//! errors by code, cache size and in-flight requests.
//!
//! prometheus-client follows OpenMetrics, so counter samples carry a
//! `_total` suffix (`pod_identity_http_response_total{code="200"}`).

use std::time::{Duration, Instant};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Metric,
    registry::Registry,
};

// Typed label sets: the request path updates several families per request,
// and static labels cost no allocation (only error codes are owned).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheErrorLabels {
    r#type: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorCodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

pub struct Metrics {
    registry: Registry,
    http_response: Family<CodeLabel, Counter>,
    cache_state: Family<StateLabel, Counter>,
    cache_errors: Family<CacheErrorLabels, Counter>,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
    upstream_errors: Family<ErrorCodeLabel, Counter>,
    cache_entries: Gauge,
    in_flight: Gauge,
    decisions: Family<DecisionLabels, Counter>,
    attribution_lookups: Family<ResultLabel, Counter>,
    resolve_seconds: Histogram,
    attribution_mode: Family<ModeLabel, Gauge>,
    connections_refused: Family<RefusedLabels, Counter>,
}

/// Cache outcome labels of `pod_identity_cache_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheState {
    Hit,
    Miss,
    Evicted,
}

impl CacheState {
    fn label(self) -> &'static str {
        match self {
            CacheState::Hit => "hit",
            CacheState::Miss => "miss",
            CacheState::Evicted => "evicted",
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers `metric` and hands back the handle that updates it.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        r.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        // Fields are evaluated in order: each borrows `r` briefly, the last
        // one moves it.
        Metrics {
            http_response: registered(
                &mut r,
                "pod_identity_http_response",
                "Credential endpoint responses by HTTP status code",
                Family::default(),
            ),
            cache_state: registered(
                &mut r,
                "pod_identity_cache_state",
                "Credential cache lookups and evictions (state=hit|miss|evicted)",
                Family::default(),
            ),
            cache_errors: registered(
                &mut r,
                "pod_identity_cache_errors",
                "Failures while filling or refreshing the credential cache (type, code)",
                Family::default(),
            ),
            request_seconds: registered(
                &mut r,
                "pod_identity_request_duration_seconds",
                "Time to answer a credential request",
                Histogram::new(exponential_buckets(0.000_1, 2.5, 14)),
            ),
            upstream_seconds: registered(
                &mut r,
                "pod_identity_upstream_duration_seconds",
                "Time of one AssumeRoleForPodIdentity call, retries included",
                Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            ),
            upstream_errors: registered(
                &mut r,
                "pod_identity_upstream_errors",
                "AssumeRoleForPodIdentity failures by error code",
                Family::default(),
            ),
            cache_entries: registered(
                &mut r,
                "pod_identity_cache_entries",
                "Identities currently cached",
                Gauge::default(),
            ),
            in_flight: registered(
                &mut r,
                "pod_identity_requests_in_flight",
                "Credential requests being answered",
                Gauge::default(),
            ),
            decisions: registered(
                &mut r,
                "pod_identity_caller_decisions",
                "Caller verification outcomes (result=allow|deny|audit-only, reason)",
                Family::default(),
            ),
            attribution_lookups: registered(
                &mut r,
                "pod_identity_attribution_lookups",
                "Kernel attribution lookups per accepted connection (result=hit|miss|error|no-syn)",
                Family::default(),
            ),
            resolve_seconds: registered(
                &mut r,
                "pod_identity_caller_resolve_duration_seconds",
                "Time from connection to pod identity (map lookup + cgroup resolution)",
                Histogram::new(exponential_buckets(0.000_002, 2.5, 12)),
            ),
            attribution_mode: registered(
                &mut r,
                "pod_identity_attribution_mode",
                "1 for the caller attribution mode in force (enforce|audit|off)",
                Family::default(),
            ),
            connections_refused: registered(
                &mut r,
                "pod_identity_connections_refused",
                "Connections closed at accept because their client held its share of the listener's budget, or the listener its total (listener=credentials|probe|metrics, reason=client-limit), or evicted to make room for a newcomer when the listener held its total (reason=evicted)",
                Family::default(),
            ),
            registry: r,
        }
    }

    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusedLabels { listener, reason })
            .inc();
    }

    pub fn decision(&self, result: &'static str, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels { result, reason })
            .inc();
    }

    pub fn attribution_lookup(&self, result: &'static str) {
        self.attribution_lookups
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn resolve_latency(&self, took: Duration) {
        self.resolve_seconds.observe(took.as_secs_f64());
    }

    pub fn set_attribution_mode(&self, mode: &str) {
        for m in ["enforce", "audit", "off"] {
            self.attribution_mode
                .get_or_create(&ModeLabel { mode: m })
                .set(i64::from(m == mode));
        }
    }

    pub fn response(&self, code: u16, started: Instant) {
        self.http_response.get_or_create(&CodeLabel { code }).inc();
        self.request_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn cache(&self, state: CacheState) {
        self.cache_state
            .get_or_create(&StateLabel {
                state: state.label(),
            })
            .inc();
    }

    pub fn cache_error(&self, kind: &'static str, code: &str) {
        self.cache_errors
            .get_or_create(&CacheErrorLabels {
                r#type: kind,
                code: code.to_owned(),
            })
            .inc();
    }

    pub fn upstream_call(&self, took: Duration, error_code: Option<&str>) {
        self.upstream_seconds.observe(took.as_secs_f64());
        if let Some(code) = error_code {
            self.upstream_errors
                .get_or_create(&ErrorCodeLabel {
                    code: code.to_owned(),
                })
                .inc();
        }
    }

    pub fn set_cache_entries(&self, n: u64) {
        self.cache_entries.set(n as i64);
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_reference_metric_names() {
        let m = Metrics::new();
        m.response(200, Instant::now());
        m.cache(CacheState::Hit);
        m.cache_error("upstream", "ThrottlingException");
        let text = m.encode();
        for needle in [
            r#"pod_identity_http_response_total{code="200"} 1"#,
            r#"pod_identity_cache_state_total{state="hit"} 1"#,
            r#"pod_identity_cache_errors_total{type="upstream",code="ThrottlingException"} 1"#,
            "pod_identity_request_duration_seconds_bucket",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
