//! Which cgroup is which pod, by name: the kubelet's pod cgroups (from the
//! cgroup tree) joined with its pod log directories
//! (`<namespace>_<pod>_<uid>`), so the guard knows a pod's namespace and
//! name without the Kubernetes API — and the verdict map that follows.
//!
//! Pure state: the watcher (`imds::watch`) feeds it what it finds on disk
//! and writes the [`Change`]s it returns to the kernel map.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use agent_ebpf::ImdsVerdict;
use tracing::warn;

use super::policy::{ImdsPolicy, is_dns_label};
use crate::caller::cgroup::canonical_uid;

/// A classified pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// A write to the kernel's verdict map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Set(u64, ImdsVerdict),
    Remove(u64),
}

/// A kubelet pod log directory's name: `(uid, namespace, pod name)`.
/// Namespaces (DNS labels) and pod names (DNS subdomains) never hold `_`,
/// so the first and last `_` split it.
pub fn parse_log_dir(name: &str) -> Option<PodInfo> {
    let (namespace, rest) = name.split_once('_')?;
    let (pod, uid) = rest.rsplit_once('_')?;
    let valid_pod = !pod.is_empty()
        && pod.len() <= 253
        && pod
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !is_dns_label(namespace) || !valid_pod {
        return None;
    }
    // kubelet writes the UID as the API gives it: canonical already.
    let uid = canonical_uid(uid).filter(|c| c == uid)?;
    Some(PodInfo {
        uid,
        namespace: namespace.to_owned(),
        name: pod.to_owned(),
    })
}

/// Classified pods by their pod cgroup's id: what the event reader names
/// a connect's pod with. Written by the watcher only.
#[derive(Default)]
pub struct PodTable(RwLock<HashMap<u64, Arc<PodInfo>>>);

impl PodTable {
    pub fn get(&self, cgroup_id: u64) -> Option<Arc<PodInfo>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&cgroup_id)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, Arc<PodInfo>>> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What is on disk, in full (a scan).
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// kubelet's pod roots: (path relative to the cgroup2 mount, cgroup id).
    pub roots: Vec<(String, u64)>,
    /// Pod cgroups: (relative path, pod UID, cgroup id).
    pub pods: Vec<(String, String, u64)>,
    /// Pod log directory names.
    pub logs: Vec<String>,
}

/// A pod cgroup, and the pod its log directory named first.
struct PodCgroup {
    uid: String,
    id: u64,
    /// Kept while the cgroup lives: the kubelet names a pod before its
    /// containers run, so a later, different name (however the first one
    /// went) is not the kubelet's, and classifies the pod as nothing.
    first: Option<Arc<PodInfo>>,
    /// Named twice before it was named once: no name is its first.
    contested: bool,
}

impl PodCgroup {
    /// `known`, if it is this very cgroup (same id, same pod): what it was
    /// first named stays. Else a cgroup not named yet.
    fn same_or_new(known: Option<PodCgroup>, uid: String, id: u64) -> PodCgroup {
        known
            .filter(|c| c.id == id && c.uid == uid)
            .unwrap_or(PodCgroup {
                uid,
                id,
                first: None,
                contested: false,
            })
    }
}

/// The guard's knowledge of the node's pods.
pub struct Inventory {
    policy: ImdsPolicy,
    roots: HashMap<String, u64>,
    /// Pod cgroups by path.
    cgroups: HashMap<String, PodCgroup>,
    /// UID → the pods its log directories name: one, unless something
    /// other than the kubelet made a directory for that UID — then the pod
    /// is not classified (a pod that can write `/var/log/pods` must not
    /// name itself into an allowed namespace).
    named: HashMap<String, Vec<Arc<PodInfo>>>,
    table: Arc<PodTable>,
}

impl Inventory {
    pub fn new(policy: ImdsPolicy, table: Arc<PodTable>) -> Inventory {
        Inventory {
            policy,
            roots: HashMap::new(),
            cgroups: HashMap::new(),
            named: HashMap::new(),
            table,
        }
    }

