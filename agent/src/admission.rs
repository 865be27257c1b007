//! Connection budgets: how many connections each client may hold open on a
//! listener, and the listener's total.
//!
//! The server accepts every connection at once (the kernel's accept queue
//! never fills because the agent stopped accepting) and then asks here;
//! a connection over its client's share is closed straight away, so a
//! client holding thousands of idle connections only ever occupies its own
//! share and everyone else keeps being served.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tracing::debug;

use crate::{
    client::ClientKey,
    identify::{Identified, Identifier},
    metrics::Metrics,
    server::ConnInfo,
};

/// An admitted connection: where it came from, who the kernel says opened
/// it (resolved once, at accept: the record cannot change for the
/// connection's life), and its place in the budget.
pub struct Connection {
    pub info: ConnInfo,
    /// `None` when attribution is off.
    pub identified: Option<Identified>,
    pub admitted: Admitted,
}

/// One listener group's admission: identify the caller, then charge its
/// budget. `None`: the connection is to be closed (counted, and logged at
/// debug only — a flood must not flood the logs too).
pub fn admit(
    info: ConnInfo,
    identifier: Option<&Identifier>,
    budget: &ConnectionBudget,
    metrics: &Metrics,
    listener: &'static str,
) -> Option<Connection> {
    let identified = identifier.map(|i| i.identify(&info.accepted()));
    let client = ClientKey::of(identified.as_ref(), info.peer.ip());
    match budget.admit(client) {
        Ok(admitted) => Some(Connection {
            info,
            identified,
            admitted,
        }),
        Err(refusal) => {
            metrics.connection_refused(listener, refusal.label());
            debug!(client_addr = %info.peer, listener, reason = refusal.label(), "connection refused");
            None
        }
    }
}

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
    by_client: HashMap<ClientKey, usize>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The client already holds its share.
    ClientFull,
    /// The listener group holds its total.
    Full,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ClientFull => "client-limit",
            Refusal::Full => "total-limit",
        }
    }
}

/// An admitted connection's place in the budget, given back on drop.
pub struct Admitted {
    inner: Arc<Inner>,
    client: ClientKey,
}

impl ConnectionBudget {
    /// `total` connections at most, `per_client` of them for any one client.
    pub fn new(total: usize, per_client: usize) -> ConnectionBudget {
        ConnectionBudget {
            inner: Arc::new(Inner {
                total: total.max(1),
                per_client: per_client.max(1),
                state: Mutex::new(Counts::default()),
            }),
        }
    }

    pub fn admit(&self, client: ClientKey) -> Result<Admitted, Refusal> {
        // The lock guards plain counters: a panic cannot leave them
        // half-updated, so a poisoned lock is still consistent.
        let mut counts = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let held = counts.by_client.get(&client).copied().unwrap_or(0);
        if held >= self.inner.per_client {
            return Err(Refusal::ClientFull);
        }
        if counts.open >= self.inner.total {
            return Err(Refusal::Full);
        }
        counts.open += 1;
        *counts.by_client.entry(client.clone()).or_default() += 1;
        Ok(Admitted {
            inner: self.inner.clone(),
            client,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
    }
}

impl Admitted {
    pub fn client(&self) -> &ClientKey {
        &self.client
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut counts = self
            .inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        counts.open = counts.open.saturating_sub(1);
        if let Some(held) = counts.by_client.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                counts.by_client.remove(&self.client);
            }
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

    #[test]
    fn the_total_caps_everyone_together() {
        let budget = ConnectionBudget::new(2, 5);
        let _a = budget.admit(pod("a")).unwrap();
        let _b = budget.admit(ClientKey::Cgroup(7)).unwrap();
        assert_eq!(
            budget
                .admit(ClientKey::Source("10.0.0.1".parse().unwrap()))
                .err(),
            Some(Refusal::Full)
        );
    }
}
