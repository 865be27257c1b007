//! Per-pod inbound rate limit: one token bucket per pod UID (governor), so
//! one noisy pod cannot starve the node's others.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct PodRateLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl PodRateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<PodRateLimiter> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
        Some(PodRateLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        })
    }

    /// Takes one token from the pod's bucket; false when empty.
    pub fn allow(&self, pod_uid: &str) -> bool {
        self.limiter.check_key(&pod_uid.to_owned()).is_ok()
    }

    /// Forgets idle pods' buckets (bounded memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noisy_pod_is_limited_alone() {
        let limiter = PodRateLimiter::new(1, 3).unwrap();
        let allowed = (0..10).filter(|_| limiter.allow("noisy")).count();
        assert_eq!(allowed, 3, "burst");
        assert!(limiter.allow("quiet"), "another pod is unaffected");
        assert!(PodRateLimiter::new(0, 10).is_none());
    }
}
