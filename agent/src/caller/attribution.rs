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

use crate::caller::{pins, syn::SavedSyn};

use agent_ebpf::{
    ACTIVE_MAP, CONFIG_SYMBOL, CONNECTIONS_MAP, Config, ConnKey, ConnOwner, ConnRecord,
    IMDS_EVENTS_MAP, IMDS_FLOOD_MAP, IMDS_LOST_MAP, IMDS_VERDICTS_MAP, ImdsVerdict, STAMP_KEY_MAP,
    StampKey,
};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError},
    },
};
use thiserror::Error;

/// The compiled kernel object, embedded so the binary is self-contained.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

/// Program names in the object, in attach order.
const CONNECT4: &str = "connect4";
const CONNECT6: &str = "connect6";
const SOCK_OPS: &str = "sock_ops";
/// Every program, in attach order.
pub(crate) const PROGRAMS: [&str; 3] = [CONNECT4, CONNECT6, SOCK_OPS];

/// The process that opened a connection, as the kernel saw it at `connect()`
/// (the *caller*, resolved to a pod or not, is `policy::Caller`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Opener {
    /// cgroup v2 id (kernfs inode of the caller's cgroup directory).
    pub cgroup_id: u64,
    /// Process id (tgid) of the caller, in the host's PID namespace.
    pub pid: u32,
    /// The connecting thread's name (`comm`), NUL-padded.
    pub comm: [u8; agent_ebpf::COMM_LEN],
}

impl Opener {
    /// The connecting thread's name; `None` if the kernel gave none.
    pub fn process(&self) -> Option<Comm> {
        let comm = Comm(self.comm);
        (!comm.bytes().is_empty()).then_some(comm)
    }
}

/// A thread's name as the kernel keeps it (`comm`, NUL-padded): copied,
/// never allocated, and written as text only where it is written out (the
/// audit event of every request names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Comm([u8; agent_ebpf::COMM_LEN]);

impl Comm {
    fn bytes(&self) -> &[u8] {
        agent_ebpf::comm_str(&self.0)
    }

    /// As text (borrowed unless the name is not UTF-8).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.bytes())
    }
}

