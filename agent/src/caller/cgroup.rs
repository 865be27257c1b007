//! cgroup id → cgroup path → pod UID and container id.
//!
//! The kernel hands us a cgroup id; the pod is in the path. The id → path step
//! is one `open_by_handle_at` on the cgroup2 mount (kernfs file handles are
//! the cgroup id), so a request never walks the tree. The path → pod step is
//! pure string parsing of the layouts kubelet creates with the systemd and
//! cgroupfs drivers, failing closed on anything a container could have made
//! to look like another pod.

use std::{
    fs::{self, File},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::Arc,
};

use thiserror::Error;

/// Errors of this module's boundary (mount discovery, id resolution, paths).
#[derive(Debug, Error)]
pub enum CgroupError {
    #[error(
        "no cgroup2 hierarchy is mounted (see /proc/self/mountinfo); pods cannot be attributed"
    )]
    NoCgroup2,
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolving cgroup id {id} (open_by_handle_at needs CAP_DAC_READ_SEARCH): {source}")]
    Resolve {
        id: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} is not a cgroup2 mount (with cgroup v1 or a hybrid layout, point --cgroup-mount at the cgroup2 one)"
    )]
    NotCgroup2(PathBuf),
    #[error("cgroup path {0:?} nests a pod-like cgroup inside a pod: refused")]
    Conflict(String),
    #[error("cgroup path {0:?} has a malformed pod UID: refused")]
    InvalidPodUid(String),
    #[error("cgroup path {0:?} is below a kubepods root but not in kubelet's layout: refused")]
    NotKubeletLayout(String),
    #[error(
        "cgroup {path:?} is owned by uid {uid}, not root: a delegated subtree is not kubelet's, refused"
    )]
    Delegated { path: String, uid: u32 },
}

/// The pod (and container, when the cgroup is a container's) a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// Canonical pod UID (lowercase, dashes). Shared (like the container
    /// id) with every audit event of the pod's requests: no copy each.
    pub pod_uid: Arc<str>,
    pub container_id: Option<Arc<str>>,
    /// The pod-level cgroup (relative to the mount): it outlives container
    /// restarts, so its disappearance means the pod is gone.
    pub pod_path: String,
}

/// Finds the cgroup2 mount point from `/proc/self/mountinfo`.
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })?;
    cgroup2_mount_in(&text).ok_or(CgroupError::NoCgroup2)
}

/// The first cgroup2 mount whose root is the hierarchy root. (A bind mount
/// of a subtree would make every path relative to the wrong place.)
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut fields = left.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\' && i + 4 <= bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves cgroup ids to paths relative to the cgroup2 mount.
pub struct CgroupResolver {
    mount: PathBuf,
    mount_fd: File,
}

/// `FILEID_KERNFS`: the handle type kernfs (cgroupfs) uses; the handle is
/// the 8-byte cgroup id.
const FILEID_KERNFS: libc::c_int = 0xfe;

#[repr(C)]
struct KernfsHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    id: u64,
}

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

