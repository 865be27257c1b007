//! A private cgroup2 subtree per test, with pod cgroups laid out the way
//! kubelet lays them out. Removed on drop, killing anything left inside.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::names;

/// kubelet's two cgroup drivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's container cgroup as kubelet + containerd would create it.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub uid: String,
    pub container_id: String,
    pub driver: Driver,
}

impl PodSpec {
    /// A fresh pod with a unique UID and container id.
    pub fn new(driver: Driver) -> PodSpec {
        let a = names::unique_id();
        let b = names::unique_id();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        PodSpec {
            // Unique through `b` (48 bits hold it whole); shaped as a UID.
            uid: format!(
                "{:08x}-{:04x}-4{:03x}-8{:03x}-{b:012x}",
                a >> 32,
                nanos & 0xffff,
                a & 0xfff,
                b & 0xfff
            ),
            container_id: format!("{a:016x}{b:016x}{nanos:016x}{:016x}", a ^ b),
            driver,
        }
    }

    /// Path of the container cgroup relative to a kubelet cgroup root.
    pub fn container_path(&self) -> String {
        match self.driver {
            Driver::Systemd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
                self.uid.replace('-', "_"),
                self.container_id
            ),
            Driver::Cgroupfs => format!("kubepods/burstable/pod{}/{}", self.uid, self.container_id),
        }
    }
}

/// The roots [`PodSpec::container_path`] lays pods under (kubelet's
/// defaults for its two drivers).
const KUBEPODS_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];

pub struct CgroupTree {
    mount: PathBuf,
    root: PathBuf,
}

impl CgroupTree {
    /// A new uniquely named subtree directly under the cgroup2 mount.
    pub fn new() -> Result<CgroupTree> {
        let mount = agent::caller::cgroup::find_cgroup2_mount()?;
        let root = mount.join(names::unique("epia-test-"));
        fs::create_dir(&root).with_context(|| format!("mkdir {}", root.display()))?;
        Ok(CgroupTree { mount, root })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// kubelet's pod roots in this subtree, relative to the mount: what
    /// the agent gets as `--kubepods-root` under test.
    pub fn kubepods_roots(&self) -> Vec<String> {
        let rel = self
            .root
            .strip_prefix(&self.mount)
            .unwrap_or(&self.root)
            .to_string_lossy()
            .into_owned();
        KUBEPODS_ROOTS
            .iter()
            .map(|r| format!("{rel}/{r}"))
            .collect()
    }

    /// The pod layout the agent resolves this subtree with.
    pub fn layout(&self) -> agent::caller::cgroup::PodLayout {
        agent::caller::cgroup::PodLayout::new(self.kubepods_roots())
    }

    /// The subtree's root: where tests attach the kernel programs (and what
    /// the agent gets as its cgroup root under test).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates `rel` (and parents) below the root; returns its absolute path.
    pub fn create(&self, rel: &str) -> Result<PathBuf> {
        let path = self.root.join(rel);
        fs::create_dir_all(&path).with_context(|| format!("mkdir -p {}", path.display()))?;
        Ok(path)
    }

    /// Creates the container cgroup of `pod`.
    pub fn pod(&self, pod: &PodSpec) -> Result<PathBuf> {
        self.create(&pod.container_path())
    }

    /// Kills every process in the subtree and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        fs::write(self.root.join("cgroup.kill"), "1").context("write cgroup.kill")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while populated(&self.root)? {
            if Instant::now() > deadline {
                bail!(
                    "processes still in {} after cgroup.kill",
                    self.root.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

fn populated(cgroup: &Path) -> Result<bool> {
    let events = fs::read_to_string(cgroup.join("cgroup.events")).context("read cgroup.events")?;
    Ok(events.lines().any(|l| l == "populated 1"))
}

/// Removes a cgroup directory tree, children first.
pub fn remove_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all().and_then(|()| remove_tree(&self.root)) {
            eprintln!("cleanup of {}: {e:#}", self.root.display());
        }
    }
}