    /// Replaces everything with a full scan; the kernel writes that take
    /// the map from what was to what is.
    pub fn resync(&mut self, found: Found) -> Vec<Change> {
        self.update(|inv| {
            inv.roots = found.roots.into_iter().collect();
            let mut known = std::mem::take(&mut inv.cgroups);
            for (path, uid, id) in found.pods {
                let cgroup = PodCgroup::same_or_new(known.remove(&path), uid, id);
                inv.cgroups.insert(path, cgroup);
            }
            inv.named.clear();
            for pod in found.logs.iter().filter_map(|name| parse_log_dir(name)) {
                inv.name(pod);
            }
        })
    }

    pub fn pod_cgroup_found(&mut self, path: String, uid: String, id: u64) -> Vec<Change> {
        self.update(|inv| {
            let cgroup = PodCgroup::same_or_new(inv.cgroups.remove(&path), uid, id);
            inv.cgroups.insert(path, cgroup);
        })
    }

    /// The pod's cgroup is gone: so is its entry.
    pub fn cgroup_gone(&mut self, path: &str) -> Vec<Change> {
        self.update(|inv| {
            inv.cgroups.remove(path);
        })
    }

    pub fn log_dir_found(&mut self, name: &str) -> Vec<Change> {
        let Some(pod) = parse_log_dir(name) else {
            return Vec::new();
        };
        self.update(|inv| inv.name(pod))
    }

    /// Adds a log directory's pod to its UID's names.
    fn name(&mut self, pod: PodInfo) {
        let names = self.named.entry(pod.uid.clone()).or_default();
        if names.iter().any(|known| **known == pod) {
            return;
        }
        if let Some(first) = names.first() {
            warn!(
                uid = %pod.uid,
                first = %format_args!("{}/{}", first.namespace, first.name),
                another = %format_args!("{}/{}", pod.namespace, pod.name),
                "IMDS guard: two pod log directories name one pod UID; the pod is not classified (it gets --imds-unclassified) while both exist"
            );
        }
        names.push(Arc::new(pod));
    }

    /// kubelet removes a pod's logs after the pod; its entry stays as long
    /// as its cgroup does. (A second name going classifies the pod again.)
    pub fn log_dir_gone(&mut self, name: &str) -> Vec<Change> {
        let Some(pod) = parse_log_dir(name) else {
            return Vec::new();
        };
        self.update(|inv| {
            if let Some(names) = inv.named.get_mut(&pod.uid) {
                names.retain(|known| **known != pod);
                if names.is_empty() {
                    inv.named.remove(&pod.uid);
                }
            }
        })
    }

    /// The kernel map's content as the inventory has it.
    pub fn verdicts(&self) -> HashMap<u64, ImdsVerdict> {
        self.entries()
            .into_iter()
            .map(|(id, (verdict, _))| (id, verdict))
            .collect()
    }

    /// Pods classified (with an entry of their own in the kernel map).
    pub fn classified(&self) -> usize {
        self.table.len()
    }

    /// Whether `path` is a pod cgroup the inventory holds.
    pub fn holds_cgroup(&self, path: &str) -> bool {
        self.cgroups.contains_key(path)
    }

    /// The map entries the inventory implies: each root (for pods not
    /// classified yet) and each pod whose cgroup and log directory are both
    /// known. A pod classified once keeps its verdict while its cgroup
    /// lives (its logs may go first); named otherwise since, or twice, it
    /// is classified by no name.
    fn entries(&self) -> HashMap<u64, (ImdsVerdict, Option<Arc<PodInfo>>)> {
        let mut entries: HashMap<_, _> = self
            .roots
            .values()
            .map(|&id| (id, (self.policy.unclassified(), None)))
            .collect();
        for cgroup in self.cgroups.values() {
            let named = self.named.get(&cgroup.uid).map(Vec::as_slice);
            let pod = match (named, &cgroup.first) {
                _ if cgroup.contested => None,
                (Some([pod]), None) => Some(pod.clone()),
                (Some([pod]), Some(first)) if pod == first => Some(pod.clone()),
                (Some([]) | None, first) => first.clone(),
                _ => None,
            };
            if let Some(pod) = pod {
                let verdict = self.policy.pod(&pod.namespace, &pod.name);
                entries.insert(cgroup.id, (verdict, Some(pod)));
            }
        }
        entries
    }

    /// Each cgroup named for the first time remembers that name — or, named
    /// twice at once, that it has none.
    fn remember_first_names(&mut self) {
        for cgroup in self.cgroups.values_mut() {
            if cgroup.first.is_some() || cgroup.contested {
                continue;
            }
            match self.named.get(&cgroup.uid).map(Vec::as_slice) {
                Some([pod]) => cgroup.first = Some(pod.clone()),
                Some([_, _, ..]) => cgroup.contested = true,
                _ => {}
            }
        }
    }

