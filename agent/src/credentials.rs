//! Credentials per identity: a bounded cache (moka), exact single-flight of
//! upstream calls, and paced renewal by the requests that use them.
//!
//! Knows identities and credentials, not HTTP.
//!
//! * Single-flight: concurrent requests for one identity share one upstream
//!   call. The call runs in its own task, so a client that disconnects (its
//!   request future dropped) cancels nothing the others wait on.
//! * Renewal on use: the first request for an entry held `retention` (or
//!   close to expiry) renews it with the token it presents — the token the
//!   entry was issued for — and waits at most [`RENEWAL_WAIT`] for the new
//!   credentials; past that, or when EKS Auth fails transiently, it gets
//!   the cached ones, and the renewal goes on or is retried after
//!   [`RENEWAL_RETRY`]. Renewals are paced at `max_service_qps`; over it a
//!   request is answered from the entry and a later one renews.
//!
//!   Why not the reference's background sweep: it must keep every pod's
//!   token (a bearer credential, ~1 KiB) for as long as the entry lives,
//!   and it calls EKS Auth for every entry each `retention`, also for
//!   identities nobody asks for anymore (a rotated token, a finished job).
//!   Here a token lives only as long as its request, and EKS Auth hears
//!   only about identities in use.
//! * Never serves credentials with ≤ 15 s left (the SDKs would refetch at
//!   once). Irrecoverable upstream verdicts evict; transient failures keep the
//!   old credentials until they are no longer servable.
//! * Only a token EKS Auth accepted is ever answered from an entry or used
//!   to refresh it: the agent does not verify signatures, so a token it has
//!   not seen accepted (a rotated one, or a forgery carrying the caller's
//!   own claims) goes to EKS Auth, which decides. Single-flight is per
//!   (identity, token), so a forgery never joins a genuine token's call.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use moka::{Expiry, future::Cache, notification::RemovalCause};
use tracing::{debug, info, warn};

use crate::{
    telemetry::metrics::{CacheState, Metrics},
    token::Digest,
    upstream::{Assumed, Upstream, UpstreamError},
};

/// Credentials with this little life left are not served (reference agent).
pub const MIN_REMAINING: Duration = Duration::from_secs(15);

/// The longest a request waits for the renewal it started before it is
/// answered from the entry: the SDKs give a credential request 1–5 s.
pub const RENEWAL_WAIT: Duration = Duration::from_millis(500);

/// After a renewal that failed or was not made, the next try waits this
/// long (the reference retries a failed refresh within 1–2 minutes).
pub const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// What a cache entry belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// SHA-256 of the raw token: the token itself is never a key.
    TokenHash(Digest),
    /// A kernel-verified pod and its service account (enforce mode): the
    /// kubelet's rotated tokens for the same pod share the entry. One
    /// allocation, `uid/namespace/service-account` ([`CacheKey::pod`]).
    Pod(Box<str>),
}

impl CacheKey {
    /// The key of a pod's identity. The parts cannot hold a `/` (a UID, a
    /// namespace and a service-account name); if forged claims did, the
    /// entry still answers only the token EKS Auth accepted.
    pub fn pod(uid: &str, namespace: &str, service_account: &str) -> CacheKey {
        CacheKey::Pod(format!("{uid}/{namespace}/{service_account}").into_boxed_str())
    }
}

impl Source {
    /// `hit` / `miss`, as metrics, logs and audit events say it.
    pub fn label(self) -> &'static str {
        match self {
            Source::Cache => "hit",
            Source::Upstream => "miss",
            Source::Renewal => "renewed",
        }
    }
}

/// Where the answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// EKS Auth, for an identity not cached (or no longer servable).
    Upstream,
    /// EKS Auth, renewing the entry this request found due.
    Renewal,
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub max_entries: u64,
    /// `--max-credential-retention-before-renewal`; zero disables caching.
    pub retention: Duration,
    /// `--max-service-qps`: renewals a second, at most.
    pub max_service_qps: f64,
}

/// Credentials as cached and as handed to requests (it dereferences to
/// them): one allocation per identity.
pub struct Entry {
    assumed: Assumed,
    /// When a request should renew the entry, in milliseconds since the
    /// cache's epoch; moved on by the request that takes the renewal on.
    renew_at: AtomicU64,
    /// Instant from which the entry is no longer servable.
    unservable_at: Instant,
    /// SHA-256 of the token EKS Auth accepted for these credentials: the
    /// only token they are served for, and so the one a renewal presents.
    token_hash: Digest,
}