impl CgroupResolver {
    /// `mount` must be a cgroup2 mount (of the hierarchy's root).
    pub fn new(mount: impl Into<PathBuf>) -> Result<CgroupResolver, CgroupError> {
        let mount = mount.into();
        let mount_fd = File::open(&mount).map_err(|source| CgroupError::Io {
            path: mount.clone(),
            source,
        })?;
        // SAFETY: fstatfs on an open fd into a zeroed struct.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstatfs(mount_fd.as_raw_fd(), &mut fs) } != 0
            || fs.f_type as i64 != CGROUP2_MAGIC
        {
            return Err(CgroupError::NotCgroup2(mount));
        }
        Ok(CgroupResolver { mount, mount_fd })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The cgroup's path relative to the mount (empty for the root), or
    /// `None` when no cgroup has that id any more (removed).
    pub fn path_of(&self, id: u64) -> Result<Option<String>, CgroupError> {
        let Some(fd) = self.open(id)? else {
            return Ok(None);
        };
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let target = fs::read_link(&link).map_err(|source| CgroupError::Resolve { id, source })?;
        Ok(Some(self.relative(&target)))
    }

    /// Whether a cgroup with that id still exists (one syscall, no path).
    pub fn exists(&self, id: u64) -> Result<bool, CgroupError> {
        Ok(self.open(id)?.is_some())
    }

    /// The cgroup directory with that id, `None` once it is removed.
    fn open(&self, id: u64) -> Result<Option<OwnedFd>, CgroupError> {
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: the handle is a valid `struct file_handle` with 8 bytes of
        // f_handle; the mount fd is open for the call's duration.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount_fd.as_raw_fd(),
                (&raw mut handle).cast(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESTALE) | Some(libc::ENOENT) => Ok(None),
                _ => Err(CgroupError::Resolve { id, source: err }),
            };
        }
        // SAFETY: fd was just returned to us and is owned here.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Fails unless every directory from the mount down to `path` (relative
    /// to the mount) is owned by root. kubelet's cgroups always are; a
    /// chowned directory is a delegation (systemd hands `user@UID.service`
    /// to its user), inside which its owner may create anything.
    pub fn require_root_owned(&self, path: &str) -> Result<(), CgroupError> {
        use std::os::unix::fs::MetadataExt as _;
        let mut prefix = PathBuf::new();
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            prefix.push(segment);
            let absolute = self.mount.join(&prefix);
            let meta = fs::symlink_metadata(&absolute).map_err(|source| CgroupError::Io {
                path: absolute.clone(),
                source,
            })?;
            if meta.uid() != 0 {
                return Err(CgroupError::Delegated {
                    path: prefix.to_string_lossy().into_owned(),
                    uid: meta.uid(),
                });
            }
        }
        Ok(())
    }

    fn relative(&self, absolute: &Path) -> String {
        let rel = absolute.strip_prefix(&self.mount).unwrap_or(absolute);
        String::from_utf8_lossy(rel.as_os_str().as_bytes())
            .trim_start_matches('/')
            .to_owned()
    }

    /// The id of a cgroup directory: its kernfs inode number (what
    /// `bpf_get_current_cgroup_id` returns for processes in it).
    pub fn id_of(path: &Path) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(path)?.ino())
    }
}

/// kubelet's pod cgroup roots when its `--cgroup-root` is left at `/`: the
/// systemd driver's `kubepods.slice` and the cgroupfs driver's `kubepods`.
pub const DEFAULT_KUBEPODS_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// Where kubelet puts pods, and nowhere else.
///
/// Anyone who may create a cgroup can give it any name: a node service can
/// build `kubepods.slice/...-pod<uid>.slice` under its own unit, and systemd
/// delegates `user@UID.service` to unprivileged users, who can build the
/// same there. So a path is a pod only when it lies below one of kubelet's
/// roots (paths relative to the cgroup2 mount), in kubelet's own layout:
/// root → optional QoS level → pod → container → (the container's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLayout {
    roots: Vec<Root>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Root {
    /// Normalised: no leading, trailing or doubled slashes.
    path: String,
    /// The systemd driver names children `<stem>-…` after the parent slice;
    /// `None`: the cgroupfs driver's plain names.
    stem: Option<String>,
}

impl Default for PodLayout {
    fn default() -> Self {
        PodLayout::new(DEFAULT_KUBEPODS_ROOTS)
    }
}

impl PodLayout {
    /// `roots`: kubelet's pod cgroup roots relative to the cgroup2 mount
    /// (`kubelet.slice/kubelet-kubepods.slice` for `--cgroup-root=/kubelet`
    /// with the systemd driver). Empty entries are ignored.
    pub fn new<S: AsRef<str>>(roots: impl IntoIterator<Item = S>) -> PodLayout {
        let roots = roots
            .into_iter()
            .filter_map(|r| {
                let path = r
                    .as_ref()
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("/");
                let last = path.rsplit('/').next()?.to_owned();
                (!path.is_empty()).then(|| Root {
                    stem: slice_stem(&last).map(str::to_owned),
                    path,
                })
            })
            .collect();
        PodLayout { roots }
    }

    /// The configured roots, as given (normalised).
    pub fn roots(&self) -> impl Iterator<Item = &str> {
        self.roots.iter().map(|r| r.path.as_str())
    }

