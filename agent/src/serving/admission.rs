//! Connection budgets: how many connections each client may hold open on a
//! listener group, and what happens when the group is full.
//!
//! The server accepts every connection at once (the kernel's accept queue
//! never fills because the agent stopped accepting) and then asks here:
//! * a client already holding its share is refused the new connection;
//! * when the group holds its total, the newcomer is still admitted and the
//!   oldest connection of the client holding the most is evicted — so many
//!   clients ganging up cannot lock out one that holds little (the kubelet's
//!   probe, a pod's first request).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::Notify;
use tracing::debug;

use crate::{
    caller::attribution::Accepted,
    caller::identify::{Identified, Identifier},
    serving::client::ClientKey,
    telemetry::{audit::Peer, metrics::Metrics},
    token,
};

/// One listener group's budget. Cheap to clone; clones share the counts.
#[derive(Clone)]
pub struct ConnectionBudget {
    inner: Arc<Inner>,
}

struct Inner {
    total: usize,
    per_client: usize,
    state: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    open: usize,
    next_id: u64,
    /// Each client's connections, oldest first, with their eviction signal.
    by_client: HashMap<ClientKey, VecDeque<(u64, Arc<Notify>)>>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client already holds its share.
    ClientFull,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ClientFull => "client-limit",
        }
    }
}

/// An admitted connection's place in the budget, given back on drop.
pub struct Admitted {
    inner: Arc<Inner>,
    client: ClientKey,
    id: u64,
    evicted: Arc<Notify>,
}

impl Inner {
    /// The lock guards plain bookkeeping that no code path leaves half
    /// done, so a poisoned lock is still consistent.
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ConnectionBudget {
    /// `total` connections for the group, `per_client` of them for any one
    /// client.
    pub fn new(total: usize, per_client: usize) -> ConnectionBudget {
        ConnectionBudget {
            inner: Arc::new(Inner {
                total: total.max(1),
                per_client: per_client.max(1),
                state: Mutex::new(Counts::default()),
            }),
        }
    }

    /// Admits a connection of `client`; `Ok(true)` in the second field when
    /// another client's connection was evicted to make room.
    pub fn admit(&self, client: ClientKey) -> Result<(Admitted, bool), Refusal> {
        let mut counts = self.inner.counts();
        let held = counts.by_client.get(&client).map_or(0, VecDeque::len);
        if held >= self.inner.per_client {
            return Err(Refusal::ClientFull);
        }
        let mut evicted_one = false;
        if counts.open >= self.inner.total
            && let Some(victims) = counts.by_client.values_mut().max_by_key(|c| c.len())
            && let Some((_, signal)) = victims.pop_front()
        {
            // The evicted connection gives its place back when it drops;
            // until then the group is over its total by the evictions in
            // flight, never by more.
            signal.notify_one();
            evicted_one = true;
        }
        counts.open += 1;
        counts.next_id += 1;
        let id = counts.next_id;
        let evicted = Arc::new(Notify::new());
        counts
            .by_client
            .entry(client.clone())
            .or_default()
            .push_back((id, evicted.clone()));
        Ok((
            Admitted {
                inner: self.inner.clone(),
                client,
                id,
                evicted,
            },
            evicted_one,
        ))
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.inner.counts().open
    }
}

impl Admitted {
    pub fn client(&self) -> &ClientKey {
        &self.client
    }

    /// Fires when the budget evicts this connection.
    pub fn evicted(&self) -> Arc<Notify> {
        self.evicted.clone()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self.inner.counts();
        counts.open = counts.open.saturating_sub(1);
        if let Some(held) = counts.by_client.get_mut(&self.client) {
            held.retain(|(id, _)| *id != self.id);
            if held.is_empty() {
                counts.by_client.remove(&self.client);
            }
        }
    }
}

/// An admitted connection: where it came from, who the kernel says opened
/// it (resolved once, at accept: the record cannot change for the
/// connection's life), and its place in the budget.
pub struct Connection {
    pub info: Accepted,
    /// The client's address as the audit trail writes it.
    pub peer: Peer,
    /// `None` when attribution is off.
    pub identified: Option<Identified>,
    pub admitted: Admitted,
    /// The last token this connection presented, parsed.
    pub token: token::Memo,
}

impl crate::serving::server::Evictable for Connection {
    fn eviction(&self) -> Arc<Notify> {
        self.admitted.evicted()
    }
}

/// One listener group's admission: identify the caller, then charge its
/// budget. `None`: the connection is to be closed (counted, and logged at
/// debug only — a flood must not flood the logs too).
pub fn admit(
    info: Accepted,
    identifier: Option<&Identifier>,
    budget: &ConnectionBudget,
    metrics: &Metrics,
    listener: &'static str,
) -> Option<Connection> {
    let identified = identifier.map(|i| i.identify(&info));
    let client = ClientKey::of(identified.as_ref(), info.peer.ip());
    match budget.admit(client) {
        Ok((admitted, evicted_one)) => {
            if evicted_one {
                metrics.connection_refused(listener, "evicted");
            }
            tracing::trace!(client_addr = %info.peer, listener, client = %admitted.client(), "connection admitted");
            Some(Connection {
                peer: Peer::new(info.peer),
                info,
                identified,
                admitted,
                token: token::Memo::default(),
            })
        }
        Err(refusal) => {
            metrics.connection_refused(listener, refusal.label());
            debug!(client_addr = %info.peer, listener, reason = refusal.label(), "connection refused");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str) -> ClientKey {
        ClientKey::Pod(uid.into())
    }

    #[test]
    fn a_client_is_held_to_its_share_and_others_are_not_affected() {
        let budget = ConnectionBudget::new(10, 3);
        let hog: Vec<_> = (0..3).map(|_| budget.admit(pod("hog")).unwrap()).collect();
        assert_eq!(budget.admit(pod("hog")).err(), Some(Refusal::ClientFull));
        let other = budget.admit(pod("other")).unwrap();
        assert_eq!(budget.open(), 4);
        drop(hog);
        assert_eq!(budget.open(), 1);
        assert!(budget.admit(pod("hog")).is_ok(), "share given back on drop");
        drop(other);
    }

    #[tokio::test]
    async fn a_full_group_evicts_the_biggest_holders_oldest_for_a_newcomer() {
        let budget = ConnectionBudget::new(4, 3);
        let big: Vec<_> = (0..3)
            .map(|_| budget.admit(pod("big")).unwrap().0)
            .collect();
        let (_small, evicted) = budget.admit(pod("small")).unwrap();
        assert!(!evicted, "room left");
        let (_newcomer, evicted) = budget.admit(ClientKey::Unverified).unwrap();
        assert!(evicted, "the group was full");
        // The big holder's oldest connection is told to go; the others not.
        let (oldest, next) = (big[0].evicted(), big[1].evicted());
        tokio::time::timeout(std::time::Duration::from_secs(1), oldest.notified())
            .await
            .expect("oldest of the biggest holder evicted");
        let later = tokio::time::timeout(std::time::Duration::from_millis(50), next.notified());
        assert!(later.await.is_err(), "only one eviction per newcomer");
    }
}
