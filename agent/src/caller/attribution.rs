//! Loads the kernel programs, attaches them to a cgroup2 subtree, and answers
//! "who opened this accepted connection?" from the stamp its SYN carried:
//! a MAC check and one map lookup.
//!
//! The request path sees the kernel only through [`OpenerLookup`], once per
//! connection when it is admitted; the handler takes the identified caller,
//! so its tests (`handler::tests`) need no kernel while the integration
//! tests use the real one.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

pub use agent_ebpf::Stamp;

use crate::caller::syn::SavedSyn;

use agent_ebpf::{CONFIG_SYMBOL, CONNECTIONS_MAP, Config, ConnKey, ConnOwner, ConnRecord};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
use thiserror::Error;

/// The compiled kernel object, embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Program names in the object, in attach order.
const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const SOCK_OPS: &str = "sock_ops";

/// The process that opened a connection, as the kernel saw it at `connect()`
/// (the *caller*, resolved to a pod or not, is `policy::Caller`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opener {
    /// cgroup v2 id (kernfs inode of the caller's cgroup directory).
    pub cgroup_id: u64,
    /// Process id (tgid) of the caller, in the host's PID namespace.
    pub pid: u32,
    /// The connecting thread's name (`comm`), NUL-padded.
    pub comm: [u8; agent_ebpf::COMM_LEN],
}

impl Opener {
    /// The connecting thread's name, as text.
    pub fn process_name(&self) -> String {
        let end = self
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.comm.len());
        String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

impl From<ConnOwner> for Opener {
    fn from(owner: ConnOwner) -> Self {
        Opener {
            cgroup_id: owner.cgroup_id,
            pid: owner.pid(),
            comm: owner.comm,
        }
    }
}

/// An accepted connection as the server sees it: both ends, and what the
/// kernel kept of its SYN (where the stamp travels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub syn: SavedSyn,
}

/// The request path's only view of the kernel.
pub trait OpenerLookup: Send + Sync {
    /// The caller of an accepted connection. `Ok(None)`: the kernel did not
    /// attribute it (not ours, opened before the programs were attached,
    /// or its SYN had no room for the stamp). `Err`: a stamp that does not
    /// belong to this connection — forged or replayed.
    fn opener(&self, conn: &Accepted) -> Result<Option<Opener>, AttributionError>;
}

/// Everything that can go wrong between the agent and the kernel programs.
#[derive(Debug, Error)]
pub enum AttributionError {
    #[error(
        "raising RLIMIT_MEMLOCK failed (needs CAP_SYS_RESOURCE on kernels that account BPF memory there): {0}"
    )]
    Memlock(#[source] io::Error),
    #[error("too many served addresses for the kernel programs (at most {max} per family)", max = agent_ebpf::MAX_SERVED_ADDRS)]
    TooManyAddresses,
    #[error(
        "the kernel refused the eBPF object (needs BPF support and CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN): {0}"
    )]
    Load(#[source] EbpfError),
    #[error("program {0} missing from the embedded eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the embedded eBPF object")]
    MissingMap(&'static str),
    #[error("loading program {name} failed (the verifier log follows, if any): {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup2 directory {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "attaching {name} to cgroup {path} failed (needs cgroup v2 and CAP_NET_ADMIN/CAP_SYS_ADMIN): {source}"
    )]
    Attach {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("reading the connection map failed: {0}")]
    Map(#[source] MapError),
    #[error("the connection's stamp has a wrong MAC: not made by our kernel program for it")]
    ForgedStamp,
    #[error("the connection's stamp names a record of another connection")]
    StampMismatch,
    #[error("generating the stamp key failed: {0}")]
    Random(#[source] io::Error),
}

/// What to attribute and where.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    /// cgroup2 directory to attach at: the hierarchy root in production (all
    /// of the node's processes), a test's own subtree in tests.
    pub cgroup: PathBuf,
    /// Addresses the agent serves (IPv4 and IPv6; at most 4 each).
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    /// The probe port on loopback, attributed too (0: not).
    pub probe_port: u16,
}

