//! Lines the agent could not write are never lost silently: the log and
//! audit writers drop rather than block a request, and this watcher turns
//! their counts into a metric and a log line.
//!
//! A warning about stdout goes to stdout, the very output that is behind;
//! it may be dropped too, but the metric still counts.

use std::{sync::Arc, time::Duration};

use tracing::warn;

use super::{logging, metrics::Metrics, spool::Lost};

/// How often the counts are looked at.
const EVERY: Duration = Duration::from_secs(5);

/// Watches forever; spawn once. `audit` says what the audit file lost.
pub async fn watch(metrics: Arc<Metrics>, audit: impl Fn() -> Lost) {
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Seen {
            stdout: logging::stdout_lost(),
            audit: audit(),
        };
        for (sink, reason, lines) in seen.grown(&now) {
            metrics.lines_dropped(sink, reason, lines);
            warn!(
                sink,
                reason, lines, "log lines lost: the output does not keep up (or refuses writes)"
            );
        }
        seen = now;
    }
}

/// The counts as last seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Seen {
    stdout: Lost,
    audit: Lost,
}

impl Seen {
    /// What grew since `self`: (sink, reason, lines).
    fn grown(&self, now: &Seen) -> Vec<(&'static str, &'static str, u64)> {
        [
            ("stdout", self.stdout, now.stdout),
            ("audit-file", self.audit, now.audit),
        ]
        .into_iter()
        .flat_map(|(sink, before, after)| {
            [
                (
                    sink,
                    "queue-full",
                    after.dropped.saturating_sub(before.dropped),
                ),
                (
                    sink,
                    "write-error",
                    after.failed.saturating_sub(before.failed),
                ),
            ]
        })
        .filter(|&(_, _, lines)| lines > 0)
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_grew_is_reported_by_how_much() {
        let before = Seen {
            stdout: Lost {
                dropped: 3,
                failed: 0,
            },
            audit: Lost {
                dropped: 1,
                failed: 0,
            },
        };
        let after = Seen {
            stdout: before.stdout,
            audit: Lost {
                dropped: 5,
                failed: 2,
            },
        };
        assert_eq!(
            before.grown(&after),
            vec![
                ("audit-file", "queue-full", 4),
                ("audit-file", "write-error", 2)
            ]
        );
        assert!(after.grown(&after).is_empty());
    }
}
