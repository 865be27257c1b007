//! Dead-pod hygiene: the reference agent keeps renewing credentials of pods
//! that are long gone and burns the account's EKS Auth quota. Here every
//! cache entry served to an attributed pod remembers that pod's cgroup; when
//! the cgroup disappears, the entries go and are never refreshed again. No
//! API server needed: the kernel's cgroup tree is the truth.

use std::{collections::HashMap, path::PathBuf, sync::Mutex, time::Duration};

use tracing::info;

use crate::credentials::{CacheKey, Credentials};

#[derive(Default)]
pub struct PodRegistry {
    /// Cache key → pod-level cgroup directory (absolute).
    owners: Mutex<HashMap<CacheKey, PathBuf>>,
}

impl PodRegistry {
    pub fn record(&self, key: &CacheKey, pod_cgroup: PathBuf) {
        if let Ok(mut owners) = self.owners.lock()
            && owners.get(key) != Some(&pod_cgroup)
        {
            owners.insert(key.clone(), pod_cgroup);
        }
    }

    /// Keys whose pod cgroup no longer exists (removed from the registry).
    pub fn take_dead(&self) -> Vec<CacheKey> {
        let Ok(mut owners) = self.owners.lock() else {
            return Vec::new();
        };
        let dead: Vec<CacheKey> = owners
            .iter()
            .filter(|(_, dir)| !dir.exists())
            .map(|(k, _)| k.clone())
            .collect();
        for key in &dead {
            owners.remove(key);
        }
        dead
    }

    /// Every `every`, evicts the entries of pods that are gone.
    pub async fn gc_loop(self: std::sync::Arc<Self>, credentials: Credentials, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let dead = self.take_dead();
            if dead.is_empty() {
                continue;
            }
            let evicted = credentials.retain(|key| !dead.contains(key)).await;
            info!(
                pods_gone = dead.len(),
                evicted, "evicted credentials of pods that no longer exist"
            );
        }
    }
}
