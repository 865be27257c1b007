//! Inbound rate limit per client (governor): one token bucket per pod, per
//! system service, one for every caller the kernel could not vouch for, or
//! per source address with attribution off — in every mode, so one noisy
//! caller, pod or not, cannot starve the node's others or spend EKS Auth
//! calls at will (see `client` for why those are the keys).

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::serving::client::ClientKey;

pub struct ClientRateLimiter {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
}

impl ClientRateLimiter {
    /// `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<ClientRateLimiter> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(rate);
        Some(ClientRateLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        })
    }

    /// Takes one token from the client's bucket; false when empty.
    pub fn allow(&self, client: &ClientKey) -> bool {
        self.limiter.check_key(client).is_ok()
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
    fn a_noisy_client_is_limited_alone() {
        let limiter = ClientRateLimiter::new(1, 3).unwrap();
        let noisy = [
            ClientKey::Pod("noisy".into()),
            ClientKey::Node(42),
            ClientKey::Unverified,
            ClientKey::Source("198.18.0.9".parse().unwrap()),
        ];
        for client in &noisy {
            let allowed = (0..10).filter(|_| limiter.allow(client)).count();
            assert_eq!(allowed, 3, "burst of {client}");
        }
        assert!(
            limiter.allow(&ClientKey::Pod("quiet".into())),
            "another pod is unaffected"
        );
        assert!(ClientRateLimiter::new(0, 10).is_none());
    }
}
