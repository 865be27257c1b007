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
//!   credentials. Past that, over `max_service_qps`, or when EKS Auth fails
//!   transiently, it gets the cached ones, and the renewal goes on or is
//!   retried after [`RENEWAL_RETRY`].
//! * The SDKs ask again only shortly before the `Expiration` they were
//!   given, so an entry's answer advertises its renewal time plus
//!   [`ASK_MARGIN`] (never more than the credentials' own expiration): they
//!   come back when the entry is due, hours before the credentials expire.
//!   While a renewal cannot be made, the cached credentials are advertised
//!   [`ASK_MARGIN`] at a time, so the SDKs keep asking and the agent keeps
//!   trying until they really expire — an EKS Auth outage is survived for
//!   as long as with the reference's background sweep.
//!
//!   Why not that sweep: it must keep every pod's token (a bearer
//!   credential, ~1 KiB) for as long as the entry lives, and it calls EKS
//!   Auth for every entry each `retention`, also for identities nobody
//!   asks for anymore (a rotated token, a finished job). Here a token lives
//!   only as long as its request (and the EKS Auth call it started), and
//!   EKS Auth hears only of identities in use.
//! * Never serves credentials with ≤ 15 s left (the SDKs would refetch at
//!   once). Irrecoverable upstream verdicts evict; transient failures keep the
//!   old credentials until they are no longer servable.
//! * Only a token EKS Auth accepted is ever answered from an entry or used
//!   to renew it: the agent does not verify signatures, so a token it has
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
use moka::{Expiry, future::Cache, notification::RemovalCause, ops::compute::Op};
use tracing::{debug, info, warn};

use crate::{
    telemetry::metrics::{CacheState, Metrics},
    token::Digest,
    upstream::{Assumed, SdkAnswer, Upstream, UpstreamError},
};

/// Credentials with this little life left are not served (reference agent).
pub const MIN_REMAINING: Duration = Duration::from_secs(15);

/// The longest a request waits for the renewal it started before it is
/// answered from the entry: the SDKs give a credential request 1–5 s.
pub const RENEWAL_WAIT: Duration = Duration::from_millis(500);

/// After a renewal that failed or was not made, the next try waits this
/// long (the reference retries a failed refresh within 1–2 minutes).
pub const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// How far beyond an entry's renewal time its answer's `Expiration` lies:
/// more than any SDK's refresh window (botocore's is 15 minutes), so the
/// SDKs ask once the entry is due and not before.
pub const ASK_MARGIN: Duration = Duration::from_secs(20 * 60);

/// The longest a kept entry waits for its next renewal try: its answer
/// then still has 16 minutes, beyond botocore's 15-minute window.
const KEPT_RETRY_MAX: Duration = Duration::from_secs(4 * 60);

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
        // `concat` sizes the string once (a `format!` grew it twice, per
        // request).
        CacheKey::Pod(
            [uid, "/", namespace, "/", service_account]
                .concat()
                .into_boxed_str(),
        )
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
    /// When the entry is due for renewal, in milliseconds since the cache's
    /// epoch: from then on its answer's advertised `Expiration` may pass.
    due_at: u64,
    /// When a request should next try to renew it (same unit): `due_at`,
    /// moved on by each request that takes a renewal on.
    renew_at: AtomicU64,
    /// Instant from which the entry is no longer servable.
    unservable_at: Instant,
    /// SHA-256 of the token EKS Auth accepted for these credentials: the
    /// only token they are served for, and so the one a renewal presents.
    token_hash: Digest,
}

impl Entry {
    /// Fresh credentials, due for renewal after `retention` (halfway
    /// through short lives, at the latest [`ASK_MARGIN`] before expiry, so
    /// an SDK asking within its window finds them due). With a cache their
    /// answer says when to ask again; without one (zero retention: nothing
    /// to renew) when they expire.
    fn new(mut assumed: Assumed, token_hash: Digest, retention: Duration, epoch: Instant) -> Entry {
        let now = Instant::now();
        let wall = SystemTime::now();
        let lifetime = assumed.expiration.duration_since(wall).unwrap_or_default();
        let margin = (lifetime / 2).min(ASK_MARGIN);
        let renew_in = retention.min(lifetime.saturating_sub(margin));
        // Straight from EKS Auth, the answer says the real expiration.
        if !retention.is_zero() && wall + renew_in + ASK_MARGIN < assumed.expiration {
            assumed.answer = advertised(&assumed, renew_in + ASK_MARGIN);
        }
        let due_at = millis_since(epoch, now + renew_in);
        Entry {
            assumed,
            due_at,
            renew_at: AtomicU64::new(due_at),
            unservable_at: now + lifetime.saturating_sub(MIN_REMAINING),
            token_hash,
        }
    }

