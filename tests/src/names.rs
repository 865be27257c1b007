//! Unique, short names: tests run in parallel (threads and processes) and
//! interface names are limited to 15 bytes.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A number unique to this call across every test process running at once:
/// the pid (at most 22 bits on Linux) above a per-process call count
/// (24 bits: 16 M calls before it could repeat).
pub fn unique_id() -> u64 {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
    (u64::from(std::process::id()) << 24) | u64::from(n)
}

/// `prefix` + [`unique_id`] in base 36: at most 9 characters, so a prefix
/// of up to 6 bytes still makes a valid interface name.
pub fn unique(prefix: &str) -> String {
    let mut n = unique_id();
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    format!("{prefix}{}", String::from_utf8_lossy(&digits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_do_not_repeat_and_fit_an_interface() {
        let names: std::collections::HashSet<String> = (0..1000).map(|_| unique("vh")).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.len() <= 15));
    }
}