impl serde::Serialize for Comm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
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
    #[error("reading the connection map failed: {0}")]
    MapSyscall(#[source] io::Error),
    #[error("the connection's stamp has a wrong MAC: not made by our kernel program for it")]
    ForgedStamp,
    #[error("the connection's stamp names a record of another connection")]
    StampMismatch,
    #[error("the previous agent could not vouch for the connection's stamp: {0}")]
    Predecessor(String),
    #[error("generating the stamp key failed: {0}")]
    Random(#[source] io::Error),
    #[error("program {name}: its attachment cannot be held as a link: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Pins(#[from] pins::PinsError),
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
    /// A bpffs directory where the attached programs and their maps are
    /// pinned, so they outlive the process: an agent that restarts (crash,
    /// upgrade) adopts them and attributes connections opened before it
    /// started. `None`: they are detached when the agent exits.
    pub pin_dir: Option<PathBuf>,
    /// The IMDS guard, if on.
    pub imds: Option<ImdsAttach>,
}

/// What the IMDS guard needs of the kernel programs.
#[derive(Clone, Debug)]
pub struct ImdsAttach {
    /// The IMDS's addresses (at most one per family) and port.
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    /// The policy as text: programs pinned under another policy are not
    /// adopted (their verdicts would be another policy's).
    pub policy: String,
    /// Verdicts in place before the programs are attached.
    pub initial: Vec<(u64, ImdsVerdict)>,
}

/// The IMDS guard's maps: the verdicts it writes, the events and counts
/// it reads.
pub struct ImdsMaps {
    pub verdicts: HashMap<MapData, u64, ImdsVerdict>,
    /// Unmapped: the reader maps it for each of its turns.
    pub events: MapData,
    pub lost: PerCpuArray<MapData, u64>,
    pub flood: HashMap<MapData, u64, agent_ebpf::ImdsFlood>,
}

impl ImdsMaps {
    fn open(
        mut take: impl FnMut(&'static str) -> Result<Map, AttributionError>,
    ) -> Result<Self, AttributionError> {
        Ok(ImdsMaps {
            verdicts: HashMap::try_from(take(IMDS_VERDICTS_MAP)?).map_err(AttributionError::Map)?,
            events: match take(IMDS_EVENTS_MAP)? {
                Map::RingBuf(data) => data,
                _ => return Err(AttributionError::MissingMap(IMDS_EVENTS_MAP)),
            },
            lost: PerCpuArray::try_from(take(IMDS_LOST_MAP)?).map_err(AttributionError::Map)?,
            flood: HashMap::try_from(take(IMDS_FLOOD_MAP)?).map_err(AttributionError::Map)?,
        })
    }
}

/// How the programs came to be attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Loaded and attached by this process, not pinned.
    Loaded,
    /// Loaded and attached by this process and pinned as `generation`;
    /// `others`: generations of another program build or configuration
    /// still pinned (still attached) beside it, until
    /// [`Attribution::retire_others`].
    Pinned {
        generation: String,
        others: Vec<String>,
    },
    /// Already attached by a previous agent of the same build and
    /// configuration, and adopted as they are.
    Adopted { generation: String },
}

/// Attached programs and the view of their maps the agent needs. Dropping it
/// detaches them unless they are pinned.
pub struct Attribution {
    /// Locked for the get-and-delete of one lookup.
    connections: Connections,
    mac_key: StampKey,
    /// The programs' switch (`agent_ebpf::ACTIVE_MAP`).
    active: std::sync::Mutex<Array<MapData, u32>>,
    /// Until the IMDS guard takes them.
    imds: std::sync::Mutex<Option<ImdsMaps>>,
    /// The generation and this agent's hold on it, when pinned.
    pins: Option<(pins::Generation, std::fs::File)>,
    // Own the programs and their links when they are not pinned (dropping
    // them detaches); declared last so they drop last.
    _links: Vec<FdLink>,
    _ebpf: Option<Ebpf>,
}

impl Attribution {
    /// Adopts the programs a previous agent pinned for the same build and
    /// configuration, or loads the embedded object configured for `options`
    /// and attaches it (pinning it when `options.pin_dir` says where).
    pub fn attach(options: &AttachOptions) -> Result<(Attribution, Provenance), AttributionError> {
        raise_memlock_limit()?;
        let mut config = Config::new(&options.addresses, options.port)
            .map_err(|_| AttributionError::TooManyAddresses)?;
        config.probe_port = u32::from(options.probe_port);
        if let Some(imds) = &options.imds {
            config = config
                .with_imds(&imds.addresses, imds.port)
                .map_err(|_| AttributionError::TooManyAddresses)?;
        }
        let Some(pin_dir) = &options.pin_dir else {
            return Ok((Self::load(options, &config, None)?, Provenance::Loaded));
        };
        let policy = options
            .imds
            .as_ref()
            .map_or("", |imds| imds.policy.as_str());
        let generation = pins::Generation::new(
            pin_dir,
            EBPF_OBJECT,
            &format!("{config:?} {} {policy}", options.cgroup.display()),
        )?;
        match Self::adopt(&generation) {
            Ok(Some(adopted)) => {
                let name = generation.name().to_owned();
                return Ok((adopted, Provenance::Adopted { generation: name }));
            }
            Ok(None) => {}
            // Pins that vanish or break while being adopted: load afresh
            // rather than run without programs.
            Err(e) => {
                tracing::warn!(error = %e, "adopting the pinned kernel programs failed; loading them")
            }
        }
        let attribution = Self::load(options, &config, Some(generation.clone()))?;
        Ok((
            attribution,
            Provenance::Pinned {
                generation: generation.name().to_owned(),
                others: generation.others()?,
            },
        ))
    }

    /// The previous agent's programs, if all of `generation`'s pins exist.
    fn adopt(generation: &pins::Generation) -> Result<Option<Attribution>, AttributionError> {
        if !generation.complete() {
            return Ok(None);
        }
        // Held before anything is read: no other agent removes it now.
        let hold = generation.hold()?;
        if !generation.complete() {
            return Ok(None);
        }
        let connections = Connections::new(open_pinned(&generation.path(CONNECTIONS_MAP))?)?;
        let mac_key = read_stamp_key(&generation.path(STAMP_KEY_MAP))?;
        let active = Array::try_from(open_pinned(&generation.path(ACTIVE_MAP))?)
            .map_err(AttributionError::Map)?;
        let imds = ImdsMaps::open(|name| open_pinned(&generation.path(name)))?;
        let attribution = Attribution {
            connections,
            mac_key,
            active: std::sync::Mutex::new(active),
            imds: std::sync::Mutex::new(Some(imds)),
            pins: Some((generation.clone(), hold)),
            _links: Vec::new(),
            _ebpf: None,
        };
        // Adopted from an agent that crashed while its successor served.
        attribution.set_active(true)?;
        Ok(Some(attribution))
    }

    fn load(
        options: &AttachOptions,
        config: &Config,
        pins: Option<pins::Generation>,
    ) -> Result<Attribution, AttributionError> {
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_SYMBOL, config, true)
            .load(EBPF_OBJECT)
            .map_err(AttributionError::Load)?;
        // The key is in place before any program can stamp with it.
        let mac_key = random_key().map_err(AttributionError::Random)?;
        let mut keys: Array<&mut MapData, StampKey> = Array::try_from(
            ebpf.map_mut(STAMP_KEY_MAP)
                .ok_or(AttributionError::MissingMap(STAMP_KEY_MAP))?,
        )
        .map_err(AttributionError::Map)?;
        keys.set(0, mac_key, 0).map_err(AttributionError::Map)?;
        let mut switch: Array<&mut MapData, u32> = Array::try_from(
            ebpf.map_mut(ACTIVE_MAP)
                .ok_or(AttributionError::MissingMap(ACTIVE_MAP))?,
        )
        .map_err(AttributionError::Map)?;
        switch.set(0, 1, 0).map_err(AttributionError::Map)?;
        // Verdicts before any program can ask for them.
        if let Some(imds) = &options.imds {
            let mut verdicts: HashMap<&mut MapData, u64, ImdsVerdict> = HashMap::try_from(
                ebpf.map_mut(IMDS_VERDICTS_MAP)
                    .ok_or(AttributionError::MissingMap(IMDS_VERDICTS_MAP))?,
            )
            .map_err(AttributionError::Map)?;
            for (id, verdict) in &imds.initial {
                verdicts
                    .insert(id, verdict, 0)
                    .map_err(AttributionError::Map)?;
            }
        }

        let cgroup = File::open(&options.cgroup).map_err(|source| AttributionError::Cgroup {
            path: options.cgroup.clone(),
            source,
        })?;
        let mut links = Vec::new();
        // Single: AllowMultiple is EINVAL here, and links coexist anyway.
        macro_rules! load_and_attach {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let program: &mut $ty = program(&mut ebpf, name)?;
                program
                    .load()
                    .map_err(|source| AttributionError::Program { name, source })?;
                let link = program
                    .attach(&cgroup, CgroupAttachMode::Single)
                    .and_then(|id| program.take_link(id))
                    .map_err(|source| AttributionError::Attach {
                        name,
                        path: options.cgroup.clone(),
                        source,
                    })?;
                let link = FdLink::try_from(link)
                    .map_err(|source| AttributionError::Link { name, source })?;
                links.push((name, link));
            }};
        }
        load_and_attach!(CgroupSockAddr, CONNECT4);
        load_and_attach!(CgroupSockAddr, CONNECT6);
        load_and_attach!(SockOps, SOCK_OPS);

        let links = match &pins {
            Some(generation) => {
                let maps = pins::MAPS
                    .into_iter()
                    .map(|name| {
                        ebpf.map(name)
                            .map(|map| (name, map))
                            .ok_or(AttributionError::MissingMap(name))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                generation.pin(&maps, links)?;
                // The pins hold the links now.
                Vec::new()
            }
            None => links.into_iter().map(|(_, link)| link).collect(),
        };
        let mut take = |name| {
            ebpf.take_map(name)
                .ok_or(AttributionError::MissingMap(name))
        };
        let connections = Connections::new(take(CONNECTIONS_MAP)?)?;
        let active = Array::try_from(take(ACTIVE_MAP)?).map_err(AttributionError::Map)?;
        let imds = ImdsMaps::open(&mut take)?;
        let pins = match pins {
            Some(generation) => {
                let hold = generation.hold()?;
                Some((generation, hold))
            }
            None => None,
        };
        Ok(Attribution {
            connections,
            mac_key,
            active: std::sync::Mutex::new(active),
            imds: std::sync::Mutex::new(Some(imds)),
            pins,
            _links: links,
            _ebpf: Some(ebpf),
        })
    }

    /// The handover proof over `nonce` on the connection `binding` names,
    /// under this agent's stamp key — only when pinned, the one case where
    /// a peer can read the key to check it (see `handover::wire::prove`).
    pub fn prove(&self, nonce: u64, binding: crate::handover::binding::Binding) -> Option<u64> {
        self.pins
            .as_ref()
            .map(|_| crate::handover::wire::prove(&self.mac_key, nonce, binding))
    }

    /// The IMDS guard's maps, once (the guard owns them from then on).
    pub fn take_imds(&self) -> Option<ImdsMaps> {
        self.imds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The generation's name, when pinned.
    pub fn generation(&self) -> Option<&str> {
        self.pins.as_ref().map(|(generation, _)| generation.name())
    }

    /// Switches the programs' recording of new connections on or off: off
    /// while a successor running another build of them serves (its programs
    /// stamp those connections), on again if it goes first.
    pub fn set_active(&self, active: bool) -> Result<(), AttributionError> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .set(0, u32::from(active), 0)
            .map_err(AttributionError::Map)
    }

    /// Unpins every other generation that no agent holds (left by agents
    /// that are gone), detaching its programs.
    pub fn retire_others(&self) -> Result<Vec<String>, AttributionError> {
        match &self.pins {
            Some((generation, _)) => Ok(generation.remove_others()?),
            None => Ok(Vec::new()),
        }
    }

    /// Removes this generation's pins unless another agent holds them (a
    /// successor of the same build adopted them), detaching the programs:
    /// what an agent does last, so nothing of it stays attached to the
    /// node once nobody uses it. Whether they were removed.
    pub fn release(&self) -> Result<bool, AttributionError> {
        match &self.pins {
            Some((generation, hold)) => Ok(generation.remove_unless_held(hold)?),
            None => Ok(false),
        }
    }

    /// How many connection records the kernel holds: connections opened
    /// and not yet accepted (the agent deletes a record when it reads it,
    /// the client's socket when it closes). Zero at rest.
    pub fn tracked_connections(&self) -> usize {
        self.connections.len()
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
        match self.connections.take(stamp.id)? {
            // Taken: the stamp has served its one connection, and the table
            // keeps only connections not accepted yet. (None: the client
            // already closed and deleted it.) A record of another 4-tuple
            // under an id whose MAC checks out for this one cannot be made
            // without the key.
            Some(record) if record.key == key => Ok(Some(record.owner.into())),
            Some(_) => Err(AttributionError::StampMismatch),
            None => Ok(None),
        }
    }
}

