//! Which accept loops stand paused. A handover pauses this agent's accept
//! loops and then switches its kernel programs off, so that the successor's
//! programs alone record new connections. A loop that had not yet seen the
//! pause could accept one more connection, made after the switch and so
//! stamped by the successor's programs, which this agent cannot check: it
//! would refuse a pod that did nothing wrong. So the switch waits until
//! every running loop stands paused; whatever a loop accepted before that
//! was made while this agent's programs still recorded.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

#[derive(Default)]
pub struct Pauses {
    counts: Mutex<Counts>,
    changed: Condvar,
}

#[derive(Default)]
struct Counts {
    running: usize,
    paused: usize,
}

/// Held by an accept loop for as long as it runs.
pub struct Running(Arc<Pauses>);

/// Held by a running accept loop while it stands paused (accepts nothing).
pub struct Paused(Arc<Pauses>);

impl Pauses {
    pub fn new() -> Arc<Pauses> {
        Arc::default()
    }

    pub fn running(self: &Arc<Self>) -> Running {
        self.update(|c| c.running += 1);
        Running(self.clone())
    }

    pub fn paused(self: &Arc<Self>) -> Paused {
        self.update(|c| c.paused += 1);
        Paused(self.clone())
    }

    /// Waits until every running loop stands paused, at most `within`;
    /// whether they all do.
    pub fn wait_all_paused(&self, within: Duration) -> bool {
        let (counts, _) = self
            .changed
            .wait_timeout_while(self.lock(), within, |c| c.paused < c.running)
            .unwrap_or_else(PoisonError::into_inner);
        counts.paused >= counts.running
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Two counters: a panic cannot leave them half-updated.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Counts)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.update(|c| c.running -= 1);
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.0.update(|c| c.paused -= 1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn without_running_loops_all_stand_paused() {
        assert!(Pauses::new().wait_all_paused(SHORT));
    }

    #[test]
    fn the_wait_ends_when_the_last_running_loop_pauses_or_ends() {
        let pauses = Pauses::new();
        let (first, second, third) = (pauses.running(), pauses.running(), pauses.running());
        let standing = first.0.paused();
        assert!(!pauses.wait_all_paused(SHORT), "two loops still accept");
        // One ends: it accepts nothing any more either.
        drop(third);
        assert!(!pauses.wait_all_paused(SHORT), "one loop still accepts");
        let late = std::thread::spawn({
            let pauses = pauses.clone();
            move || {
                std::thread::sleep(SHORT);
                pauses.paused()
            }
        });
        let started = Instant::now();
        assert!(pauses.wait_all_paused(LONG));
        assert!(started.elapsed() >= SHORT, "did not wait for the last loop");
        // Accepting again: the next handover waits again.
        let late = late.join().unwrap();
        drop(standing);
        assert!(!pauses.wait_all_paused(SHORT));
        drop(first);
        assert!(pauses.wait_all_paused(SHORT));
        drop((late, second));
    }
}
