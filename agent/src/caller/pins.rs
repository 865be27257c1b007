//! The kernel programs' life beyond one process: their links and the maps
//! the agent reads are pinned in bpffs under a *generation* — a digest of
//! the program build and its configuration — so an agent that restarts
//! (crash, upgrade) finds the programs still attached and adopts them
//! instead of reloading: connections opened while no agent ran, or under
//! the previous one, are still attributed (docs/architecture.md §9).
//!
//! Layout: `<pin dir>/<generation>/{CONNECTIONS,STAMP_KEY,ACTIVE,IMDS_*,connect4,connect6,sock_ops}`.
//! A generation is written under a temporary name and renamed into place,
//! so a directory with the generation's name is always complete.
//!
//! Every agent using a generation holds a shared `flock` on its directory
//! for its whole life (the kernel drops it when the process dies, however
//! it dies). A generation is removed only when an exclusive lock can be
//! taken: never under an agent that adopted it.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{maps::Map, pin::PinError, programs::links::FdLink};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// The maps a generation pins: what an adopting agent reads.
pub const MAPS: [&str; 7] = [
    agent_ebpf::CONNECTIONS_MAP,
    agent_ebpf::STAMP_KEY_MAP,
    agent_ebpf::ACTIVE_MAP,
    agent_ebpf::IMDS_VERDICTS_MAP,
    agent_ebpf::IMDS_EVENTS_MAP,
    agent_ebpf::IMDS_LOST_MAP,
    agent_ebpf::IMDS_FLOOD_MAP,
];
/// Its links, pinned under their programs' names.
const LINKS: [&str; 3] = crate::caller::attribution::PROGRAMS;

#[derive(Debug, Error)]
pub enum PinsError {
    #[error(
        "{0} is not on a bpffs mount, so the programs cannot outlive this process (mount bpffs there, as the node's /sys/fs/bpf usually is, or pass --bpf-pin-dir '' to run without)"
    )]
    NotBpffs(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0:?} is not a generation name")]
    NotAGeneration(String),
    #[error("{0} is held by another agent")]
    Held(PathBuf),
    #[error("pinning {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
}

/// One build-and-configuration's pins.
#[derive(Clone, Debug)]
pub struct Generation {
    dir: PathBuf,
    name: String,
}

impl Generation {
    /// The generation of `object` configured as `config` (any stable text
    /// naming everything the programs were loaded with), under `pin_dir`,
    /// which is created if missing and must be on bpffs.
    pub fn new(pin_dir: &Path, object: &[u8], config: &str) -> Result<Generation, PinsError> {
        // The nearest existing ancestor decides (what is missing gets
        // created on the same mount).
        let existing = pin_dir.ancestors().find(|dir| dir.exists());
        if !existing.is_some_and(|dir| on_bpffs(dir).unwrap_or(false)) {
            return Err(PinsError::NotBpffs(pin_dir.to_owned()));
        }
        create_private_dir(pin_dir)?;
        let digest = Sha256::new()
            .chain_update(object)
            .chain_update(config.as_bytes())
            .finalize();
        let name = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Generation {
            dir: pin_dir.to_owned(),
            name,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the pin `name` of this generation lives.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(&self.name).join(name)
    }

    /// Whether a previous agent pinned this generation (all of it: it is
    /// renamed into place only once complete).
    pub fn complete(&self) -> bool {
        MAPS.iter()
            .chain(LINKS.iter())
            .all(|name| self.path(name).exists())
    }

    /// Takes this agent's shared hold on the generation (see the module
    /// doc); kept for the process's life.
    pub fn hold(&self) -> Result<File, PinsError> {
        let path = self.dir.join(&self.name);
        let dir = File::open(&path).map_err(|source| PinsError::Io {
            what: "opening",
            path: path.clone(),
            source,
        })?;
        dir.lock_shared().map_err(|source| PinsError::Io {
            what: "locking",
            path,
            source,
        })?;
        Ok(dir)
    }

    /// Pins `maps` and `links` as this generation, atomically: under a
    /// temporary name first, renamed into place once all are pinned.
    pub fn pin(
        &self,
        maps: &[(&'static str, &Map)],
        links: Vec<(&'static str, FdLink)>,
    ) -> Result<(), PinsError> {
        // bpffs refuses names with a dot: a prefix marks staging instead;
        // locked while in use, so no other agent removes it.
        let nonce = crate::caller::attribution::random_u64().map_err(|source| PinsError::Io {
            what: "naming the staging directory of",
            path: self.dir.clone(),
            source,
        })?;
        let staging = self
            .dir
            .join(format!("{STAGING_PREFIX}{}-{nonce:016x}", self.name));
        create_private_dir(&staging)?;
        let _staging_lock = File::open(&staging)
            .and_then(|dir| dir.lock().map(|()| dir))
            .map_err(|source| PinsError::Io {
                what: "locking",
                path: staging.clone(),
                source,
            })?;
        let pinned = (|| {
            for (name, map) in maps {
                let path = staging.join(name);
                map.pin(&path)
                    .map_err(|source| PinsError::Pin { name, path, source })?;
            }
            for (name, link) in links {
                let path = staging.join(name);
                // The pinned link holds the attachment; this process's
                // handle to it can go.
                link.pin(&path).map(drop).map_err(|source| PinsError::Pin {
                    name,
                    path,
                    source,
                })?;
            }
            let target = self.dir.join(&self.name);
            // A generation left by an agent that died while pinning it is
            // incomplete (`complete()` said no): replace it, unless an
            // agent holds it.
            if !remove_unheld(&target)? {
                return Err(PinsError::Held(target.clone()));
            }
            fs::rename(&staging, &target).map_err(|source| PinsError::Io {
                what: "renaming the new generation into place",
                path: target,
                source,
            })
        })();
        if pinned.is_err() {
            let _ = remove_tree(&staging);
        }
        pinned
    }

    /// The other generations in the pin directory.
    pub fn others(&self) -> Result<Vec<String>, PinsError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| PinsError::Io {
            what: "listing",
            path: self.dir.clone(),
            source,
        })?;
        Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| *name != self.name && is_agents_name(name))
            .collect())
    }

