//! Credentials per identity: a bounded cache (moka), exact single-flight of
//! upstream calls, and paced refresh-ahead.
//!
//! Knows identities and credentials, not HTTP.
//!
//! * Single-flight: concurrent requests for one identity share one upstream
//!   call. The call runs in its own task, so a client that disconnects (its
//!   request future dropped) cancels nothing the others wait on.
//! * Refresh-ahead: an entry is renewed in the background once held for
//!   `retention` or when close to expiry, paced at `max_service_qps`; readers
//!   keep getting the cached credentials meanwhile. So an entry keeps the
//!   token EKS Auth accepted (as the reference does): renewing only when a
//!   request brings it would renew when the SDKs ask — minutes before
//!   expiry — and an EKS Auth outage of those minutes would fail pods that
//!   a renewal at `retention` keeps served for hours.
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
    sync::{Arc, Mutex},
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
        }
    }
}

/// Whether the answer came from the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Upstream,
}

#[derive(Clone, Debug)]
pub struct CacheOptions {
    pub max_entries: u64,
    /// `--max-credential-retention-before-renewal`; zero disables caching.
    pub retention: Duration,
    /// `--max-service-qps` for background refreshes.
    pub max_service_qps: f64,
}

/// Credentials as cached and as handed to requests (it dereferences to
/// them): one allocation per identity.
pub struct Entry {
    assumed: Assumed,
    refresh_at: Instant,
    /// Instant from which the entry is no longer servable.
    unservable_at: Instant,
    /// The token EKS Auth accepted for these credentials: the only one they
    /// are served for, and what a refresh presents.
    token: Box<str>,
    token_hash: Digest,
}

impl Entry {
    fn new(assumed: Assumed, token: Box<str>, token_hash: Digest, retention: Duration) -> Entry {
        let now = Instant::now();
        let lifetime = assumed
            .expiration
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Renew when held for `retention`, or halfway through short lives,
        // and at the latest five minutes before expiry.
        let margin = (lifetime / 2).min(Duration::from_secs(300));
        let refresh_in = retention.min(lifetime.saturating_sub(margin));
        Entry {
            assumed,
            refresh_at: now + refresh_in,
            unservable_at: now + lifetime.saturating_sub(MIN_REMAINING),
            token_hash,
            token,
        }
    }

    fn servable(&self, now: Instant) -> bool {
        now < self.unservable_at
    }
}

impl std::ops::Deref for Entry {
    type Target = Assumed;

    fn deref(&self) -> &Assumed {
        &self.assumed
    }
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

struct Inner {
    cache: Option<Cache<CacheKey, Arc<Entry>>>,
    in_flight: Mutex<HashMap<FlightKey, Fetch>>,
    upstream: Arc<dyn Upstream>,
    metrics: Arc<Metrics>,
    options: CacheOptions,
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
                options,
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
        if let Some(cache) = &inner.cache
            && let Some(entry) = cache.get(key).await
            && entry.servable(Instant::now())
            && entry.token_hash == presented
        {
            inner.metrics.cache_lookup(true);
            return Ok((entry, Source::Cache));
        }
        inner.metrics.cache_lookup(false);
        if inner.cache.is_some() {
            inner.metrics.cache(CacheState::Miss);
        }
        let assumed = self.fetch(key.clone(), token.to_owned(), presented).await?;
        Ok((assumed, Source::Upstream))
    }

    /// Joins the in-flight upstream call for `key` with this very token, or
    /// starts one.
    fn fetch(&self, key: CacheKey, token: String, presented: Digest) -> Fetch {
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
            let result = inner.upstream.assume(token.clone()).await;
            inner.metrics.upstream_call(
                started.elapsed(),
                result.as_ref().err().map(UpstreamError::code),
            );
            let result = result.map(|assumed| {
                let retention = inner.options.retention;
                Arc::new(Entry::new(assumed, token.into(), presented, retention))
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

    /// Renews due entries forever, at most `max_service_qps` calls a second.
    /// Spawn it once per agent.
    pub async fn refresh_loop(self) {
        let Some(cache) = self.inner.cache.clone() else {
            return;
        };
        let qps = self.inner.options.max_service_qps.max(0.001);
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / qps));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let scan_every = (self.inner.options.retention / 4)
            .clamp(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            tokio::time::sleep(scan_every).await;
            let now = Instant::now();
            let due: Vec<(CacheKey, String, Digest)> = cache
                .iter()
                .filter(|(_, entry)| now >= entry.refresh_at && entry.servable(now))
                .map(|(key, entry)| ((*key).clone(), entry.token.to_string(), entry.token_hash))
                .collect();
            // moka counts entries once its pending writes are applied: here,
            // off the request path, the gauge catches up with them.
            cache.run_pending_tasks().await;
            self.inner.metrics.set_cache_entries(cache.entry_count());
            for (key, token, presented) in due {
                pace.tick().await;
                debug!(?key, "refreshing credentials ahead of expiry");
                match self.fetch(key, token, presented).await {
                    Ok(_) => self.inner.metrics.cache(CacheState::Renewed),
                    Err(err) => {
                        let recoverable = err.is_recoverable();
                        self.inner
                            .metrics
                            .renewal_error(recoverable, err.reference_code());
                        if recoverable {
                            warn!(error = %err, "refresh failed; keeping the cached credentials until they expire");
                        } else {
                            info!(error = %err, "refresh refused; credentials evicted");
                        }
                    }
                }
            }
        }
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
        CredentialCache::new(
            upstream,
            Arc::new(Metrics::new()),
            CacheOptions {
                max_entries: 100,
                retention,
                max_service_qps: 100.0,
            },
        )
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
        assert_eq!(&*entry.token, "genuine");
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
            (
                UpstreamError::Service {
                    status: http::StatusCode::BAD_REQUEST,
                    code: "AccessDeniedException".into(),
                    message: "no".into(),
                    request_id: "r".into(),
                    fault: "client",
                },
                false,
            ),
        ];
        for (err, kept) in cases {
            *upstream.fail_with.lock().unwrap() = Some(err.clone());
            // A forced refresh (what the refresh loop does when due).
            assert!(
                creds
                    .fetch(key.clone(), "t".into(), digest("t"))
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