    /// Which pod a cgroup path (relative to the cgroup2 mount) belongs to.
    ///
    /// `Ok(None)`: not a pod (node services, sessions, the root, kubelet's
    /// roots and QoS levels, lookalikes anywhere outside kubelet's roots).
    /// `Err`: below a root but not in kubelet's layout, or a pod-like cgroup
    /// nested inside a pod — refused rather than trusted.
    pub fn pod_of_path(&self, path: &str) -> Result<Option<PodCgroup>, CgroupError> {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let joined = segments.join("/");
        let Some(root) = self.roots.iter().find(|r| {
            joined == r.path
                || joined
                    .strip_prefix(&r.path)
                    .is_some_and(|rest| rest.starts_with('/'))
        }) else {
            return Ok(None);
        };
        let below_root = &segments[root.path.split('/').count()..];
        let mut stem = root.stem.clone();
        let mut i = 0;
        if let Some(seg) = below_root.first()
            && let Some(qos_stem) = qos_level(stem.as_deref(), seg)
        {
            stem = qos_stem;
            i = 1;
        }
        let Some(pod_seg) = below_root.get(i) else {
            return Ok(None);
        };
        let raw_uid = pod_uid_in(stem.as_deref(), pod_seg)
            .ok_or_else(|| CgroupError::NotKubeletLayout(path.to_owned()))?;
        let pod_uid =
            canonical_uid(&raw_uid).ok_or_else(|| CgroupError::InvalidPodUid(path.to_owned()))?;
        let inside = &below_root[i + 1..];
        if inside.iter().any(|s| looks_like_pod_or_root(s)) {
            return Err(CgroupError::Conflict(path.to_owned()));
        }
        let depth = segments.len() - inside.len();
        Ok(Some(PodCgroup {
            pod_uid: pod_uid.into(),
            container_id: inside
                .first()
                .and_then(|s| container_id_in(s))
                .map(Into::into),
            pod_path: segments[..depth].join("/"),
        }))
    }

    /// Whether at least one root exists under `mount`: i.e. kubelet keeps
    /// its pods in this cgroup2 hierarchy.
    pub fn present_under(&self, mount: &Path) -> bool {
        self.roots.iter().any(|r| mount.join(&r.path).is_dir())
    }
}

fn slice_stem(seg: &str) -> Option<&str> {
    seg.strip_suffix(".slice")
}

/// If `seg` is a QoS level under a parent with `stem` (systemd) or plain
/// names (cgroupfs), the naming stem its children use.
fn qos_level(stem: Option<&str>, seg: &str) -> Option<Option<String>> {
    const LEVELS: [&str; 2] = ["burstable", "besteffort"];
    match stem {
        Some(stem) => {
            let level = seg.strip_prefix(stem)?.strip_prefix('-')?;
            let level = level.strip_suffix(".slice")?;
            LEVELS
                .contains(&level)
                .then(|| Some(format!("{stem}-{level}")))
        }
        None => LEVELS.contains(&seg).then_some(None),
    }
}

/// The raw UID text in a pod segment: systemd names a pod slice
/// `<parent stem>-pod<uid with _>.slice`, cgroupfs `pod<uid>`.
fn pod_uid_in(stem: Option<&str>, seg: &str) -> Option<String> {
    match stem {
        Some(stem) => seg
            .strip_prefix(stem)?
            .strip_prefix("-pod")?
            .strip_suffix(".slice")
            .map(|uid| uid.replace('_', "-")),
        None => seg.strip_prefix("pod").map(str::to_owned),
    }
}

