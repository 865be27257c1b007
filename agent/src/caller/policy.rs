//! The caller cross-check (docs/architecture.md §3, §5), pure: who the kernel says is calling,
//! what the token claims, what EKS Auth answered → allowed, or which check
//! failed. No I/O, so every rule is unit-tested without a kernel.

use std::{fmt, sync::Arc};

use crate::{
    caller::{
        attribution::AttributionError,
        cgroup::{CgroupError, PodCgroup},
    },
    token::Claims,
    upstream::Assumed,
};

/// Who opened the connection, as far as the kernel and the cgroup tree say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// In a pod's cgroup.
    Pod(PodCgroup),
    /// A node process outside any pod (or a cgroup that is no pod's).
    /// `root_owned`: its cgroup is root's all the way down (a system
    /// service such as the kubelet), not a user's delegated subtree.
    NotAPod {
        cgroup_path: String,
        root_owned: bool,
    },
    /// The kernel has no record of the connection (opened before the
    /// programs were attached, or by a path they do not see).
    Unattributed,
    /// The kernel kept no SYN for the connection (SYN cookies: the
    /// listener's queue overflowed, as under a SYN flood), so its stamp is
    /// lost. Not the caller's doing: worth a retry.
    NoSynKept,
    /// Stamped by the previous agent's programs (an upgrade to another
    /// build of them is under way), and that agent could not vouch for it
    /// any more (it exited, or did not answer). Not the caller's doing: a
    /// retry opens a connection this agent's programs stamp.
    Unvouched,
    /// A record exists but its cgroup could not be resolved (gone, or a
    /// path that must be refused, e.g. a pod-like cgroup nested in a pod).
    Unresolvable(Unresolved),
    /// In kubelet's layout, but some directory on the way is not owned by
    /// root: a delegated subtree, whose owner can name cgroups at will.
    Delegated { cgroup_path: String, uid: u32 },
}

/// Why a connection's opener could not be named, with the error that said
/// so kept whole (shared, so a `Caller` stays cheap to clone and cache).
#[derive(Clone, Debug)]
pub enum Unresolved {
    /// The kernel programs' map could not be read, or the stamp was forged.
    KernelLookup(Arc<AttributionError>),
    /// The record's cgroup was removed before it could be resolved.
    CgroupGone(u64),
    /// The cgroup tree refused (unreadable, or a layout that must be refused).
    Cgroup(Arc<CgroupError>),
}

impl fmt::Display for Unresolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unresolved::KernelLookup(e) => write!(f, "kernel lookup failed: {e}"),
            Unresolved::CgroupGone(id) => write!(f, "cgroup {id} no longer exists"),
            Unresolved::Cgroup(e) => write!(f, "{e}"),
        }
    }
}

/// Equal when of the same kind and saying the same (errors themselves are
/// not comparable); what tests and the resolution cache need.
impl PartialEq for Unresolved {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

impl Eq for Unresolved {}

/// A failed check, in the order they are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    CallerNotAPod(String),
    SynNotKept,
    Unvouched,
    CallerDelegated(String),
    TokenNotPodBound,
    PodMismatch {
        token_pod: String,
        caller_pod: String,
    },
    SubjectMismatch {
        sub: String,
        expected: String,
    },
    NodeMismatch {
        token_node: String,
        this_node: String,
    },
    UpstreamSubjectMismatch {
        upstream: String,
        token: String,
    },
}

impl Violation {
    /// The HTTP status of a refusal: 403, except where the caller could not
    /// be told apart through no act of its own and a retry may succeed.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Violation::SynNotKept | Violation::Unvouched => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::FORBIDDEN,
        }
    }

    /// Stable label for metrics and audit events.
    pub fn reason(&self) -> &'static str {
        match self {
            Violation::CallerNotAPod(_) => "caller-not-a-pod",
            Violation::SynNotKept => "syn-not-kept",
            Violation::Unvouched => "previous-agent-gone",
            Violation::CallerDelegated(_) => "caller-cgroup-delegated",
            Violation::TokenNotPodBound => "token-not-pod-bound",
            Violation::PodMismatch { .. } => "pod-mismatch",
            Violation::SubjectMismatch { .. } => "subject-mismatch",
            Violation::NodeMismatch { .. } => "node-mismatch",
            Violation::UpstreamSubjectMismatch { .. } => "upstream-subject-mismatch",
        }
    }
}

