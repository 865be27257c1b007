//! Who may reach the instance metadata service: the operator's rules
//! (`--imds`, `--imds-allow`, `--imds-unclassified`) turned into the
//! verdicts the kernel programs apply.

use agent_ebpf::{
    IMDS_ALLOW, IMDS_AUDIT_ONLY, IMDS_DENY, IMDS_REASON_NAMESPACE, IMDS_REASON_NODE,
    IMDS_REASON_NOT_ALLOWED, IMDS_REASON_POD, IMDS_REASON_UNCLASSIFIED, ImdsVerdict,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImdsMode {
    Off,
    Audit,
    Enforce,
}

impl ImdsMode {
    pub fn label(self) -> &'static str {
        match self {
            ImdsMode::Off => "off",
            ImdsMode::Audit => "audit",
            ImdsMode::Enforce => "enforce",
        }
    }
}

/// What a pod not classified yet gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unclassified {
    Allow,
    Deny,
}

/// `namespace` or `namespace/pod-name-prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    pub namespace: String,
    pub prefix: Option<String>,
}

impl AllowRule {
    pub fn parse(raw: &str) -> Result<AllowRule, String> {
        let raw = raw.trim();
        let (namespace, prefix) = match raw.split_once('/') {
            Some((ns, prefix)) => (ns, Some(prefix)),
            None => (raw, None),
        };
        if !is_dns_label(namespace) {
            return Err(format!(
                "{raw:?}: {namespace:?} is not a namespace name (lowercase letters, digits, '-')"
            ));
        }
        if let Some(prefix) = prefix
            && (prefix.is_empty() || prefix.contains('/') || prefix.contains('_'))
        {
            return Err(format!(
                "{raw:?}: the pod name prefix after '/' must be non-empty, without '/' or '_'"
            ));
        }
        Ok(AllowRule {
            namespace: namespace.to_owned(),
            prefix: prefix.map(str::to_owned),
        })
    }

    fn reason(&self, namespace: &str, pod: &str) -> Option<u32> {
        if self.namespace != namespace {
            return None;
        }
        match &self.prefix {
            None => Some(IMDS_REASON_NAMESPACE),
            Some(prefix) if pod.starts_with(prefix.as_str()) => Some(IMDS_REASON_POD),
            Some(_) => None,
        }
    }
}

impl std::fmt::Display for AllowRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.prefix {
            Some(prefix) => write!(f, "{}/{prefix}", self.namespace),
            None => f.write_str(&self.namespace),
        }
    }
}

/// A Kubernetes namespace name (RFC 1123 label).
pub(crate) fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The guard's rules in force.
#[derive(Clone, Debug)]
pub struct ImdsPolicy {
    pub mode: ImdsMode,
    pub allow: Vec<AllowRule>,
    pub unclassified: Unclassified,
}

impl ImdsPolicy {
    /// `unclassified` unset: allow in audit, deny in enforce.
    pub fn new(mode: ImdsMode, allow: Vec<AllowRule>, unclassified: Option<Unclassified>) -> Self {
        let unclassified = unclassified.unwrap_or(match mode {
            ImdsMode::Enforce => Unclassified::Deny,
            ImdsMode::Audit | ImdsMode::Off => Unclassified::Allow,
        });
        ImdsPolicy {
            mode,
            allow,
            unclassified,
        }
    }

    /// The verdict for a classified pod.
    pub fn pod(&self, namespace: &str, pod: &str) -> ImdsVerdict {
        match self.allow.iter().find_map(|r| r.reason(namespace, pod)) {
            Some(reason) => ImdsVerdict {
                decision: IMDS_ALLOW,
                reason,
            },
            None => self.refused(IMDS_REASON_NOT_ALLOWED),
        }
    }

    /// The verdict for a pod not classified yet (a pod root's entry).
    pub fn unclassified(&self) -> ImdsVerdict {
        match self.unclassified {
            Unclassified::Allow => ImdsVerdict {
                decision: IMDS_ALLOW,
                reason: IMDS_REASON_UNCLASSIFIED,
            },
            Unclassified::Deny => self.refused(IMDS_REASON_UNCLASSIFIED),
        }
    }

    /// Denied in enforce; let through, recorded, in audit.
    fn refused(&self, reason: u32) -> ImdsVerdict {
        ImdsVerdict {
            decision: if self.mode == ImdsMode::Enforce {
                IMDS_DENY
            } else {
                IMDS_AUDIT_ONLY
            },
            reason,
        }
    }

