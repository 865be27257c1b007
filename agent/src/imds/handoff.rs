//! Which agent reads the kernel's IMDS events, and where the last reader
//! stopped. Two agents share one event ring while a successor takes over
//! (programs pinned and adopted): both reading it would record events
//! twice and move its consumer position under each other. So reading is a
//! turn, held as an exclusive `flock` on a file in the handover directory
//! (root-only, shared by the DaemonSet's pods): a serving agent takes it,
//! pauses and gives it back when a successor serves, and leaves in the
//! file what it has reported of the kernel's counts, for the next reader
//! to go on from exactly there. An agent that dies leaves nothing (the
//! kernel drops its lock); the next reader starts from the counts as they
//! are then.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// The lock file's name in the handover directory, per generation: agents
/// of different program builds read different rings, and need not wait for
/// each other; the counts a file holds are its generation's.
fn lock_file(generation: &str) -> String {
    format!("imds-events-{generation}.lock")
}

/// What a reader reported of the kernel's counts when its turn ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    /// `IMDS_LOST`, summed over CPUs.
    pub lost: u64,
    /// `IMDS_FLOOD`'s counts by scope.
    pub reported: Vec<(u64, [u64; 3])>,
}

pub struct Handoff {
    path: Option<PathBuf>,
    /// The lock file, opened at the first try and kept while another agent
    /// holds the turn: waiting polls only `flock`.
    opened: Option<File>,
}

/// This agent's turn to read; ends when dropped (or with [`Turn::end`]).
pub struct Turn {
    file: Option<File>,
}

impl Handoff {
    /// `dir`: the handover directory; `generation`: the pinned programs'.
    /// Unpinned programs are this agent's alone: every turn is granted at
    /// once. (Pinned programs without a handover directory: a second agent
    /// sharing them cannot bind the listeners this one holds, and never
    /// starts reading.)
    pub fn new(dir: Option<PathBuf>, generation: Option<&str>) -> Handoff {
        Handoff {
            path: dir
                .zip(generation)
                .map(|(d, generation)| d.join(lock_file(generation))),
            opened: None,
        }
    }

    /// This agent's turn, if no other agent has it now (never blocks: the
    /// caller polls, so giving up waiting leaves nothing behind); with the
    /// baseline the previous reader left, if it left one.
    pub fn try_take(&mut self) -> io::Result<Option<(Turn, Option<Baseline>)>> {
        let Some(path) = &self.path else {
            return Ok(Some((Turn::unlocked(), None)));
        };
        let mut file = match self.opened.take() {
            Some(file) => file,
            None => {
                if let Some(dir) = path.parent() {
                    crate::private_dir::ensure(dir)?;
                }
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)?
            }
        };
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)? {
            self.opened = Some(file);
            return Ok(None);
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        // Read once: a reader that dies later leaves no stale baseline.
        file.set_len(0)?;
        let baseline = serde_json::from_str::<Baseline>(&text).ok();
        Ok(Some((Turn { file: Some(file) }, baseline)))
    }
}

impl Turn {
    /// A turn without the lock: where it cannot be taken (the handover
    /// directory refused), no successor can take over either.
    pub fn unlocked() -> Turn {
        Turn { file: None }
    }

    /// Leaves `baseline` for the next reader and ends the turn.
    pub fn end(self, baseline: &Baseline) -> io::Result<()> {
        if let Some(mut file) = self.file {
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(serde_json::to_string(baseline)?.as_bytes())?;
            file.sync_data()?;
        }
        Ok(())
    }
}

/// Whether the lock was taken (`false`: another holds it, with `LOCK_NB`).
fn flock(file: &File, operation: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: flock on an open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_passes_its_baseline_to_the_next_reader_of_the_same_programs() {
        let dir = std::env::temp_dir().join(format!("epia-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ours = Handoff::new(Some(dir.clone()), Some("gen-1"));
        let (turn, first) = ours.try_take().unwrap().unwrap();
        assert_eq!(first, None);
        let left = Baseline {
            lost: 3,
            reported: vec![(42, [1, 2, 3])],
        };
        turn.end(&left).unwrap();
        let (turn, got) = ours.try_take().unwrap().unwrap();
        assert_eq!(got, Some(left.clone()));
        // Held: nobody else gets the turn meanwhile.
        assert!(ours.try_take().unwrap().is_none());
        // Read once: a reader that dies leaves nothing behind.
        drop(turn);
        assert_eq!(ours.try_take().unwrap().unwrap().1, None);
        // Another generation's counts are not ours.
        let mut other = Handoff::new(Some(dir.clone()), Some("gen-2"));
        ours.try_take().unwrap().unwrap().0.end(&left).unwrap();
        assert_eq!(other.try_take().unwrap().unwrap().1, None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