/// The body of a 403: names the check, never echoes the token.
impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::CallerNotAPod(why) => write!(
                f,
                "caller check failed: the calling process is not in a pod ({why})"
            ),
            Violation::SynNotKept => write!(
                f,
                "caller check failed: the connection could not be attributed (the kernel kept no SYN: the listener's queue overflowed); retry"
            ),
            Violation::Unvouched => write!(
                f,
                "caller check failed: the connection was stamped by the previous agent, which can no longer vouch for it (an upgrade is under way); retry"
            ),
            Violation::CallerDelegated(why) => write!(
                f,
                "caller check failed: the calling process is in a delegated cgroup ({why})"
            ),
            Violation::TokenNotPodBound => {
                write!(f, "token check failed: the token is not bound to a pod")
            }
            Violation::PodMismatch {
                token_pod,
                caller_pod,
            } => write!(
                f,
                "pod check failed: the token belongs to pod {token_pod} but the caller is pod {caller_pod}"
            ),
            Violation::SubjectMismatch { sub, expected } => write!(
                f,
                "subject check failed: token subject {sub} does not match its service account {expected}"
            ),
            Violation::NodeMismatch {
                token_node,
                this_node,
            } => write!(
                f,
                "node check failed: the token was issued for node {token_node}, this is node {this_node}"
            ),
            Violation::UpstreamSubjectMismatch { upstream, token } => write!(
                f,
                "subject check failed: EKS Auth answered for {upstream} but the token is for {token}"
            ),
        }
    }
}

/// Checks before asking EKS Auth: caller is a pod, token pod-bound, same
/// pod, `sub` consistent, node (when the token names one and we know ours).
pub fn before_upstream(
    caller: &Caller,
    claims: &Claims,
    this_node: Option<&str>,
) -> Result<(), Violation> {
    let pod = match caller {
        Caller::Pod(pod) => pod,
        Caller::NotAPod { cgroup_path, .. } => {
            return Err(Violation::CallerNotAPod(format!("cgroup /{cgroup_path}")));
        }
        Caller::NoSynKept => return Err(Violation::SynNotKept),
        Caller::Unvouched => return Err(Violation::Unvouched),
        Caller::Unattributed => {
            return Err(Violation::CallerNotAPod(
                "connection not attributed by the kernel".into(),
            ));
        }
        Caller::Unresolvable(why) => return Err(Violation::CallerNotAPod(why.to_string())),
        Caller::Delegated { cgroup_path, uid } => {
            return Err(Violation::CallerDelegated(format!(
                "cgroup /{cgroup_path} is owned by uid {uid}"
            )));
        }
    };
    let token_pod = claims.pod_uid().ok_or(Violation::TokenNotPodBound)?;
    if !token_pod.eq_ignore_ascii_case(&pod.pod_uid) {
        return Err(Violation::PodMismatch {
            token_pod: token_pod.to_owned(),
            caller_pod: pod.pod_uid.to_string(),
        });
    }
    // Compared in place (this runs on every request); spelled out only
    // for the refusal.
    let sub = claims.sub.as_deref().unwrap_or_default();
    let named = match (claims.namespace(), claims.service_account()) {
        (Some(namespace), Some(service_account)) => sub
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.strip_prefix(namespace))
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| rest == service_account),
        _ => false,
    };
    if !named {
        return Err(Violation::SubjectMismatch {
            sub: sub.to_owned(),
            expected: format!(
                "system:serviceaccount:{}:{}",
                claims.namespace().unwrap_or_default(),
                claims.service_account().unwrap_or_default()
            ),
        });
    }
    if let (Some(token_node), Some(this_node)) = (claims.node_name(), this_node)
        && token_node != this_node
    {
        return Err(Violation::NodeMismatch {
            token_node: token_node.to_owned(),
            this_node: this_node.to_owned(),
        });
    }
    Ok(())
}

