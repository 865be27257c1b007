//! Unique, short names: tests run in parallel (threads and processes) and
//! interface names are limited to 15 bytes.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process- and call-unique number.
pub fn unique_id() -> u32 {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (std::process::id() % 100_000) * 100 + n % 100
}

/// `prefix` + a unique number, at most 15 bytes for prefixes up to 8 bytes.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", unique_id())
}
