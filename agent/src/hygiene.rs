//! Dead-pod hygiene: the reference agent keeps renewing credentials of pods
//! that are long gone and burns the account's EKS Auth quota. Here nothing
//! renews an entry nobody asks for, and every cache entry served to an
//! attributed pod remembers that pod's cgroup: when the cgroup disappears,
//! the entries go at once rather than at their expiry. No API server
//! needed: the kernel's cgroup tree is the truth.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Mutex,
};

use crate::credentials::{CacheKey, CredentialCache};

#[derive(Default)]
pub struct PodRegistry {
    /// Pod-level cgroup directory (absolute) → the identities cached for
    /// it: one path per pod, however many tokens it presented.
    owned: Mutex<HashMap<PathBuf, HashSet<CacheKey>>>,
}

impl PodRegistry {
    /// Remembers whose pod a freshly cached identity is.
    pub fn record(&self, key: CacheKey, pod_cgroup: PathBuf) {
        if let Ok(mut owned) = self.owned.lock() {
            owned.entry(pod_cgroup).or_default().insert(key);
        }
    }

    /// Evicts the cached credentials of every pod whose cgroup is gone (and
    /// forgets them, and the identities of living pods the cache no longer
    /// holds); returns (identities of gone pods, entries evicted).
    pub async fn evict_dead(&self, credentials: &CredentialCache) -> (usize, usize) {
        let mut dead = Vec::new();
        if let Ok(mut owned) = self.owned.lock() {
            owned.retain(|dir, keys| {
                if !dir.exists() {
                    dead.extend(keys.drain());
                    return false;
                }
                keys.retain(|key| credentials.contains(key));
                !keys.is_empty()
            });
        }
        if dead.is_empty() {
            return (0, 0);
        }
        (dead.len(), credentials.evict(&dead).await)
    }
}