/// After EKS Auth: its verified subject must be the token's.
/// Compared in place: this runs on every request.
pub fn after_upstream(claims: &Claims, assumed: &Assumed) -> Result<(), Violation> {
    let namespace = claims.namespace().unwrap_or_default();
    let service_account = claims.service_account().unwrap_or_default();
    let upstream = &*assumed.subject;
    // `upstream == format!("{namespace}/{service_account}")`, unallocated.
    let same = upstream
        .strip_prefix(namespace)
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(service_account);
    if same {
        return Ok(());
    }
    Err(Violation::UpstreamSubjectMismatch {
        upstream: upstream.to_owned(),
        token: format!("{namespace}/{service_account}"),
    })
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::token::{KubernetesClaims, ObjectRef};

    const POD: &str = "0cc175b9-c0f1-b6a8-31c3-99e269772661";
    const OTHER: &str = "92eb5ffe-e6ae-2fec-3ad7-1c777531578f";

    fn pod(uid: &str) -> Caller {
        Caller::Pod(PodCgroup {
            pod_uid: uid.into(),
            container_id: None,
            pod_path: String::new(),
        })
    }

    fn claims(pod_uid: Option<&str>, sub: &str, node: Option<&str>) -> Claims {
        let obj = |name: &str, uid: Option<&str>| ObjectRef {
            name: Some(name.into()),
            uid: uid.map(Into::into),
        };
        Claims {
            sub: Some(sub.into()),
            kubernetes: Some(KubernetesClaims {
                namespace: Some("default".into()),
                pod: pod_uid.map(|u| obj("p", Some(u))),
                serviceaccount: Some(obj("app", None)),
                node: node.map(|n| obj(n, None)),
            }),
            ..Claims::default()
        }
    }

    const SUB: &str = "system:serviceaccount:default:app";

    #[test]
    fn checks_in_order() {
        let not_pod = Caller::NotAPod {
            cgroup_path: "system.slice/kubelet.service".into(),
            root_owned: true,
        };
        // (what, caller, claims, this node, expected reason or None)
        type Case = (
            &'static str,
            Caller,
            Claims,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "own token",
                pod(POD),
                claims(Some(POD), SUB, None),
                None,
                None,
            ),
            (
                "own token, right node",
                pod(POD),
                claims(Some(POD), SUB, Some("n1")),
                Some("n1"),
                None,
            ),
            (
                "node unknown here",
                pod(POD),
                claims(Some(POD), SUB, Some("n1")),
                None,
                None,
            ),
            (
                "node process",
                not_pod,
                claims(Some(POD), SUB, None),
                None,
                Some("caller-not-a-pod"),
            ),
            (
                "unattributed",
                Caller::Unattributed,
                claims(Some(POD), SUB, None),
                None,
                Some("caller-not-a-pod"),
            ),
            (
                "unresolvable",
                Caller::Unresolvable(Unresolved::CgroupGone(7)),
                claims(Some(POD), SUB, None),
                None,
                Some("caller-not-a-pod"),
            ),
            (
                "delegated lookalike",
                Caller::Delegated {
                    cgroup_path: "kubepods/pod0cc175b9-c0f1-b6a8-31c3-99e269772661".into(),
                    uid: 1000,
                },
                claims(Some(POD), SUB, None),
                None,
                Some("caller-cgroup-delegated"),
            ),
            (
                "SYN cookie",
                Caller::NoSynKept,
                claims(Some(POD), SUB, None),
                None,
                Some("syn-not-kept"),
            ),
            (
                "stamped by a previous agent that is gone",
                Caller::Unvouched,
                claims(Some(POD), SUB, None),
                None,
                Some("previous-agent-gone"),
            ),
            (
                "unbound token",
                pod(POD),
                claims(None, SUB, None),
                None,
                Some("token-not-pod-bound"),
            ),
            (
                "replayed token",
                pod(OTHER),
                claims(Some(POD), SUB, None),
                None,
                Some("pod-mismatch"),
            ),
            (
                "forged sub",
                pod(POD),
                claims(Some(POD), "system:serviceaccount:kube-system:admin", None),
                None,
                Some("subject-mismatch"),
            ),
            // The subject is compared in place, part by part: only the
            // exact string matches.
            (
                "sub with a longer service account",
                pod(POD),
                claims(Some(POD), "system:serviceaccount:default:app:x", None),
                None,
                Some("subject-mismatch"),
            ),
            (
                "sub with a shorter service account",
                pod(POD),
                claims(Some(POD), "system:serviceaccount:default:ap", None),
                None,
                Some("subject-mismatch"),
            ),
            (
                "sub without the separator",
                pod(POD),
                claims(Some(POD), "system:serviceaccount:defaultapp", None),
                None,
                Some("subject-mismatch"),
            ),
            (
                "sub of a user",
                pod(POD),
                claims(Some(POD), "default:app", None),
                None,
                Some("subject-mismatch"),
            ),
            (
                "other node",
                pod(POD),
                claims(Some(POD), SUB, Some("n2")),
                Some("n1"),
                Some("node-mismatch"),
            ),
            // Order: a replay from a non-pod is reported as the caller check.
            (
                "first failure wins",
                Caller::Unattributed,
                claims(None, "x", Some("n2")),
                Some("n1"),
                Some("caller-not-a-pod"),
            ),
        ];
        for (what, caller, claims, node, expected) in cases {
            let got = before_upstream(&caller, &claims, node).err();
            assert_eq!(
                got.as_ref().map(Violation::reason),
                expected,
                "{what}: {got:?}"
            );
            if let Some(v) = got {
                assert!(!v.to_string().contains("eyJ"), "{what}");
            }
        }
    }

    #[test]
    fn upstream_subject_must_match_the_token() {
        let assumed = |ns: &str, sa: &str| Assumed {
            answer: crate::upstream::SdkAnswer {
                access_key_id: "",
                secret_access_key: "",
                session_token: "",
                account_id: None,
                expiration: SystemTime::now(),
            }
            .encode(),
            expiration: SystemTime::now(),
            association_id: "".into(),
            role_arn: "".into(),
            subject: format!("{ns}/{sa}").into(),
        };
        let c = claims(Some(POD), SUB, None);
        // EKS Auth's subject (namespace, service account) → whether it is
        // the token's `default/app`.
        let cases = [
            (("default", "app"), true),
            (("default", "admin"), false),
            (("kube-system", "app"), false),
            (("default", "ap"), false),
            (("defaul", "tapp"), false),
            (("default", "app/x"), false),
            (("", "default/app"), false),
        ];
        for ((ns, sa), same) in cases {
            let verdict = after_upstream(&c, &assumed(ns, sa));
            assert_eq!(verdict.is_ok(), same, "{ns}/{sa}: {verdict:?}");
            if let Err(err) = verdict {
                assert_eq!(err.reason(), "upstream-subject-mismatch");
            }
        }
    }
}