impl Entry {
    fn new(assumed: Assumed, token_hash: Digest, retention: Duration, epoch: Instant) -> Entry {
        let now = Instant::now();
        let lifetime = assumed
            .expiration
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Renew when held for `retention`, or halfway through short lives,
        // and at the latest five minutes before expiry.
        let margin = (lifetime / 2).min(Duration::from_secs(300));
        let renew_in = retention.min(lifetime.saturating_sub(margin));
        Entry {
            assumed,
            renew_at: AtomicU64::new(millis_since(epoch, now + renew_in)),
            unservable_at: now + lifetime.saturating_sub(MIN_REMAINING),
            token_hash,
        }
    }

    fn servable(&self, now: Instant) -> bool {
        now < self.unservable_at
    }

    /// Whether the caller, at `now_ms`, is the one to renew the entry: it
    /// is due and no other request took it on since. The next try is then
    /// [`RENEWAL_RETRY`] away, unless a renewal replaces the entry first.
    fn take_renewal(&self, now_ms: u64) -> bool {
        let due = self.renew_at.load(Ordering::Relaxed);
        now_ms >= due
            && self
                .renew_at
                .compare_exchange(
                    due,
                    now_ms + RENEWAL_RETRY.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Gives a taken renewal back, to be tried again `after` from `now_ms`.
    fn defer_renewal(&self, now_ms: u64, after: Duration) {
        self.renew_at
            .store(now_ms + after.as_millis() as u64, Ordering::Relaxed);
    }
}

impl std::ops::Deref for Entry {
    type Target = Assumed;

    fn deref(&self) -> &Assumed {
        &self.assumed
    }
}

/// `at` as milliseconds since `epoch` (0 before it).
fn millis_since(epoch: Instant, at: Instant) -> u64 {
    at.saturating_duration_since(epoch).as_millis() as u64
}

/// Lets moka drop each entry when its credentials stop being servable.
struct UntilUnservable;

impl Expiry<CacheKey, Arc<Entry>> for UntilUnservable {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        entry: &Arc<Entry>,
        now: Instant,
    ) -> Option<Duration> {
        Some(entry.unservable_at.saturating_duration_since(now))
    }

    /// A refresh replaces the entry: its new deadline applies (moka's
    /// default would keep the old one).
    fn expire_after_update(
        &self,
        key: &CacheKey,
        entry: &Arc<Entry>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, entry, now)
    }
}

type Fetch = Shared<BoxFuture<'static, Result<Arc<Entry>, UpstreamError>>>;

/// One upstream call: an identity and the exact token presented for it.
type FlightKey = (CacheKey, Digest);

/// Why an upstream call is made: what its outcome counts as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// No servable entry for this identity and token.
    Miss,
    /// The entry is due for renewal.
    Renewal,
}

struct Inner {
    cache: Option<Cache<CacheKey, Arc<Entry>>>,
    in_flight: Mutex<HashMap<FlightKey, Fetch>>,
    upstream: Arc<dyn Upstream>,
    metrics: Arc<Metrics>,
    options: CacheOptions,
    /// `max_service_qps`, for renewals.
    renewals: governor::DefaultDirectRateLimiter,
    /// What entries' renewal times count from.
    epoch: Instant,
}

/// Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct CredentialCache {
    inner: Arc<Inner>,
}