/// Any segment naming a pod (a UID where kubelet puts one) or a kubepods
/// root, in either driver's style. Other names a container gives its own
/// sub-cgroups (`podman-…`, `pod-cache`) are its business.
fn looks_like_pod_or_root(seg: &str) -> bool {
    if seg == "kubepods" || seg.ends_with("kubepods.slice") {
        return true;
    }
    let uid_after = |rest: &str| canonical_uid(&rest.replace('_', "-")).is_some();
    if seg.strip_prefix("pod").is_some_and(uid_after) {
        return true;
    }
    seg.strip_suffix(".slice")
        .and_then(|stem| stem.rsplit_once("-pod"))
        .is_some_and(|(_, uid)| uid_after(uid))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase hex.
pub(crate) fn canonical_uid(raw: &str) -> Option<String> {
    let uid = raw.to_ascii_lowercase();
    let groups: Vec<&str> = uid.split('-').collect();
    let shape_ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()));
    shape_ok.then_some(uid)
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or a
/// bare `<id>` (cgroupfs); ids are 64 hex characters.
fn container_id_in(seg: &str) -> Option<String> {
    let id = match seg.strip_suffix(".scope") {
        Some(scope) => scope.rsplit('-').next()?,
        None => seg,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/data/cgroup-paths.tsv");

    /// The roots the fixture's second comment line says it assumes.
    fn fixture_layout() -> PodLayout {
        let roots = FIXTURE
            .lines()
            .filter(|l| l.starts_with('#'))
            .find_map(|l| l.split_once("): ").map(|(_, roots)| roots))
            .expect("the fixture names its kubepods roots");
        PodLayout::new(roots.split_whitespace())
    }

    #[test]
    fn every_fixture_row_resolves_as_specified() {
        let layout = fixture_layout();
        assert_eq!(layout.roots().count(), 5, "{layout:?}");
        let mut rows = 0;
        for line in FIXTURE.lines().filter(|l| !l.starts_with('#')) {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 4, "malformed fixture row {line:?}");
            let (path, expected_uid, expected_container, what) =
                (cols[0], cols[1], cols[2], cols[3]);
            let got = layout.pod_of_path(path);
            match expected_uid {
                "CONFLICT" => assert!(
                    matches!(got, Err(CgroupError::Conflict(_))),
                    "{what}: {path} gave {got:?}"
                ),
                "INVALID" => assert!(
                    matches!(
                        got,
                        Err(CgroupError::InvalidPodUid(_) | CgroupError::NotKubeletLayout(_))
                    ),
                    "{what}: {path} gave {got:?}"
                ),
                "" => assert!(matches!(got, Ok(None)), "{what}: {path} gave {got:?}"),
                uid => {
                    let pod = got
                        .unwrap_or_else(|e| panic!("{what}: {path} failed: {e}"))
                        .unwrap_or_else(|| panic!("{what}: {path} is not a pod"));
                    assert_eq!(&*pod.pod_uid, uid, "{what}");
                    let container = (!expected_container.is_empty()).then_some(expected_container);
                    assert_eq!(pod.container_id.as_deref(), container, "{what}");
                    assert!(
                        pod.pod_path.ends_with(".slice") || pod.pod_path.contains("/pod"),
                        "{what}"
                    );
                    assert!(path.starts_with(&pod.pod_path), "{what}");
                }
            }
            rows += 1;
        }
        assert!(rows >= 28, "fixture lost rows: {rows}");
    }

    #[test]
    fn the_default_roots_are_kubelets_and_nothing_else() {
        let layout = PodLayout::default();
        let cases = [
            ("kubepods/pod0cc175b9-c0f1-b6a8-31c3-99e269772661/x", true),
            (
                "kubepods.slice/kubepods-pod0cc175b9_c0f1_b6a8_31c3_99e269772661.slice",
                true,
            ),
            (
                "test-run-4242/kubepods.slice/kubepods-pod0cc175b9_c0f1_b6a8_31c3_99e269772661.slice",
                false,
            ),
            (
                "kubelet/kubepods/pod0cc175b9-c0f1-b6a8-31c3-99e269772661/x",
                false,
            ),
        ];
        for (path, is_pod) in cases {
            assert_eq!(
                matches!(layout.pod_of_path(path), Ok(Some(_))),
                is_pod,
                "{path}"
            );
        }
        // A container's own sub-cgroups may start with "pod" without
        // naming one.
        let container = "kubepods/pod0cc175b9-c0f1-b6a8-31c3-99e269772661/ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
        for inner in ["podman-1.scope", "pod-cache", "pods.slice"] {
            assert!(
                matches!(
                    layout.pod_of_path(&format!("{container}/{inner}")),
                    Ok(Some(_))
                ),
                "{inner}"
            );
        }
        // Roots are normalised however they are written.
        assert_eq!(
            PodLayout::new(["/a//b/", "", "kubepods"])
                .roots()
                .collect::<Vec<_>>(),
            ["a/b", "kubepods"]
        );
    }

    #[test]
    fn finds_the_cgroup2_root_mount_not_a_subtree_bind() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
50 31 0:38 /kubepods /somewhere/else rw - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
    }
}
