//! Caller verification end to end: the real agent binary with its kernel
//! programs attached to this test's cgroup subtree, pods laid out as kubelet
//! does (A: systemd driver, own network namespace over veth; B: cgroupfs
//! driver, hostNetwork), the real SDK container provider in each pod, the
//! fake EKS Auth upstream.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use harness::{
    cgroups::remove_tree,
    cluster::{UNLIMITED, Who},
    netns::Netns,
    served::Served,
    tokens::TokenSpec,
    topology::{AGENT_V4, AGENT_V6, V4_URI},
    wait::wait_for,
};
use serde_json::Value;

const NODE: &str = "node-1";
const V6_URI: &str = "http://[fd00:ec2::23]/v1/credentials";

fn env(mode: &str, extra: &[&str]) -> Result<Served> {
    Served::start(NODE, mode, extra)
}

fn statuses(child: std::process::Child) -> Result<Value> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("http-get output")
}

#[test]
fn each_pod_gets_its_own_credentials_over_both_families_with_a_full_audit_trail() -> Result<()> {
    harness::require_privilege!();
    let env = env("enforce", &[])?;
    for (who, role) in [(Who::A, "role-a"), (Who::B, "role-b")] {
        for uri in [V4_URI, V6_URI] {
            let creds = env.sdk_ok(who, uri, &env.own_token(who)?)?;
            let pid = creds["pid"].as_u64().context("pid")?;
            let event = env.last_audit()?;
            let pod = env.pod(who);
            assert_eq!(event["decision"], "allow", "{event}");
            assert_eq!(event["reason"], "ok");
            assert_eq!(event["mode"], "enforce");
            assert_eq!(event["pod_uid"], pod.uid.as_str());
            assert_eq!(event["container_id"], pod.container_id.as_str());
            assert_eq!(event["namespace"], "default");
            assert!(
                event["service_account"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("app-"))
            );
            assert!(
                event["pod_name"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("pod-"))
            );
            assert_eq!(event["pid"].as_u64(), Some(pid), "{event}");
            assert_eq!(event["process"], "pod-client");
            let cgroup = match who {
                Who::A => &env.cg_a,
                Who::B => &env.cg_b,
            };
            assert_eq!(
                event["cgroup_id"].as_u64(),
                Some(harness_cgroup_id(cgroup)?)
            );
            assert!(
                event["role_arn"].as_str().is_some_and(|r| r.contains(role)),
                "{event}"
            );
            assert!(
                event["association_id"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("a-"))
            );
            assert!(
                event["cache"].is_string()
                    && event["latency_ms"].is_number()
                    && event["peer"].is_string()
            );
        }
    }
    assert_eq!(
        env.fake.last_node_name().as_deref(),
        Some(NODE),
        "eksNodeName not sent"
    );
    // Never a token or a secret in the audit trail.
    let trail = env.audit_trail()?;
    assert!(
        !trail.contains("eyJ") && !trail.contains("secret-") && !trail.contains("session-token-")
    );
    Ok(())
}

fn harness_cgroup_id(path: &Path) -> Result<u64> {
    Ok(agent::caller::cgroup::CgroupResolver::id_of(path)?)
}