    fn update(&mut self, change: impl FnOnce(&mut Inventory)) -> Vec<Change> {
        let before = self.entries();
        change(self);
        self.remember_first_names();
        let after = self.entries();
        let mut changes = Vec::new();
        let mut table = self.table.write();
        for (id, (verdict, pod)) in &after {
            if before.get(id).map(|(v, _)| v) != Some(verdict) {
                changes.push(Change::Set(*id, *verdict));
            }
            match pod {
                Some(pod) => {
                    table.insert(*id, pod.clone());
                }
                None => {
                    table.remove(id);
                }
            }
        }
        for id in before.keys().filter(|id| !after.contains_key(id)) {
            changes.push(Change::Remove(*id));
            table.remove(id);
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::policy::{AllowRule, ImdsMode};
    use agent_ebpf::{IMDS_ALLOW, IMDS_DENY, IMDS_REASON_NAMESPACE, IMDS_REASON_NOT_ALLOWED};

    const UID_A: &str = "0cc175b9-c0f1-b6a8-31c3-99e269772661";
    const UID_B: &str = "92eb5ffe-e6ae-2fec-3ad7-1c777531578f";

    #[test]
    fn log_directory_names_parse_as_kubelet_writes_them() {
        let cases = [
            (
                format!("kube-system_aws-node-x7x2k_{UID_A}"),
                Some(("kube-system", "aws-node-x7x2k")),
            ),
            (
                format!("default_web.v2-0_{UID_A}"),
                Some(("default", "web.v2-0")),
            ),
            (format!("default__{UID_A}"), None),
            (format!("Default_web_{UID_A}"), None),
            (format!("default_web_{}", UID_A.to_uppercase()), None),
            ("default_web_not-a-uid".to_owned(), None),
            (format!("default_a_b_{UID_A}"), None),
            (UID_A.to_owned(), None),
        ];
        for (name, expected) in cases {
            let got = parse_log_dir(&name).map(|p| (p.namespace, p.name));
            let expected = expected.map(|(ns, pod)| (ns.to_owned(), pod.to_owned()));
            assert_eq!(got, expected, "{name}");
        }
    }

    /// An empty inventory, its table, and its policy: enforce, allowing
    /// `kube-system`.
    fn enforce_allowing_kube_system() -> (ImdsPolicy, Arc<PodTable>, Inventory) {
        let policy = ImdsPolicy::new(
            ImdsMode::Enforce,
            vec![AllowRule::parse("kube-system").unwrap()],
            None,
        );
        let table = Arc::new(PodTable::default());
        let inv = Inventory::new(policy.clone(), table.clone());
        (policy, table, inv)
    }

    #[test]
    fn a_pod_is_classified_once_both_its_cgroup_and_its_logs_are_seen() {
        let (policy, table, mut inv) = enforce_allowing_kube_system();
        let changes = inv.resync(Found {
            roots: vec![("kubepods".into(), 10)],
            ..Found::default()
        });
        assert_eq!(changes, vec![Change::Set(10, policy.unclassified())]);

        // Cgroup first (kubelet's order), then the log directory.
        assert!(
            inv.pod_cgroup_found("kubepods/podA".into(), UID_A.into(), 11)
                .is_empty()
        );
        let allowed = ImdsVerdict {
            decision: IMDS_ALLOW,
            reason: IMDS_REASON_NAMESPACE,
        };
        assert_eq!(
            inv.log_dir_found(&format!("kube-system_aws-node_{UID_A}")),
            vec![Change::Set(11, allowed)]
        );
        assert_eq!(
            table.get(11).map(|p| p.name.clone()),
            Some("aws-node".into())
        );
        // Logs first, then the cgroup.
        assert!(
            inv.log_dir_found(&format!("default_app_{UID_B}"))
                .is_empty()
        );
        let denied = ImdsVerdict {
            decision: IMDS_DENY,
            reason: IMDS_REASON_NOT_ALLOWED,
        };
        assert_eq!(
            inv.pod_cgroup_found("kubepods/podB".into(), UID_B.into(), 12),
            vec![Change::Set(12, denied)]
        );
        // Logs removed first: the verdict stays while the cgroup lives.
        assert!(
            inv.log_dir_gone(&format!("kube-system_aws-node_{UID_A}"))
                .is_empty()
        );
        assert!(
            inv.pod_cgroup_found("kubepods/podB".into(), UID_B.into(), 12)
                .is_empty()
        );
        assert_eq!(inv.cgroup_gone("kubepods/podA"), vec![Change::Remove(11)]);
        assert!(table.get(11).is_none());
        // A full rescan that finds pod B gone and nothing new.
        let changes = inv.resync(Found {
            roots: vec![("kubepods".into(), 10)],
            pods: Vec::new(),
            logs: Vec::new(),
        });
        assert_eq!(changes, vec![Change::Remove(12)]);
        assert!(table.is_empty());
    }

    /// A pod that can write the log directory (a hostPath of
    /// `/var/log/pods`) adds one naming an allowed namespace for its own
    /// UID: it is then classified by neither name, until one goes.
    #[test]
    fn a_uid_named_by_two_log_directories_is_not_classified() {
        let (_, table, mut inv) = enforce_allowing_kube_system();
        inv.resync(Found {
            roots: vec![("kubepods".into(), 10)],
            pods: vec![("kubepods/podA".into(), UID_A.into(), 11)],
            logs: vec![format!("default_app_{UID_A}")],
        });
        let denied = ImdsVerdict {
            decision: IMDS_DENY,
            reason: IMDS_REASON_NOT_ALLOWED,
        };
        assert_eq!(inv.verdicts().get(&11), Some(&denied));
        let forged = format!("kube-system_aws-node_{UID_A}");
        // Its own entry goes: the root's (unclassified, denied) applies.
        assert_eq!(inv.log_dir_found(&forged), vec![Change::Remove(11)]);
        assert!(table.get(11).is_none());
        // The same on a rescan, whichever directory it lists first.
        for logs in [
            vec![forged.clone(), format!("default_app_{UID_A}")],
            vec![format!("default_app_{UID_A}"), forged.clone()],
        ] {
            inv.resync(Found {
                roots: vec![("kubepods".into(), 10)],
                pods: vec![("kubepods/podA".into(), UID_A.into(), 11)],
                logs,
            });
            assert_eq!(inv.verdicts().get(&11), None);
        }
        // The forged one removed: classified by the kubelet's again.
        assert_eq!(inv.log_dir_gone(&forged), vec![Change::Set(11, denied)]);
        assert_eq!(table.get(11).map(|p| p.name.clone()), Some("app".into()));
        // The kubelet's removed first, then the forged one made: still the
        // first name's verdict, not the forged one's.
        let genuine = format!("default_app_{UID_A}");
        assert!(inv.log_dir_gone(&genuine).is_empty());
        assert_eq!(inv.log_dir_found(&forged), vec![Change::Remove(11)]);
        // Named twice at once from the start (a scan): no name is trusted,
        // not even after one of them goes.
        let (_, _, mut fresh) = enforce_allowing_kube_system();
        fresh.resync(Found {
            roots: vec![("kubepods".into(), 10)],
            pods: vec![("kubepods/podA".into(), UID_A.into(), 11)],
            logs: vec![genuine.clone(), forged.clone()],
        });
        assert!(fresh.log_dir_gone(&genuine).is_empty());
        assert_eq!(fresh.verdicts().get(&11), None);
        // A forger that wins the race (its directory before the kubelet's,
        // the pod cgroup already there) is trusted — until the kubelet's
        // directory appears: then the pod is classified by neither while
        // its cgroup lives. The window is the kubelet's, not closable here.
        let (_, _, mut raced) = enforce_allowing_kube_system();
        raced.resync(Found {
            roots: vec![("kubepods".into(), 10)],
            pods: vec![("kubepods/podA".into(), UID_A.into(), 11)],
            logs: vec![],
        });
        let allowed = raced.log_dir_found(&forged);
        assert!(
            matches!(allowed[..], [Change::Set(11, v)] if v.decision == IMDS_ALLOW),
            "{allowed:?}"
        );
        assert_eq!(raced.log_dir_found(&genuine), vec![Change::Remove(11)]);
        assert!(raced.log_dir_gone(&forged).is_empty());
        assert_eq!(raced.verdicts().get(&11), None);
    }
}
