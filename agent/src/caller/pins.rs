//! The kernel programs' life beyond one process: their links and the maps
//! the agent reads are pinned in bpffs under a *generation* — a digest of
//! the program build and its configuration — so an agent that restarts
//! (crash, upgrade) finds the programs still attached and adopts them
//! instead of reloading: connections opened while no agent ran, or under
//! the previous one, are still attributed (docs/architecture.md §9).
//!
//! Layout: `<pin dir>/<generation>/{CONNECTIONS,STAMP_KEY,connect4,connect6,sock_ops}`.
//! A generation is written under a temporary name and renamed into place,
//! so a directory with the generation's name is always complete.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{maps::Map, pin::PinError, programs::links::FdLink};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// Every pin of a complete generation.
const MAPS: [&str; 2] = [agent_ebpf::CONNECTIONS_MAP, agent_ebpf::STAMP_KEY_MAP];
const LINKS: [&str; 3] = ["connect4", "connect6", "sock_ops"];

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

    /// Pins `maps` and `links` as this generation, atomically: under a
    /// temporary name first, renamed into place once all are pinned.
    pub fn pin(
        &self,
        maps: &[(&'static str, &Map)],
        links: Vec<(&'static str, FdLink)>,
    ) -> Result<(), PinsError> {
        // bpffs refuses names with a dot: a prefix marks staging instead.
        let staging = self
            .dir
            .join(format!("staging-{}-{}", self.name, std::process::id()));
        remove_tree(&staging)?;
        create_private_dir(&staging)?;
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
            // incomplete (`complete()` said no): replace it.
            remove_tree(&target)?;
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
            .filter(|name| *name != self.name)
            .collect())
    }

    /// Removes every other generation in the pin directory (an older build
    /// or configuration, or staging left by a crash); returns their names.
    /// Unpinning detaches their programs once no process holds them.
    pub fn remove_others(&self) -> Result<Vec<String>, PinsError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| PinsError::Io {
            what: "listing",
            path: self.dir.clone(),
            source,
        })?;
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == self.name {
                continue;
            }
            remove_tree(&entry.path())?;
            removed.push(name);
        }
        Ok(removed)
    }

    /// Removes this generation's pins.
    pub fn remove(&self) -> Result<(), PinsError> {
        remove_tree(&self.dir.join(&self.name))
    }
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
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PinsError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })
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