#[test]
fn a_replayed_token_is_refused_in_enforce_and_flagged_in_audit() -> Result<()> {
    harness::require_privilege!();
    for (mode, served, decision) in [("enforce", false, "deny"), ("audit", true, "audit-only")] {
        let env = env(mode, &[])?;
        let stolen = env.own_token(Who::A)?;
        let out = env.sdk(Who::B, V4_URI, &stolen)?;
        assert_eq!(
            out.status.success(),
            served,
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let event = env.last_audit()?;
        assert_eq!(event["decision"], decision, "{mode}: {event}");
        assert_eq!(event["reason"], "pod-mismatch", "{mode}");
        assert_eq!(
            event["pod_uid"],
            env.pod_b.uid.as_str(),
            "{mode}: the event names the caller"
        );
        if !served {
            assert_eq!(event["status"], 403);
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("pod check failed")
                    || event["status"] == 403
            );
        }
        let metrics = env.metrics()?;
        assert!(
            metrics.contains(&format!(r#"pod_identity_caller_decisions_total{{reason="pod-mismatch",result="{decision}"}} 1"#)),
            "{metrics}"
        );
    }
    Ok(())
}

#[test]
fn node_processes_unbound_tokens_other_subjects_and_other_nodes_are_refused() -> Result<()> {
    harness::require_privilege!();
    let env = env("enforce", &[])?;
    let node_service = env.tree.create("system.slice/node-agent.service")?;
    let unbound = env
        .issuer
        .mint(&TokenSpec::new("default", "app-a").node(NODE))?;
    let other_node = env.issuer.mint(&env.own_spec(Who::A).node("node-2"))?;
    // (what, cgroup, netns, token, EKS Auth subject override, reason)
    type Case<'a> = (
        &'a str,
        &'a Path,
        &'a Netns,
        String,
        Option<(&'a str, &'a str)>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "node process",
            &node_service,
            &env.node.netns,
            env.own_token(Who::A)?,
            None,
            "caller-not-a-pod",
        ),
        (
            "token without pod binding",
            &env.cg_a,
            &env.net_a.netns,
            unbound,
            None,
            "token-not-pod-bound",
        ),
        (
            "EKS Auth answers another subject",
            &env.cg_a,
            &env.net_a.netns,
            env.own_token(Who::A)?,
            Some(("default", "admin")),
            "upstream-subject-mismatch",
        ),
        (
            "another node's token",
            &env.cg_a,
            &env.net_a.netns,
            other_node,
            None,
            "node-mismatch",
        ),
    ];
    for (what, cgroup, netns, token, subject, reason) in cases {
        env.fake
            .set(|k| k.subject_override = subject.map(|(n, s)| (n.to_owned(), s.to_owned())));
        let out = env.sdk_in(cgroup, netns, V4_URI, &token)?;
        assert!(!out.status.success(), "{what}: served");
        let event = env.last_audit()?;
        assert_eq!(
            (event["decision"].as_str(), event["reason"].as_str()),
            (Some("deny"), Some(reason)),
            "{what}: {event}"
        );
        assert_eq!(event["status"], 403, "{what}");
    }
    Ok(())
}

/// A token with `token`'s header and claims and a signature of its own
/// choosing: `alg: none` with no signature, or a tampered signature.
fn forge(token: &str, how: &str) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let mut parts = token.splitn(3, '.');
    let (_, claims, sig) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match how {
        "alg-none" => format!(
            "{}.{claims}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
        ),
        _ => {
            let header = token.split('.').next().unwrap_or_default();
            let flipped: String = sig.chars().rev().collect();
            format!("{header}.{claims}.{flipped}")
        }
    }
}

#[test]
fn only_tokens_eks_auth_accepted_are_served_from_cache() -> Result<()> {
    harness::require_privilege!();
    let env = env("enforce", &[])?;
    let genuine = env.own_token(Who::A)?;
    let first = env.sdk_ok(Who::A, V4_URI, &genuine)?;
    let calls = env.fake.calls();
    env.sdk_ok(Who::A, V6_URI, &genuine)?;
    assert_eq!(
        env.fake.calls(),
        calls,
        "the accepted token went upstream again"
    );
    assert_eq!(env.last_audit()?["cache"], "hit");
    // The caller's own claims under no signature, a broken one, or another
    // issuer's key: EKS Auth is asked every time, and refuses.
    let other_issuer = harness::tokens::Issuer::generate()?;
    let forgeries = [
        ("alg none", forge(&genuine, "alg-none")),
        ("bad signature", forge(&genuine, "tampered")),
        (
            "re-signed by another key",
            other_issuer.mint(&env.own_spec(Who::A))?,
        ),
    ];
    for (what, forged) in forgeries {
        let before = env.fake.calls();
        let out = env.sdk(Who::A, V4_URI, &forged)?;
        assert!(!out.status.success(), "{what}: served");
        assert_eq!(
            env.fake.calls(),
            before + 1,
            "{what}: EKS Auth was not asked"
        );
        let event = env.last_audit()?;
        assert_ne!(event["cache"], "hit", "{what}: {event}");
        assert_eq!(event["status"], 400, "{what}: {event}");
    }
    // The genuine entry is untouched by the refused forgeries.
    let again = env.sdk_ok(Who::A, V4_URI, &genuine)?;
    assert_eq!(again["access_key_id"], first["access_key_id"]);
    assert_eq!(env.last_audit()?["cache"], "hit");
    // The kubelet's next token (new jti, new times, same pod) is new to the
    // agent: one EKS Auth call, then it is the entry's token.
    let rotated = env.own_token(Who::A)?;
    let before = env.fake.calls();
    env.sdk_ok(Who::A, V6_URI, &rotated)?;
    env.sdk_ok(Who::A, V4_URI, &rotated)?;
    assert_eq!(
        env.fake.calls(),
        before + 1,
        "the rotated token's entry was not reused"
    );
    assert_eq!(env.last_audit()?["cache"], "hit");
    // Another pod's identity never reads A's entry.
    let b = env.sdk_ok(Who::B, V4_URI, &env.own_token(Who::B)?)?;
    assert_ne!(b["access_key_id"], first["access_key_id"]);
    Ok(())
}