    /// The same credentials, served while their renewal cannot be made:
    /// advertised for [`ASK_MARGIN`] more (or until they expire), the
    /// renewal due `retry` from now — at most [`KEPT_RETRY_MAX`], so that
    /// until then the answer stays outside every SDK's refresh window.
    fn kept(&self, retry: Duration, epoch: Instant) -> Entry {
        let mut assumed = self.assumed.clone();
        assumed.answer = advertised(&assumed, ASK_MARGIN);
        let due_at = millis_since(epoch, Instant::now() + retry.min(KEPT_RETRY_MAX));
        Entry {
            assumed,
            due_at,
            renew_at: AtomicU64::new(due_at),
            unservable_at: self.unservable_at,
            token_hash: self.token_hash,
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
}

impl std::ops::Deref for Entry {
    type Target = Assumed;

    fn deref(&self) -> &Assumed {
        &self.assumed
    }
}

/// `assumed`'s answer with `Expiration` `ask_in` from now, or the
/// credentials' own if sooner (the answer at hand may say an earlier time
/// than either).
fn advertised(assumed: &Assumed, ask_in: Duration) -> bytes::Bytes {
    let until = (SystemTime::now() + ask_in).min(assumed.expiration);
    SdkAnswer::reissue(&assumed.answer, until).unwrap_or_else(|| assumed.answer.clone())
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

    /// A renewal (or a kept copy) replaces the entry: its new deadline
    /// applies (moka's default would keep the old one).
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
            let now_ms = millis_since(inner.epoch, now);
            if now_ms < entry.due_at {
                return Ok((entry, Source::Cache));
            }
            if entry.take_renewal(now_ms) {
                return self.renew(key, token, presented, entry).await;
            }
            // Due, and another request is renewing it (or just failed to):
            // its answer's `Expiration` may have passed, so this one gets
            // the credentials advertised afresh (not cached: the renewal
            // replaces the entry in a moment).
            return Ok((
                Arc::new(entry.kept(RENEWAL_RETRY, inner.epoch)),
                Source::Cache,
            ));
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
    /// entry's, kept (the call goes on and replaces them when it answers).
    /// Only EKS Auth's verdict on the token or its association fails the
    /// request: the entry is gone then, as the next request would find.
    async fn renew(
        &self,
        key: &CacheKey,
        token: &str,
        presented: Digest,
        entry: Arc<Entry>,
    ) -> Result<(Arc<Entry>, Source), UpstreamError> {
        let renewals = &self.inner.renewals;
        if let Err(not_until) = renewals.check() {
            // Over `--max-service-qps`: a request after the next free slot
            // renews.
            let wait = not_until.wait_time_from(governor::clock::Clock::now(renewals.clock()));
            return Ok((self.keep(key, &entry, wait).await, Source::Cache));
        }
        let call = self.fetch(key.clone(), token.to_owned(), presented, Purpose::Renewal);
        match tokio::time::timeout(RENEWAL_WAIT, call).await {
            Ok(Ok(renewed)) => Ok((renewed, Source::Renewal)),
            Ok(Err(err)) if !err.is_recoverable() => Err(err),
            // Failed for now (counted and logged by the call) or slow.
            Ok(Err(_)) | Err(_) => Ok((self.keep(key, &entry, RENEWAL_RETRY).await, Source::Cache)),
        }
    }

    /// `entry`'s credentials, kept in its place for the renewal to be tried
    /// `retry` from now ([`Entry::kept`]) — unless something replaced it
    /// meanwhile (a renewal that answered after all), which is served then.
    async fn keep(&self, key: &CacheKey, entry: &Arc<Entry>, retry: Duration) -> Arc<Entry> {
        let kept = Arc::new(entry.kept(retry, self.inner.epoch));
        let Some(cache) = &self.inner.cache else {
            return kept;
        };
        let put = kept.clone();
        let outcome = cache
            .entry(key.clone())
            .and_compute_with(|current| async move {
                match current {
                    Some(current) if Arc::ptr_eq(current.value(), entry) => Op::Put(put),
                    _ => Op::Nop,
                }
            })
            .await;
        match outcome {
            moka::ops::compute::CompResult::Unchanged(current)
                if current.value().token_hash == entry.token_hash
                    && current.value().servable(Instant::now()) =>
            {
                current.into_value()
            }
            _ => kept,
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
            let epoch = inner.epoch;
            let result = result.map(|assumed| {
                Arc::new(Entry::new(
                    assumed,
                    presented,
                    inner.options.retention,
                    epoch,
                ))
            });
            if let Some(cache) = &inner.cache {
                let entry = result.as_ref().ok().cloned();
                let refused = result.as_ref().is_err_and(|e| !e.is_recoverable());
                cache
                    .entry(task_key.clone())
                    .and_compute_with(|current| async move {
                        let ours = current.filter(|c| c.value().token_hash == presented);
                        match (entry, ours) {
                            // A miss: the token just presented is the
                            // identity's now.
                            (Some(entry), _) if purpose == Purpose::Miss => Op::Put(entry),
                            // A renewal replaces only its own token's entry:
                            // not one a newer token made meanwhile, nor one
                            // evicted (a pod gone) meanwhile.
                            (Some(entry), Some(_)) => Op::Put(entry),
                            // Only EKS Auth refusing the entry's own token
                            // evicts it: a refused forgery must not take a
                            // genuine entry down with it.
                            (None, Some(_)) if refused => Op::Remove,
                            // A renewal that failed for now keeps the
                            // credentials, tried again in a minute — here,
                            // whether or not the request that took it on
                            // still waits for it.
                            (None, Some(current)) if purpose == Purpose::Renewal => {
                                Op::Put(Arc::new(current.value().kept(RENEWAL_RETRY, epoch)))
                            }
                            _ => Op::Nop,
                        }
                    })
                    .await;
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

    /// Brings the entries gauge up to date: moka counts entries once its
    /// pending writes are applied, which this does, off the request path.
    pub async fn settle(&self) {
        if let Some(cache) = &self.inner.cache {
            cache.run_pending_tasks().await;
            self.inner.metrics.set_cache_entries(cache.entry_count());
        }
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

/// `max_service_qps` (at least one a day, at most a million a second) as a
/// quota: its period, with a second's worth of renewals (at least one)
/// allowed at once.
fn renewal_quota(max_service_qps: f64) -> governor::Quota {
    let max_service_qps = if max_service_qps.is_nan() {
        1.0
    } else {
        max_service_qps.clamp(1.0 / 86_400.0, 1e6)
    };
    let burst =
        NonZeroU32::new(max_service_qps.ceil().clamp(1.0, 1e6) as u32).unwrap_or(NonZeroU32::MIN);
    governor::Quota::with_period(Duration::from_secs_f64(1.0 / max_service_qps))
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
                    subject: "ns/sa".into(),
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

    /// How long from now the answer's `Expiration` lies.
    fn advertised_in(entry: &Entry) -> Duration {
        let answer: serde_json::Value = serde_json::from_slice(&entry.answer).unwrap();
        let at = humantime::parse_rfc3339(answer["Expiration"].as_str().unwrap()).unwrap();
        at.duration_since(SystemTime::now()).unwrap_or_default()
    }

    /// The SDKs come back shortly before the `Expiration` they were given:
    /// an answer says the entry's renewal time plus the margin, or the
    /// credentials' own expiration if sooner, or that alone without a cache.
    #[tokio::test]
    async fn answers_tell_the_sdks_to_ask_again_when_the_entry_is_due() {
        let hour = Duration::from_secs(3600);
        let cases = [
            // (retention, credentials' lifetime, advertised in)
            (3 * hour, 6 * hour, 3 * hour + ASK_MARGIN),
            // Renewed 5 minutes before expiry: the expiration is sooner.
            (10 * hour, 6 * hour, 6 * hour),
            (hour, 6 * hour, hour + ASK_MARGIN),
            (3 * hour, hour, hour),
            (Duration::ZERO, 6 * hour, 6 * hour),
        ];
        for (retention, lifetime, expected) in cases {
            let upstream = FakeUpstream::new(Duration::ZERO, lifetime);
            let creds = credentials(upstream, retention);
            let key = CacheKey::TokenHash(digest("t"));
            let (entry, _) = creds.get(&key, "t", digest("t")).await.unwrap();
            let advertised = advertised_in(&entry);
            assert!(
                advertised <= expected && advertised + Duration::from_secs(5) >= expected,
                "retention {retention:?}, lifetime {lifetime:?}: advertised in {advertised:?}, expected {expected:?}"
            );
        }
    }

    /// While a renewal cannot be made, the credentials are advertised for
    /// the margin at a time (the SDKs keep asking, the agent keeps
    /// trying), and hits in between get that answer too.
    #[tokio::test]
    async fn credentials_kept_through_a_failed_renewal_are_advertised_for_the_margin() {
        let upstream = FakeUpstream::new(Duration::ZERO, Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), RETENTION);
        let key = CacheKey::TokenHash(digest("t"));
        due(&creds, std::slice::from_ref(&key)).await;
        *upstream.fail_with.lock().unwrap() = Some(UpstreamError::no_answer(
            crate::upstream::NoAnswer::Unreachable,
            "down",
        ));
        for _ in 0..2 {
            let (entry, source) = creds.get(&key, "t", digest("t")).await.unwrap();
            assert_eq!((source, key_id(&entry).as_str()), (Source::Cache, "ASIA0"));
            let advertised = advertised_in(&entry);
            assert!(
                advertised <= ASK_MARGIN && advertised + Duration::from_secs(5) >= ASK_MARGIN,
                "advertised in {advertised:?}"
            );
        }
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 2, "retried at once");
    }

    /// A renewal that fails for now keeps the credentials even when the
    /// request that took it on went away: the entry is replaced (next try
    /// a minute away), not left due for every request to re-advertise.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_renewal_whose_request_went_away_still_keeps_the_entry() {
        let upstream = FakeUpstream::new(Duration::from_millis(100), Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), RETENTION);
        let key = CacheKey::TokenHash(digest("t"));
        due(&creds, std::slice::from_ref(&key)).await;
        let cached = creds.inner.cache.as_ref().unwrap().get(&key).await.unwrap();
        *upstream.fail_with.lock().unwrap() = Some(UpstreamError::no_answer(
            crate::upstream::NoAnswer::Unreachable,
            "down",
        ));
        let taker = tokio::spawn({
            let (creds, key) = (creds.clone(), key.clone());
            async move { creds.get(&key, "t", digest("t")).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        taker.abort();
        let cache = creds.inner.cache.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::ptr_eq(&cache.get(&key).await.unwrap(), &cached) {
            assert!(Instant::now() < deadline, "the due entry was left in place");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (entry, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!((source, key_id(&entry).as_str()), (Source::Cache, "ASIA0"));
        assert_eq!(upstream.calls.load(Ordering::SeqCst), 2, "retried at once");
    }

    /// Requests that find the entry due while another renews it get the
    /// credentials advertised afresh, not the entry's answer, whose
    /// `Expiration` may have passed by then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn others_asking_during_a_renewal_get_a_fresh_expiration() {
        let slow = RENEWAL_WAIT + Duration::from_millis(300);
        let upstream = FakeUpstream::new(slow, Duration::from_secs(3600));
        let creds = credentials(upstream.clone(), RETENTION);
        let key = CacheKey::TokenHash(digest("t"));
        due(&creds, std::slice::from_ref(&key)).await;
        // Past due by more than the answers' one-second resolution.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let cached = creds.inner.cache.as_ref().unwrap().get(&key).await.unwrap();
        let renewing = tokio::spawn({
            let (creds, key) = (creds.clone(), key.clone());
            async move { creds.get(&key, "t", digest("t")).await }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while creds.inner.in_flight.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no renewal started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (other, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!((source, key_id(&other).as_str()), (Source::Cache, "ASIA0"));
        assert!(
            advertised_in(&other) >= advertised_in(&cached) + Duration::from_secs(1),
            "the entry's own Expiration: {:?} vs {:?}",
            advertised_in(&other),
            advertised_in(&cached)
        );
        renewing.await.unwrap().unwrap();
    }

    /// Kept within the margin of their expiration, credentials say that
    /// expiration — not the earlier one their cached answer said.
    #[tokio::test]
    async fn kept_credentials_close_to_expiry_say_their_own_expiration() {
        let lifetime = ASK_MARGIN + Duration::from_secs(5);
        let upstream = FakeUpstream::new(Duration::ZERO, lifetime);
        let expires = SystemTime::now() + lifetime;
        let creds = credentials(upstream.clone(), RETENTION);
        let key = CacheKey::TokenHash(digest("t"));
        due(&creds, std::slice::from_ref(&key)).await;
        // Now `now + margin` lies beyond the expiration.
        tokio::time::sleep(Duration::from_secs(5)).await;
        *upstream.fail_with.lock().unwrap() = Some(UpstreamError::no_answer(
            crate::upstream::NoAnswer::Unreachable,
            "down",
        ));
        let (kept, source) = creds.get(&key, "t", digest("t")).await.unwrap();
        assert_eq!(source, Source::Cache);
        let expires_in = expires.duration_since(SystemTime::now()).unwrap();
        let said = advertised_in(&kept);
        assert!(
            said.abs_diff(expires_in) <= Duration::from_millis(1500),
            "says {said:?}, expires in {expires_in:?}"
        );
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

    #[test]
    fn a_pods_key_is_uid_namespace_and_service_account() {
        assert_eq!(
            CacheKey::pod("0f1e-2d", "ns", "sa"),
            CacheKey::Pod("0f1e-2d/ns/sa".into())
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