impl CredentialCache {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        metrics: Arc<Metrics>,
        options: CacheOptions,
    ) -> CredentialCache {
        let cache = (!options.retention.is_zero()).then(|| {
            let metrics = metrics.clone();
            Cache::builder()
                .max_capacity(options.max_entries)
                .expire_after(UntilUnservable)
                .eviction_listener(move |_key, _value, cause| {
                    // Not a replacement by a renewal: the entry is gone.
                    if cause != RemovalCause::Replaced {
                        metrics.cache(CacheState::Evicted);
                    }
                })
                .build()
        });
        CredentialCache {
            inner: Arc::new(Inner {
                cache,
                in_flight: Mutex::new(HashMap::new()),
                upstream,
                metrics,
                renewals: governor::RateLimiter::direct(renewal_quota(options.max_service_qps)),
                options,
                epoch: Instant::now(),
            }),
        }
    }

    /// Credentials for `key`, presenting `token` (whose digest the caller
    /// computed once) if EKS Auth must be asked.
    pub async fn get(
        &self,
        key: &CacheKey,
        token: &str,
        presented: Digest,
    ) -> Result<(Arc<Entry>, Source), UpstreamError> {
        let inner = &self.inner;
        let now = Instant::now();
        if let Some(cache) = &inner.cache
            && let Some(entry) = cache.get(key).await
            && entry.servable(now)
            && entry.token_hash == presented
        {
            inner.metrics.cache_lookup(true);
            if entry.take_renewal(millis_since(inner.epoch, now)) {
                return self.renew(key, token, presented, entry).await;
            }
            return Ok((entry, Source::Cache));
        }
        inner.metrics.cache_lookup(false);
        if inner.cache.is_some() {
            inner.metrics.cache(CacheState::Miss);
        }
        let assumed = self
            .fetch(key.clone(), token.to_owned(), presented, Purpose::Miss)
            .await?;
        Ok((assumed, Source::Upstream))
    }

    /// Renews `entry`, which this request found due and took on: the new
    /// credentials if EKS Auth gives them within [`RENEWAL_WAIT`], else the
    /// entry's (the call goes on and replaces the entry when it answers).
    /// Only a refusal of the token itself fails the request: the entry is
    /// gone then, as the next request would find.
    async fn renew(
        &self,
        key: &CacheKey,
        token: &str,
        presented: Digest,
        entry: Arc<Entry>,
    ) -> Result<(Arc<Entry>, Source), UpstreamError> {
        if self.inner.renewals.check().is_err() {
            // Over `--max-service-qps`: a later request renews.
            let now_ms = millis_since(self.inner.epoch, Instant::now());
            entry.defer_renewal(now_ms, renewal_period(self.inner.options.max_service_qps));
            return Ok((entry, Source::Cache));
        }
        let call = self.fetch(key.clone(), token.to_owned(), presented, Purpose::Renewal);
        match tokio::time::timeout(RENEWAL_WAIT, call).await {
            Ok(Ok(renewed)) => Ok((renewed, Source::Renewal)),
            Ok(Err(err)) if !err.is_recoverable() => Err(err),
            // Failed for now (counted and logged by the call) or slow.
            Ok(Err(_)) | Err(_) => Ok((entry, Source::Cache)),
        }
    }

    /// Joins the in-flight upstream call for `key` with this very token, or
    /// starts one.
    fn fetch(&self, key: CacheKey, token: String, presented: Digest, purpose: Purpose) -> Fetch {
        let flight: FlightKey = (key, presented);
        // The map holds finished-or-running futures only; a panic while it
        // is locked cannot leave it inconsistent, so poisoning is ignored
        // here and where the task removes its key.
        let mut in_flight = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fetch) = in_flight.get(&flight) {
            return fetch.clone();
        }
        let inner = self.inner.clone();
        let task_flight = flight.clone();
        let task = tokio::spawn(async move {
            let (task_key, presented) = (&task_flight.0, task_flight.1);
            let started = Instant::now();
            let result = inner.upstream.assume(token).await;
            inner.metrics.upstream_call(
                started.elapsed(),
                result.as_ref().err().map(UpstreamError::code),
            );
            if purpose == Purpose::Renewal {
                inner.count_renewal(task_key, result.as_ref().err());
            }
            let result = result.map(|assumed| {
                let retention = inner.options.retention;
                Arc::new(Entry::new(assumed, presented, retention, inner.epoch))
            });
            if let Some(cache) = &inner.cache {
                match &result {
                    Ok(entry) => cache.insert(task_key.clone(), entry.clone()).await,
                    Err(err) => {
                        // Only EKS Auth refusing the entry's own token
                        // evicts it: a refused forgery must not take a
                        // genuine entry down with it.
                        if !err.is_recoverable()
                            && cache
                                .get(task_key)
                                .await
                                .is_some_and(|e| e.token_hash == presented)
                        {
                            cache.invalidate(task_key).await;
                        }
                    }
                }
                // moka counts entries once its pending writes are applied:
                // without this the gauge lags a write behind.
                cache.run_pending_tasks().await;
                inner.metrics.set_cache_entries(cache.entry_count());
            }
            inner
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&task_flight);
            result
        });
        let fetch = async move {
            task.await.unwrap_or_else(|e| {
                Err(UpstreamError::no_answer(
                    crate::upstream::NoAnswer::Client,
                    format!("upstream task failed: {e}"),
                ))
            })
        }
        .boxed()
        .shared();
        in_flight.insert(flight, fetch.clone());
        fetch
    }

    /// Whether an entry for `key` is cached (servable or not).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.inner
            .cache
            .as_ref()
            .is_some_and(|cache| cache.contains_key(key))
    }

    /// Drops the entries of `keys` (e.g. of pods that are gone); returns how
    /// many were cached.
    pub async fn evict(&self, keys: &[CacheKey]) -> usize {
        let Some(cache) = &self.inner.cache else {
            return 0;
        };
        let mut evicted = 0;
        for key in keys {
            // The eviction listener counts it.
            if cache.remove(key).await.is_some() {
                evicted += 1;
            }
        }
        cache.run_pending_tasks().await;
        self.inner.metrics.set_cache_entries(cache.entry_count());
        evicted
    }
}