/// Loaded and attached programs. Dropping it detaches them.
pub struct Attribution {
    /// Locked for the get-and-delete of one lookup.
    connections: std::sync::Mutex<HashMap<MapData, u64, ConnRecord>>,
    mac_key: [u64; 2],
    // Owns the programs and their links; declared last so it drops last.
    _ebpf: Ebpf,
}

impl Attribution {
    /// Loads the embedded object configured for `options` and attaches it.
    pub fn attach(options: &AttachOptions) -> Result<Attribution, AttributionError> {
        raise_memlock_limit()?;
        let mut config = Config::new(&options.addresses, options.port)
            .map_err(|_| AttributionError::TooManyAddresses)?;
        config.probe_port = u32::from(options.probe_port);
        config.mac_key = random_key().map_err(AttributionError::Random)?;
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_SYMBOL, &config, true)
            .load(EBPF_OBJECT)
            .map_err(AttributionError::Load)?;

        let cgroup = File::open(&options.cgroup).map_err(|source| AttributionError::Cgroup {
            path: options.cgroup.clone(),
            source,
        })?;
        // Single: AllowMultiple is EINVAL here, and links coexist anyway.
        macro_rules! load_and_attach {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $ty = program(&mut ebpf, name)?;
                program
                    .load()
                    .map_err(|source| AttributionError::Program { name, source })?;
                program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .map_err(|source| AttributionError::Attach {
                        name,
                        path: options.cgroup.clone(),
                        source,
                    })?;
            }};
        }
        load_and_attach!(CgroupSockAddr, CONNECT4);
        load_and_attach!(CgroupSockAddr, CONNECT6);
        load_and_attach!(SockOps, SOCK_OPS);

        let map = ebpf
            .take_map(CONNECTIONS_MAP)
            .ok_or(AttributionError::MissingMap(CONNECTIONS_MAP))?;
        let connections = HashMap::try_from(map).map_err(AttributionError::Map)?;
        Ok(Attribution {
            connections: std::sync::Mutex::new(connections),
            mac_key: config.mac_key,
            _ebpf: ebpf,
        })
    }

    /// How many connection records the kernel holds: connections opened
    /// and not yet accepted (the agent deletes a record when it reads it,
    /// the client's socket when it closes). Zero at rest.
    pub fn tracked_connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .filter(Result::is_ok)
            .count()
    }
}

impl OpenerLookup for Attribution {
    fn opener(&self, conn: &Accepted) -> Result<Option<Opener>, AttributionError> {
        let SavedSyn::Kept(Some(stamp)) = conn.syn else {
            return Ok(None);
        };
        let key = ConnKey::from_sockets(conn.peer, conn.local);
        if agent_ebpf::stamp_mac(&self.mac_key, stamp.id, &key) != stamp.mac {
            return Err(AttributionError::ForgedStamp);
        }
        // A map handle guarded by a lock cannot be left inconsistent by a
        // panic elsewhere: poisoning is ignored.
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match connections.get(&stamp.id, 0) {
            Ok(record) if record.key == key => {
                // Read once: the stamp has served its one connection, and
                // the table keeps only connections not accepted yet.
                // (ENOENT: the client already closed and deleted it.)
                let _ = connections.remove(&stamp.id);
                Ok(Some(record.owner.into()))
            }
            Ok(_) => Err(AttributionError::StampMismatch),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(other) => Err(AttributionError::Map(other)),
        }
    }
}

/// 128 random bits from the kernel for the stamp MAC.
fn random_key() -> io::Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: writes at most the remaining length into the buffer.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    let (k0, k1) = bytes.split_at(8);
    let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().unwrap_or_default());
    Ok([word(k0), word(k1)])
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttributionError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(AttributionError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| AttributionError::Program { name, source })
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK.
fn raise_memlock_limit() -> Result<(), AttributionError> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        let err = io::Error::last_os_error();
        // Memcg-accounted kernels (5.11+) do not need it; an unprivileged
        // caller still gets a precise error from the load itself.
        if err.raw_os_error() != Some(libc::EPERM) {
            return Err(AttributionError::Memlock(err));
        }
    }
    Ok(())
}