#[test]
fn a_removed_pod_is_evicted_and_the_others_are_renewed_as_they_ask() -> Result<()> {
    harness::require_privilege!();
    let env = env(
        "enforce",
        &[
            "--max-credential-retention-before-renewal",
            "1s",
            "--max-service-qps",
            "20",
            "--pod-gc-interval",
            "200ms",
        ],
    )?;
    env.fake
        .set(|k| k.credential_lifetime = Duration::from_secs(600));
    env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    let b_token = env.own_token(Who::B)?;
    env.sdk_ok(Who::B, V4_URI, &b_token)?;
    wait_for("both cached", Duration::from_secs(60), || {
        Ok(env.metrics()?.contains("pod_identity_cache_entries 2\n"))
    })?;
    // Pod A goes away: kubelet removes its cgroups.
    let pod_dir = env.cg_a.parent().context("pod cgroup")?.to_owned();
    remove_tree(&pod_dir)?;
    wait_for("A's entry to be evicted", Duration::from_secs(60), || {
        Ok(env.metrics()?.contains("pod_identity_cache_entries 1\n"))
    })?;
    // B, asking again after its retention, is renewed; A never again.
    wait_for("B's renewal", Duration::from_secs(60), || {
        env.sdk_ok(Who::B, V4_URI, &b_token)?;
        Ok(env.fake.issued_for("default", "app-b") >= 2)
    })?;
    assert_eq!(env.fake.issued_for("default", "app-a"), 1);
    Ok(())
}

#[test]
fn a_thousand_legitimate_requests_over_both_pods_and_families_are_never_refused() -> Result<()> {
    harness::require_privilege!();
    // No rate limit either: the node-wide one (the reference's 1000/s)
    // would rightly refuse a burst this size; this is about the caller
    // checks.
    let env = env("enforce", &UNLIMITED)?;
    let v4: SocketAddr = (AGENT_V4, 80).into();
    let v6: SocketAddr = (AGENT_V6, 80).into();
    let mut clients = Vec::new();
    for who in [Who::A, Who::B] {
        for addr in [v4, v6] {
            clients.push(env.burst(who, addr, &env.own_token(who)?, 250)?);
        }
    }
    let mut ok = 0;
    for client in clients {
        let counts = statuses(client)?;
        let served = counts["200"].as_u64().unwrap_or(0);
        assert_eq!(served, 250, "refusals: {counts}");
        ok += served;
    }
    assert_eq!(ok, 1000);
    let metrics = env.metrics()?;
    assert!(!metrics.contains(r#"result="deny""#), "{metrics}");
    Ok(())
}

#[test]
fn the_rate_limit_answers_429_to_the_noisy_pod_only() -> Result<()> {
    harness::require_privilege!();
    let env = env(
        "enforce",
        &["--pod-rate-limit", "2", "--pod-rate-burst", "5"],
    )?;
    let v4: SocketAddr = (AGENT_V4, 80).into();
    let noisy = statuses(env.burst(Who::A, v4, &env.own_token(Who::A)?, 40)?)?;
    assert!(
        noisy["429"].as_u64().unwrap_or(0) >= 20,
        "noisy pod: {noisy}"
    );
    let quiet = statuses(env.burst(Who::B, v4, &env.own_token(Who::B)?, 3)?)?;
    assert_eq!(quiet["200"].as_u64(), Some(3), "quiet pod: {quiet}");
    Ok(())
}