    /// Everything the kernel map's content depends on, as stable text: two
    /// agents sharing pinned programs must agree on it.
    pub fn describe(&self) -> String {
        let allow: Vec<String> = self.allow.iter().map(ToString::to_string).collect();
        format!(
            "imds={} allow={} unclassified={:?}",
            self.mode.label(),
            allow.join(","),
            self.unclassified
        )
    }
}

/// A decision as audit events and metrics say it.
pub fn decision_label(decision: u32) -> &'static str {
    match decision {
        IMDS_ALLOW => "allow",
        IMDS_DENY => "deny",
        _ => "audit-only",
    }
}

/// A reason as audit events say it.
pub fn reason_label(reason: u32) -> &'static str {
    match reason {
        IMDS_REASON_NODE => "node-process",
        IMDS_REASON_UNCLASSIFIED => "unclassified",
        IMDS_REASON_NAMESPACE => "namespace-allowed",
        IMDS_REASON_POD => "pod-allowed",
        _ => "not-allowed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (mode, --imds-unclassified, (namespace, pod) or None for a pod not
    /// classified yet, decision, reason).
    type Row = (
        ImdsMode,
        Option<Unclassified>,
        Option<(&'static str, &'static str)>,
        u32,
        u32,
    );

    fn rules(raw: &[&str]) -> Vec<AllowRule> {
        raw.iter().map(|r| AllowRule::parse(r).unwrap()).collect()
    }

    #[test]
    fn allow_rules_parse_or_are_refused() {
        let cases = [
            ("kube-system", Some(("kube-system", None))),
            (
                " kube-system/aws-node ",
                Some(("kube-system", Some("aws-node"))),
            ),
            ("Kube-System", None),
            ("", None),
            ("kube-system/", None),
            ("kube-system/a/b", None),
            ("/aws-node", None),
            ("-ns", None),
        ];
        for (raw, expected) in cases {
            let got = AllowRule::parse(raw).ok();
            let expected = expected.map(|(ns, prefix): (&str, Option<&str>)| AllowRule {
                namespace: ns.into(),
                prefix: prefix.map(Into::into),
            });
            assert_eq!(got, expected, "{raw:?}");
        }
    }

    #[test]
    fn verdicts_follow_the_table() {
        use ImdsMode::{Audit, Enforce};
        let allow = rules(&["kube-system/aws-node", "monitoring"]);
        // (mode, unclassified flag, namespace, pod) → (decision, reason);
        // namespace None: a pod not classified yet.
        let cases: [Row; 10] = [
            (
                Enforce,
                None,
                Some(("kube-system", "aws-node-x2x")),
                IMDS_ALLOW,
                IMDS_REASON_POD,
            ),
            (
                Enforce,
                None,
                Some(("kube-system", "coredns-1")),
                IMDS_DENY,
                IMDS_REASON_NOT_ALLOWED,
            ),
            (
                Enforce,
                None,
                Some(("monitoring", "any")),
                IMDS_ALLOW,
                IMDS_REASON_NAMESPACE,
            ),
            (
                Enforce,
                None,
                Some(("default", "aws-node")),
                IMDS_DENY,
                IMDS_REASON_NOT_ALLOWED,
            ),
            (
                Audit,
                None,
                Some(("default", "app")),
                IMDS_AUDIT_ONLY,
                IMDS_REASON_NOT_ALLOWED,
            ),
            (
                Audit,
                None,
                Some(("monitoring", "x")),
                IMDS_ALLOW,
                IMDS_REASON_NAMESPACE,
            ),
            (Enforce, None, None, IMDS_DENY, IMDS_REASON_UNCLASSIFIED),
            (Audit, None, None, IMDS_ALLOW, IMDS_REASON_UNCLASSIFIED),
            (
                Enforce,
                Some(Unclassified::Allow),
                None,
                IMDS_ALLOW,
                IMDS_REASON_UNCLASSIFIED,
            ),
            (
                Audit,
                Some(Unclassified::Deny),
                None,
                IMDS_AUDIT_ONLY,
                IMDS_REASON_UNCLASSIFIED,
            ),
        ];
        for (mode, unclassified, pod, decision, reason) in cases {
            let policy = ImdsPolicy::new(mode, allow.clone(), unclassified);
            let got = match pod {
                Some((ns, name)) => policy.pod(ns, name),
                None => policy.unclassified(),
            };
            assert_eq!(
                got,
                ImdsVerdict { decision, reason },
                "{mode:?} {unclassified:?} {pod:?}"
            );
        }
    }
}