/// The kernel's connection records, as the agent reads them: each one once.
struct Connections {
    map: std::sync::Mutex<HashMap<MapData, u64, ConnRecord>>,
    /// The map's descriptor, for `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (aya
    /// 0.14 offers it only for queues and stacks).
    fd: std::os::fd::OwnedFd,
    /// Set once the kernel refused the one-call form (hash maps have it
    /// since Linux 5.14): lookup and delete, under the lock, from then on.
    two_calls: std::sync::atomic::AtomicBool,
}

impl Connections {
    fn new(map: Map) -> Result<Connections, AttributionError> {
        use std::os::fd::AsFd as _;
        let Map::HashMap(data) = &map else {
            return Err(AttributionError::MissingMap(CONNECTIONS_MAP));
        };
        let fd = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(AttributionError::MapSyscall)?;
        Ok(Connections {
            map: std::sync::Mutex::new(HashMap::try_from(map).map_err(AttributionError::Map)?),
            fd,
            two_calls: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The record under `id`, deleted as it is read: one syscall per
    /// accepted connection.
    fn take(&self, id: u64) -> Result<Option<ConnRecord>, AttributionError> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.two_calls.load(Relaxed) {
            match lookup_and_delete(&self.fd, id) {
                Ok(record) => return Ok(record),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(ENOTSUPP)) => {
                    self.two_calls.store(true, Relaxed);
                }
                Err(e) => return Err(AttributionError::MapSyscall(e)),
            }
        }
        // A map handle guarded by a lock cannot be left inconsistent by a
        // panic elsewhere: poisoning is ignored.
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(&id, 0) {
            Ok(record) => {
                let _ = map.remove(&id);
                Ok(Some(record))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(other) => Err(AttributionError::Map(other)),
        }
    }

    fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .filter(Result::is_ok)
            .count()
    }
}

/// The kernel's `ENOTSUPP` (not in libc): a map type without the command.
const ENOTSUPP: i32 = 524;

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on the connection map: `Ok(None)` when
/// no record has the id.
fn lookup_and_delete(fd: &std::os::fd::OwnedFd, id: u64) -> io::Result<Option<ConnRecord>> {
    use std::os::fd::AsRawFd as _;
    /// The `bpf_attr` of the map element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<ConnRecord>::uninit();
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: (&raw const id) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the attr points at a live key and a value buffer of the
    // map's value size (ConnRecord is the map's value type); the kernel
    // reads `size_of::<ElemAttr>()` bytes of attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if rc == 0 {
        // SAFETY: the kernel filled the whole value on success.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(err)
}

/// The stamp key of the generation `generation` pinned under `pin_dir`: what
/// proves, at a handover, that the peer has the agent's privileges. The name
/// comes from the peer, so it must be a generation name, nothing else.
pub fn pinned_key(
    pin_dir: &std::path::Path,
    generation: &str,
) -> Result<StampKey, AttributionError> {
    if !pins::is_generation_name(generation) {
        return Err(AttributionError::Pins(pins::PinsError::NotAGeneration(
            generation.to_owned(),
        )));
    }
    read_stamp_key(&pin_dir.join(generation).join(STAMP_KEY_MAP))
}

fn open_pinned(path: &std::path::Path) -> Result<Map, AttributionError> {
    MapData::from_pin(path)
        .and_then(Map::from_map_data)
        .map_err(AttributionError::Map)
}

/// The key in a pinned `STAMP_KEY` map.
fn read_stamp_key(path: &std::path::Path) -> Result<StampKey, AttributionError> {
    let keys: Array<MapData, StampKey> =
        Array::try_from(open_pinned(path)?).map_err(AttributionError::Map)?;
    keys.get(&0, 0).map_err(AttributionError::Map)
}

/// 128 random bits from the kernel for the stamp MAC.
fn random_key() -> io::Result<StampKey> {
    Ok([random_u64()?, random_u64()?])
}

/// 64 bits from the kernel's generator (`getrandom`, retried on EINTR):
/// stamp keys and handover nonces.
pub fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
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
    Ok(u64::from_ne_bytes(bytes))
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
