//! Prometheus metrics: the reference agent's names (operators' dashboards
//! keep working) plus what it lacks: request and upstream latency, upstream
//! errors by code, cache size and in-flight requests.
//!
//! prometheus-client follows OpenMetrics, so counter samples carry a
//! `_total` suffix (`pod_identity_http_response_total{code="200"}`).

use std::time::{Duration, Instant};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    http_response: Family<Labels, Counter>,
    cache_state: Family<Labels, Counter>,
    cache_errors: Family<Labels, Counter>,
    request_seconds: Histogram,
    upstream_seconds: Histogram,
    upstream_errors: Family<Labels, Counter>,
    cache_entries: Gauge,
    in_flight: Gauge,
    decisions: Family<Labels, Counter>,
    attribution_lookups: Family<Labels, Counter>,
    resolve_seconds: Histogram,
    attribution_mode: Family<Labels, Gauge>,
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

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let http_response = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_http_response",
            "Credential endpoint responses by HTTP status code",
            http_response.clone(),
        );
        let cache_state = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_cache_state",
            "Credential cache lookups and evictions (state=hit|miss|evicted)",
            cache_state.clone(),
        );
        let cache_errors = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_cache_errors",
            "Failures while filling or refreshing the credential cache (type, code)",
            cache_errors.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.000_1, 2.5, 14));
        registry.register(
            "pod_identity_request_duration_seconds",
            "Time to answer a credential request",
            request_seconds.clone(),
        );
        let upstream_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "pod_identity_upstream_duration_seconds",
            "Time of one AssumeRoleForPodIdentity call, retries included",
            upstream_seconds.clone(),
        );
        let upstream_errors = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_upstream_errors",
            "AssumeRoleForPodIdentity failures by error code",
            upstream_errors.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "pod_identity_cache_entries",
            "Identities currently cached",
            cache_entries.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "pod_identity_requests_in_flight",
            "Credential requests being answered",
            in_flight.clone(),
        );
        let decisions = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_caller_decisions",
            "Caller verification outcomes (result=allow|deny|audit-only, reason)",
            decisions.clone(),
        );
        let attribution_lookups = Family::<Labels, Counter>::default();
        registry.register(
            "pod_identity_attribution_lookups",
            "Kernel attribution lookups per accepted request (result=hit|miss|error)",
            attribution_lookups.clone(),
        );
        let resolve_seconds = Histogram::new(exponential_buckets(0.000_002, 2.5, 12));
        registry.register(
            "pod_identity_caller_resolve_duration_seconds",
            "Time from connection to pod identity (map lookup + cgroup resolution)",
            resolve_seconds.clone(),
        );
        let attribution_mode = Family::<Labels, Gauge>::default();
        registry.register(
            "pod_identity_attribution_mode",
            "1 for the caller attribution mode in force (enforce|audit|off)",
            attribution_mode.clone(),
        );
        registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        Metrics {
            registry,
            http_response,
            cache_state,
            cache_errors,
            request_seconds,
            upstream_seconds,
            upstream_errors,
            cache_entries,
            in_flight,
            decisions,
            attribution_lookups,
            resolve_seconds,
            attribution_mode,
        }
    }

    pub fn decision(&self, result: &'static str, reason: &str) {
        self.decisions
            .get_or_create(&vec![
                ("result", result.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    pub fn attribution_lookup(&self, result: &'static str) {
        self.attribution_lookups
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub fn resolve_latency(&self, took: Duration) {
        self.resolve_seconds.observe(took.as_secs_f64());
    }

    pub fn set_attribution_mode(&self, mode: &str) {
        for m in ["enforce", "audit", "off"] {
            self.attribution_mode
                .get_or_create(&vec![("mode", m.to_owned())])
                .set(i64::from(m == mode));
        }
    }

    /// Registry for other modules' metrics (at startup only).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn response(&self, code: u16, started: Instant) {
        self.http_response
            .get_or_create(&vec![("code", code.to_string())])
            .inc();
        self.request_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    pub fn cache(&self, state: CacheState) {
        self.cache_state
            .get_or_create(&vec![("state", state.label().to_owned())])
            .inc();
    }

    pub fn cache_error(&self, kind: &'static str, code: &str) {
        self.cache_errors
            .get_or_create(&vec![("type", kind.to_owned()), ("code", code.to_owned())])
            .inc();
    }

    pub fn upstream_call(&self, took: Duration, error_code: Option<&str>) {
        self.upstream_seconds.observe(took.as_secs_f64());
        if let Some(code) = error_code {
            self.upstream_errors
                .get_or_create(&vec![("code", code.to_owned())])
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