    /// Removes every other generation in the pin directory that no agent
    /// holds (an older build or configuration whose agent is gone, staging
    /// left by a crash); returns their names. Unpinning detaches their
    /// programs.
    pub fn remove_others(&self) -> Result<Vec<String>, PinsError> {
        // Only what agents name (`others`): whatever else shares the
        // directory (another tool's pins, with a broad --bpf-pin-dir) is
        // not ours.
        let mut removed = Vec::new();
        for name in self.others()? {
            if remove_unheld(&self.dir.join(&name))? {
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Removes this generation's pins unless another agent holds it;
    /// `held` is this agent's own hold (upgraded to exclusive, which fails
    /// while anyone else holds it). Whether it was removed.
    pub fn remove_unless_held(&self, held: &File) -> Result<bool, PinsError> {
        remove_if_exclusive(held, &self.dir.join(&self.name))
    }
}

/// Names staging directories start with (bpffs refuses dots in names).
const STAGING_PREFIX: &str = "staging-";

/// A generation's name, or a staging directory's exactly as
/// [`Generation::pin`] names it (`staging-<generation>-<16 hex nonce>`).
fn is_agents_name(name: &str) -> bool {
    is_generation_name(name)
        || name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(generation, nonce)| {
                is_generation_name(generation) && is_generation_name(nonce)
            })
}

/// Whether `name` is what [`Generation::new`] names a generation: 16
/// lowercase hex digits (so nothing a peer sends can name another path).
pub fn is_generation_name(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn on_bpffs(path: &Path) -> io::Result<bool> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated path and a zeroed out-struct of the right type.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statfs writes only into `stat`.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as libc::c_long == BPF_FS_MAGIC)
}

/// `mkdir -p` with mode 0700 for what is created: pins are root's alone.
fn create_private_dir(dir: &Path) -> Result<(), PinsError> {
    crate::private_dir::ensure(dir).map_err(|source| PinsError::Io {
        what: "creating",
        path: dir.to_owned(),
        source,
    })
}

/// Removes the generation (or staging) directory `dir` if no agent holds
/// it; whether it is gone.
fn remove_unheld(dir: &Path) -> Result<bool, PinsError> {
    let handle = match File::open(dir) {
        Ok(handle) => handle,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(source) => {
            return Err(PinsError::Io {
                what: "opening",
                path: dir.to_owned(),
                source,
            });
        }
    };
    remove_if_exclusive(&handle, dir)
}

/// Removes `dir` if `handle` (open on it) can be locked exclusively, that
/// is if no agent holds it; whether it was removed.
fn remove_if_exclusive(handle: &File, dir: &Path) -> Result<bool, PinsError> {
    match handle.try_lock() {
        Ok(()) => remove_tree(dir).map(|()| true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(source)) => Err(PinsError::Io {
            what: "locking",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Unlinks a generation's pins and its directory (bpffs directories hold
/// only pins, one level deep); a missing directory is already removed.
fn remove_tree(dir: &Path) -> Result<(), PinsError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PinsError::Io {
            what: "removing",
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_generation_names_name_a_generation() {
        for (name, ok) in [
            ("0123456789abcdef", true),
            ("0123456789ABCDEF", false),
            ("0123456789abcde", false),
            ("0123456789abcdef0", false),
            ("../../../../etc/x", false),
            ("staging-0123456789abcdef-00", false),
            ("", false),
        ] {
            assert_eq!(is_generation_name(name), ok, "{name:?}");
        }
    }

    #[test]
    fn only_generations_and_their_staging_are_the_agents_to_remove() {
        for (name, ours) in [
            ("0123456789abcdef", true),
            ("staging-0123456789abcdef-00000000deadbeef", true),
            ("staging-", false),
            ("staging-0123", false),
            ("staging-0123456789abcdef-other-tool", false),
            ("cilium", false),
            ("tc", false),
            ("my-tool-0123456789abcdef", false),
        ] {
            assert_eq!(is_agents_name(name), ours, "{name:?}");
        }
    }
}