impl Inner {
    /// A renewal's outcome, as the reference's metrics and logs say it.
    fn count_renewal(&self, key: &CacheKey, failed: Option<&UpstreamError>) {
        let Some(err) = failed else {
            debug!(?key, "renewed credentials");
            self.metrics.cache(CacheState::Renewed);
            return;
        };
        let recoverable = err.is_recoverable();
        self.metrics
            .renewal_error(recoverable, err.reference_code());
        if recoverable {
            warn!(error = %err, "renewal failed; serving the cached credentials until they expire, retrying in a minute");
        } else {
            info!(error = %err, "renewal refused; credentials evicted");
        }
    }
}

/// The period of `max_service_qps` (at least one a day).
fn renewal_period(max_service_qps: f64) -> Duration {
    Duration::from_secs_f64(1.0 / max_service_qps.max(1.0 / 86_400.0))
}

/// `max_service_qps` as a quota: its period, with a second's worth of
/// renewals (at least one) allowed at once.
fn renewal_quota(max_service_qps: f64) -> governor::Quota {
    let burst =
        NonZeroU32::new(max_service_qps.ceil().clamp(1.0, 1e6) as u32).unwrap_or(NonZeroU32::MIN);
    governor::Quota::with_period(renewal_period(max_service_qps))
        .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::token::digest;
    use crate::upstream::UpstreamFuture;

    /// Counts calls, answers after `delay` with credentials valid `lifetime`.
    struct FakeUpstream {
        calls: AtomicUsize,
        delay: Duration,
        lifetime: Duration,
        fail_with: Mutex<Option<UpstreamError>>,
    }

    impl FakeUpstream {
        fn new(delay: Duration, lifetime: Duration) -> Arc<FakeUpstream> {
            Arc::new(FakeUpstream {
                calls: AtomicUsize::new(0),
                delay,
                lifetime,
                fail_with: Mutex::new(None),
            })
        }
    }

    impl Upstream for FakeUpstream {
        fn assume(&self, token: String) -> UpstreamFuture {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let delay = self.delay;
            let expiration = SystemTime::now() + self.lifetime;
            let failure = self.fail_with.lock().unwrap().clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if let Some(err) = failure {
                    return Err(err);
                }
                Ok(Assumed {
                    answer: crate::upstream::SdkAnswer {
                        access_key_id: &format!("ASIA{n}"),
                        secret_access_key: "s",
                        session_token: &token,
                        account_id: None,
                        expiration,
                    }
                    .encode(),
                    expiration,
                    association_id: "a".into(),
                    role_arn: "role".into(),
                    subject_namespace: "ns".into(),
                    subject_service_account: "sa".into(),
                })
            })
        }
    }

    fn credentials(upstream: Arc<FakeUpstream>, retention: Duration) -> CredentialCache {
        paced(upstream, retention, 100.0)
    }

    fn paced(upstream: Arc<FakeUpstream>, retention: Duration, qps: f64) -> CredentialCache {
        CredentialCache::new(
            upstream,
            Arc::new(Metrics::new()),
            CacheOptions {
                max_entries: 100,
                retention,
                max_service_qps: qps,
            },
        )
    }

    /// Held this long, an entry is due for renewal.
    const RETENTION: Duration = Duration::from_millis(200);

    /// `keys`, each cached with token "t" and then held past [`RETENTION`].
    async fn due(creds: &CredentialCache, keys: &[CacheKey]) {
        for key in keys {
            assert_eq!(
                creds.get(key, "t", digest("t")).await.unwrap().1,
                Source::Upstream
            );
        }
        tokio::time::sleep(RETENTION + Duration::from_millis(50)).await;
    }

    fn key_id(assumed: &Assumed) -> String {
        let answer: serde_json::Value = serde_json::from_slice(&assumed.answer).unwrap();
        answer["AccessKeyId"].as_str().unwrap().to_owned()
    }

    fn refusal() -> UpstreamError {
        UpstreamError::Service {
            status: http::StatusCode::BAD_REQUEST,
            code: "AccessDeniedException".into(),
            message: "no".into(),
            request_id: "r".into(),
            fault: "client",
        }
    }

    /// What the request that finds an entry due gets, by how EKS Auth
    /// answers the renewal; and whether the next request (at once) calls
    /// again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_request_that_finds_an_entry_due_renews_it() {
        struct Case {
            name: &'static str,
            delay: Duration,
            fails_with: Option<UpstreamError>,
            /// `Ok((source, AccessKeyId))`, or that the request failed.
            answered: Result<(Source, &'static str), ()>,
            /// Cached afterwards (with the renewal's key id, once landed).
            cached: Option<&'static str>,
        }
        let slow = RENEWAL_WAIT + Duration::from_millis(300);
        let timeout = UpstreamError::no_answer(crate::upstream::NoAnswer::Timeout, "timeout");
        let cases = [
            Case {
                name: "renewed in time: the new credentials",
                delay: Duration::ZERO,
                fails_with: None,
                answered: Ok((Source::Renewal, "ASIA1")),
                cached: Some("ASIA1"),
            },
            Case {
                name: "EKS Auth slow: the cached ones now, the new ones when they come",
                delay: slow,
                fails_with: None,
                answered: Ok((Source::Cache, "ASIA0")),
                cached: Some("ASIA1"),
            },
            Case {
                name: "transient failure: the cached ones, retried a minute later",
                delay: Duration::ZERO,
                fails_with: Some(timeout),
                answered: Ok((Source::Cache, "ASIA0")),
                cached: Some("ASIA0"),
            },
            Case {
                name: "token refused: the request fails and the entry goes",
                delay: Duration::ZERO,
                fails_with: Some(refusal()),
                answered: Err(()),
                cached: None,
            },
        ];
        for case in cases {
            let upstream = FakeUpstream::new(case.delay, Duration::from_secs(3600));
            let creds = credentials(upstream.clone(), RETENTION);
            let key = CacheKey::TokenHash(digest("t"));
            due(&creds, std::slice::from_ref(&key)).await;
            *upstream.fail_with.lock().unwrap() = case.fails_with;
            let asked = Instant::now();
            let answered = creds.get(&key, "t", digest("t")).await;
            assert!(
                asked.elapsed() < RENEWAL_WAIT + Duration::from_millis(200),
                "{}: waited {:?}",
                case.name,
                asked.elapsed()
            );
            let answered = answered.map(|(a, source)| (source, key_id(&a)));
            assert_eq!(
                answered
                    .as_ref()
                    .map(|(s, id)| (*s, id.as_str()))
                    .map_err(|_| ()),
                case.answered,
                "{}",
                case.name
            );
            // The renewal lands (or has failed) before the next check.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !creds.inner.in_flight.lock().unwrap().is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "{}: the call never ended",
                    case.name
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let cache = creds.inner.cache.as_ref().unwrap();
            let cached = cache.get(&key).await.map(|e| key_id(&e));
            assert_eq!(cached.as_deref(), case.cached, "{}", case.name);
            if case.cached.is_some() {
                let (_, source) = creds.get(&key, "t", digest("t")).await.unwrap();
                assert_eq!(source, Source::Cache, "{}", case.name);
            }
            assert_eq!(upstream.calls.load(Ordering::SeqCst), 2, "{}", case.name);
        }
    }

    #[tokio::test]
    async fn renewals_beyond_the_service_qps_are_left_to_a_later_request() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(3600));
        // One renewal now, the next in 1000 s.
        let creds = paced(upstream.clone(), RETENTION, 0.001);
        let keys = [
            CacheKey::TokenHash(digest("a")),
            CacheKey::TokenHash(digest("b")),
        ];
        due(&creds, &keys).await;
        let sources = [
            creds.get(&keys[0], "t", digest("t")).await.unwrap().1,
            creds.get(&keys[1], "t", digest("t")).await.unwrap().1,
        ];
        assert_eq!(sources, [Source::Renewal, Source::Cache]);
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_make_one_call_and_then_hit() {
        let upstream = FakeUpstream::new(Duration::from_millis(50), Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), Duration::from_secs(3600));
        let key = CacheKey::TokenHash(digest("t"));
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let creds = creds.clone();
                let key = key.clone();
                tokio::spawn(async move { creds.get(&key, "t", digest("t")).await })
            })
            .collect();
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
        let (_, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!(source, Source::Cache);
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_cancel_the_shared_call() {
        let upstream = FakeUpstream::new(Duration::from_millis(100), Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), Duration::from_secs(3600));
        let key = CacheKey::TokenHash(digest("t"));
        let first = tokio::spawn({
            let (creds, key) = (creds.clone(), key.clone());
            async move { creds.get(&key, "t", digest("t")).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        let (_, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!(source, Source::Upstream);
        assert_eq!(
            upstream.calls.load(Ordering::SeqCst),
            1,
            "the aborted request's call was redone"
        );
    }

    #[tokio::test]
    async fn only_the_token_eks_auth_accepted_is_served_from_the_entry() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), Duration::from_secs(3600));
        let key = CacheKey::pod("u", "ns", "sa");
        creds.get(&key, "genuine", digest("genuine")).await.unwrap();
        assert_eq!(
            creds
                .get(&key, "genuine", digest("genuine"))
                .await
                .unwrap()
                .1,
            Source::Cache
        );
        // A forgery with the same claims: EKS Auth decides, and refuses.
        *upstream.fail_with.lock().unwrap() = Some(UpstreamError::Service {
            status: http::StatusCode::BAD_REQUEST,
            code: "InvalidTokenException".into(),
            message: "bad signature".into(),
            request_id: "r".into(),
            fault: "client",
        });
        assert!(creds.get(&key, "forged", digest("forged")).await.is_err());
        assert_eq!(
            upstream.calls.load(Ordering::SeqCst),
            2,
            "forgery not sent upstream"
        );
        // The genuine entry survives, and the forgery never became its token.
        *upstream.fail_with.lock().unwrap() = None;
        let (assumed, source) = creds.get(&key, "genuine", digest("genuine")).await.unwrap();
        assert_eq!(source, Source::Cache);
        let answer: serde_json::Value = serde_json::from_slice(&assumed.answer).unwrap();
        assert_eq!(answer["Token"], "genuine");
        let entry = creds.inner.cache.as_ref().unwrap().get(&key).await.unwrap();
        assert_eq!(entry.token_hash, digest("genuine"));
    }

    #[tokio::test]
    async fn credentials_close_to_expiry_are_never_served() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(10));
        let creds = credentials(upstream.clone(), Duration::from_secs(3600));
        let key = CacheKey::TokenHash(digest("t"));
        creds.get(&key, "t", digest("t")).await.unwrap();
        let (_, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!(
            source,
            Source::Upstream,
            "10 s credentials were served from cache"
        );
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn zero_retention_disables_the_cache() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), Duration::ZERO);
        for _ in 0..3 {
            let (_, source) = creds
                .get(&CacheKey::TokenHash(digest("t")), "t", digest("t"))
                .await
                .unwrap();
            assert_eq!(source, Source::Upstream);
        }
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn irrecoverable_errors_evict_and_transient_ones_keep() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), Duration::from_secs(3600));
        let key = CacheKey::TokenHash(digest("t"));
        creds.get(&key, "t", digest("t")).await.unwrap();
        let cases = [
            (
                UpstreamError::no_answer(crate::upstream::NoAnswer::Timeout, "timeout"),
                true,
            ),
            (refusal(), false),
        ];
        for (err, kept) in cases {
            *upstream.fail_with.lock().unwrap() = Some(err.clone());
            // A renewal's call, as a request that finds the entry due makes.
            assert!(
                creds
                    .fetch(key.clone(), "t".into(), digest("t"), Purpose::Renewal)
                    .await
                    .is_err()
            );
            let cached = creds
                .inner
                .cache
                .as_ref()
                .unwrap()
                .get(&key)
                .await
                .is_some();
            assert_eq!(cached, kept, "{err:?}");
        }
    }
}
