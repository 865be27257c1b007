//! Dead-pod hygiene: the reference agent keeps renewing credentials of pods
//! that are long gone and burns the account's EKS Auth quota. Here every
//! cache entry served to an attributed pod remembers that pod's cgroup; when
//! the cgroup disappears, the entries go and are never refreshed again. No
//! API server needed: the kernel's cgroup tree is the truth.

use std::{collections::HashMap, path::PathBuf, sync::Mutex};

use crate::credentials::{CacheKey, CredentialCache};

#[derive(Default)]
pub struct PodRegistry {
    /// Cache key → pod-level cgroup directory (absolute).
    owners: Mutex<HashMap<CacheKey, PathBuf>>,
}

impl PodRegistry {
    /// Remembers whose pod a freshly cached identity is.
    pub fn record(&self, key: CacheKey, pod_cgroup: PathBuf) {
        if let Ok(mut owners) = self.owners.lock() {
            owners.insert(key, pod_cgroup);
        }
    }

    /// Evicts the cached credentials of every pod whose cgroup is gone (and
    /// forgets them); returns (identities of gone pods, entries evicted).
    pub async fn evict_dead(&self, credentials: &CredentialCache) -> (usize, usize) {
        let mut dead = Vec::new();
        if let Ok(mut owners) = self.owners.lock() {
            owners.retain(|key, dir| {
                let alive = dir.exists();
                if !alive {
                    dead.push(key.clone());
                }
                alive
            });
        }
        if dead.is_empty() {
            return (0, 0);
        }
        (dead.len(), credentials.evict(&dead).await)
    }
}
