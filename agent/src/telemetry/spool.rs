//! A line writer that never blocks the request path and wakes its output
//! thread once per batch, not once per line.
//!
//! Requests append whole lines to a shared buffer under a short lock. The
//! writer thread sleeps until the first line of a batch arrives, lets the
//! batch gather for [`GATHER`], then takes the whole buffer and writes it
//! with one call. Beyond `limit` bytes waiting, a line is dropped and
//! counted — the output is behind, and a request must not wait for it.
//!
//! Why not `tracing-appender`'s non-blocking writer: it wakes its thread
//! for every line (a futex wake and two context switches per request,
//! measured as the largest cost of a cached credential request under
//! load) and does not count failed writes.

use std::{
    io::Write,
    mem,
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// How long a batch gathers after its first line: the most a line waits
/// before it is written.
pub const GATHER: Duration = Duration::from_millis(5);

/// Buffers larger than this are given back when the writer goes idle
/// (idle memory). Not sooner: under steady load a batch is about as large
/// as the last one, and a buffer given back after every batch was regrown
/// by a chain of reallocations for the next — measured at ~0.5 µs per
/// request at 80 000 requests a second, whose batches straddle this size.
const KEEP_CAPACITY: usize = 256 * 1024;

/// The appending side. Cheap to clone; every clone feeds the same thread.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Pending>,
    arrived: Condvar,
    limit: usize,
    /// Lines dropped because `limit` bytes were already waiting.
    dropped: AtomicU64,
    /// Lines of batches the output refused (an I/O error).
    failed: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closing: bool,
}

/// Dropping it writes out what is pending and stops the thread.
pub struct SpoolGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What a spool lost so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Lines dropped: the output was `limit` bytes behind.
    pub dropped: u64,
    /// Lines the output refused (a full disk, a closed pipe).
    pub failed: u64,
}

impl Spool {
    /// Starts the thread `name` writing to `out`, holding at most `limit`
    /// bytes of pending lines.
    pub fn start<W: Write + Send + 'static>(
        out: W,
        name: &str,
        limit: usize,
    ) -> std::io::Result<(Spool, SpoolGuard)> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            arrived: Condvar::new(),
            limit,
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || worker.run(out))?;
        Ok((
            Spool {
                shared: shared.clone(),
            },
            SpoolGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Queues one line (`line` ends with its newline). Never waits for
    /// the output; drops (and counts) the line if too much is pending.
    pub fn line(&self, line: &[u8]) {
        let shared = &*self.shared;
        let mut pending = shared.lock();
        if pending.bytes.len() + line.len() > shared.limit {
            drop(pending);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let first = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        // Only the first line of a batch wakes the thread.
        if first {
            shared.arrived.notify_one();
        }
    }

    pub fn lost(&self) -> Lost {
        Lost {
            dropped: self.shared.dropped.load(Ordering::Relaxed),
            failed: self.shared.failed.load(Ordering::Relaxed),
        }
    }
}

/// As a `tracing` writer: the formatter writes each event with one
/// `write_all` of the whole line.
impl Write for &Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Spool {
    type Writer = &'a Spool;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Shared {
    /// A panic elsewhere while holding the lock leaves only bytes behind:
    /// the buffer is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Once no line arrived while a batch was written, the burst is over:
    /// both buffers go back to the allocator if they grew large (freed
    /// outside the lock).
    fn give_back_if_idle(&self, batch: &mut Vec<u8>) {
        let mut pending = self.lock();
        if !pending.bytes.is_empty() {
            return;
        }
        let other = if pending.bytes.capacity() > KEEP_CAPACITY {
            mem::take(&mut pending.bytes)
        } else {
            Vec::new()
        };
        drop(pending);
        drop(other);
        if batch.capacity() > KEEP_CAPACITY {
            *batch = Vec::new();
        }
    }

    fn run<W: Write>(&self, mut out: W) {
        let mut batch = Vec::new();
        // A failed write may have left a partial line: the next batch
        // starts on a line of its own.
        let mut broken = false;
        loop {
            let mut pending = self.lock();
            while pending.bytes.is_empty() && !pending.closing {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if !pending.closing {
                // Let the batch gather (a closing spool writes at once).
                drop(pending);
                std::thread::sleep(GATHER);
                pending = self.lock();
            }
            let closing = pending.closing;
            mem::swap(&mut batch, &mut pending.bytes);
            drop(pending);
            if !batch.is_empty() {
                let lead: &[u8] = if broken { b"\n" } else { b"" };
                let written = out
                    .write_all(lead)
                    .and_then(|()| out.write_all(&batch))
                    .and_then(|()| out.flush());
                broken = written.is_err();
                if broken {
                    let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                    self.failed.fetch_add(lines, Ordering::Relaxed);
                }
            }
            batch.clear();
            self.give_back_if_idle(&mut batch);
            if closing {
                return;
            }
        }
    }
}

impl Drop for SpoolGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.arrived.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    /// An output stuck until released, then keeping what it got.
    #[derive(Clone, Default)]
    struct Gate(Arc<GateState>);

    #[derive(Default)]
    struct GateState {
        /// (open, written)
        state: Mutex<(bool, Vec<u8>)>,
        opened: Condvar,
    }

    impl Gate {
        fn open(&self) {
            self.0.state.lock().unwrap().0 = true;
            self.0.opened.notify_all();
        }
        fn written(&self) -> Vec<u8> {
            self.0.state.lock().unwrap().1.clone()
        }
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut state = self.0.state.lock().unwrap();
            while !state.0 {
                state = self.0.opened.wait(state).unwrap();
            }
            state.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_never_blocks_and_every_lost_line_is_counted() {
        let gate = Gate::default();
        let line = b"0123456789abcdef\n";
        let (spool, guard) = Spool::start(gate.clone(), "spool-test", 100 * line.len()).unwrap();
        // Returns at once although nothing can be written.
        for _ in 0..1000 {
            spool.line(line);
        }
        gate.open();
        let lost = spool.lost();
        drop(guard);
        let written = gate.written().len() / line.len();
        // Every line was written or counted; the limit held.
        assert_eq!(written as u64 + lost.dropped, 1000);
        assert!(lost.dropped >= 800, "{lost:?}");
        assert_eq!(lost.failed, 0);
    }

    struct Refusing;

    impl Write for Refusing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn refused_writes_are_counted_and_closing_writes_out_what_is_pending() {
        let (spool, guard) = Spool::start(Refusing, "spool-test", 1 << 20).unwrap();
        spool.line(b"a\n");
        spool.line(b"b\n");
        drop(guard);
        assert_eq!(spool.lost().failed, 2);

        let out = Gate::default();
        out.open();
        let (spool, guard) = Spool::start(out.clone(), "spool-test", 1 << 20).unwrap();
        spool.line(b"one\n");
        spool.line(b"two\n");
        drop(guard);
        assert_eq!(out.written(), b"one\ntwo\n");
    }
}
