//! The IMDS guard end to end: the real agent with its kernel programs
//! attached to this test's cgroup subtree, a fake instance metadata service
//! on 169.254.169.254:80 and [fd00:ec2::254]:80 in the node's namespace,
//! pods laid out as kubelet lays them out (cgroup, then log directory),
//! each connecting from its own cgroup: pod A in its own network namespace,
//! pod B hostNetwork (the case the IMDSv2 hop limit cannot stop).

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use harness::{
    agent_proc::{AgentProcess, get_local},
    cgroups::{Driver, PodSpec},
    cluster::{Cluster, UNLIMITED, Who, metric_value},
    imds::{IMDS_V4, IMDS_V4_MAPPED, IMDS_V6, PodLogs, start_fake_imds},
    netns::Netns,
    served::Served,
    topology::V4_URI,
    wait::wait_for,
};
use serde_json::Value;

const NODE: &str = "node-imds";

/// A served cluster with the fake IMDS and kubelet's pod log directory;
/// pods A and B are in namespace `default` (pods `pod-a`, `pod-b`).
struct Guarded {
    served: Served,
    logs: PodLogs,
    /// The agent's arguments, for the agents that follow it.
    args: Vec<String>,
}

impl std::ops::Deref for Guarded {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.served
    }
}

fn guarded(mode: &str, extra: &[&str]) -> Result<Guarded> {
    let cluster = Cluster::new(NODE)?;
    start_fake_imds(&cluster.node.netns)?;
    let logs = PodLogs::new()?;
    logs.add("default", "pod-a", &cluster.pod_a.uid)?;
    logs.add("default", "pod-b", &cluster.pod_b.uid)?;
    let mut args = vec![
        "--imds",
        mode,
        "--imds-allow",
        "kube-system,monitoring/node-exporter",
        "--pod-log-dir",
    ];
    let dir = logs.path().to_string_lossy().into_owned();
    args.push(&dir);
    if !extra.contains(&"--imds-audit-interval") {
        args.extend(["--imds-audit-interval", "1s"]);
    }
    args.extend(UNLIMITED);
    args.extend(extra);
    let args = cluster.agent_args("enforce", &args);
    let agent = AgentProcess::start(&cluster.node.netns, &args)?;
    Ok(Guarded {
        served: Served { agent, cluster },
        logs,
        args,
    })
}

/// `pod-client imds-connect` from `cgroup` in `netns`.
fn imds_connect(
    env: &Served,
    cgroup: &Path,
    netns: &Netns,
    addr: &str,
    count: u32,
) -> Result<Value> {
    harness::imds::connect(env.pod_client(cgroup, netns)?, addr, count)
}

/// The IMDS events in the audit file now.
fn imds_events_now(env: &Served) -> Vec<Value> {
    let trail = std::fs::read_to_string(env.audit_log()).unwrap_or_default();
    harness::imds::events(&trail).collect()
}

/// The IMDS events of process `pid`, once there is one (the agent reads the
/// kernel's events a moment after the connect).
fn imds_events(env: &Served, pid: u64) -> Result<Vec<Value>> {
    let mut recorded = Vec::new();
    let mut events = Vec::new();
    wait_for("an IMDS audit event", Duration::from_secs(30), || {
        recorded = imds_events_now(env);
        events = recorded
            .iter()
            .filter(|e| e["pid"] == pid)
            .cloned()
            .collect();
        Ok(!events.is_empty())
    })
    .with_context(|| format!("pid {pid}; the guard recorded: {recorded:?}"))?;
    Ok(events)
}

/// A series' value in a Prometheus exposition (0 while it has none).
fn metric(exposition: &str, series: &str) -> f64 {
    metric_value(exposition, series).unwrap_or(0.0)
}

/// One caller of the policy test and what it must get.
struct Row<'a> {
    what: &'a str,
    cgroup: &'a Path,
    netns: &'a Netns,
    /// The pod and its namespace; `None`: a node process.
    pod: Option<(&'a PodSpec, &'a str)>,
    /// Whether enforce lets it connect.
    allowed: bool,
    decision: &'a str,
    reason: &'a str,
    host_network: bool,
}

#[test]
fn pods_reach_the_imds_as_the_policy_says_in_either_mode_and_either_network() -> Result<()> {
    harness::require_privilege!();
    for mode in ["enforce", "audit"] {
        // An event per connect: each is checked on its own.
        let env = guarded(mode, &["--imds-audit-interval", "0"])?;
        // A third pod, in an allowed namespace, and a node process.
        let system = PodSpec::new(Driver::Cgroupfs);
        let cg_system = env.tree.pod(&system)?;
        env.logs.add("kube-system", "aws-node-7xk2p", &system.uid)?;
        let cg_node = env.tree.create("system.slice/node-tool.service")?;
        // Classified once its log directory is seen.
        wait_for("the new pod classified", Duration::from_secs(30), || {
            Ok(metric(&env.metrics()?, "pod_identity_imds_classified_pods") >= 3.0)
        })?;
        let refused = if mode == "enforce" {
            "deny"
        } else {
            "audit-only"
        };
        let (cg_a, net_a) = env.placement(Who::A);
        let (cg_b, net_b) = env.placement(Who::B);
        let rows = [
            Row {
                what: "pod A (own netns)",
                cgroup: cg_a,
                netns: net_a,
                pod: Some((env.pod(Who::A), "default")),
                allowed: false,
                decision: refused,
                reason: "not-allowed",
                host_network: false,
            },
            Row {
                what: "pod B (hostNetwork)",
                cgroup: cg_b,
                netns: net_b,
                pod: Some((env.pod(Who::B), "default")),
                allowed: false,
                decision: refused,
                reason: "not-allowed",
                host_network: true,
            },
            Row {
                what: "kube-system pod",
                cgroup: &cg_system,
                netns: net_a,
                pod: Some((&system, "kube-system")),
                allowed: true,
                decision: "allow",
                reason: "namespace-allowed",
                host_network: false,
            },
            Row {
                what: "node process",
                cgroup: &cg_node,
                netns: net_b,
                pod: None,
                allowed: true,
                decision: "allow",
                reason: "node-process",
                host_network: true,
            },
        ];
        for row in rows {
            let Row {
                what,
                allowed,
                decision,
                reason,
                host_network,
                ..
            } = row;
            for addr in [IMDS_V4, IMDS_V6, IMDS_V4_MAPPED] {
                let tally = imds_connect(&env, row.cgroup, row.netns, addr, 1)?;
                let connects = allowed || mode == "audit";
                let expected = if connects { (1, 0) } else { (0, 1) };
                assert_eq!(
                    (tally["connected"].as_u64(), tally["eperm"].as_u64()),
                    (Some(expected.0), Some(expected.1)),
                    "{mode}: {what} to {addr}: {tally}"
                );
                let pid = tally["pid"].as_u64().context("pid")?;
                let events = imds_events(&env, pid)?;
                let [event] = events.as_slice() else {
                    anyhow::bail!("{mode}: {what} to {addr}: one event expected, got {events:?}");
                };
                assert_eq!(event["decision"], decision, "{mode} {what} {event}");
                assert_eq!(event["reason"], reason, "{mode} {what} {event}");
                assert_eq!(event["mode"], mode);
                assert_eq!(event["host_network"], host_network, "{what} {event}");
                assert_eq!(event["process"], "pod-client");
                assert_eq!(event["count"], 1);
                let destination = if addr == IMDS_V6 { IMDS_V6 } else { IMDS_V4 };
                assert_eq!(event["destination"], destination, "{event}");
                match row.pod {
                    Some((spec, namespace)) => {
                        assert_eq!(event["pod_uid"], spec.uid.as_str(), "{event}");
                        assert_eq!(event["container_id"], spec.container_id.as_str());
                        assert_eq!(event["namespace"], namespace);
                        assert!(event["pod_name"].is_string(), "{event}");
                    }
                    None => {
                        assert!(event["pod_uid"].is_null() && event["namespace"].is_null());
                    }
                }
            }
        }
        let metrics = env.metrics()?;
        assert_eq!(
            metric(
                &metrics,
                &format!(
                    "pod_identity_imds_connects_total{{decision=\"{refused}\",namespace=\"default\"}}"
                )
            ),
            6.0,
            "{metrics}"
        );
        assert_eq!(
            metric(
                &metrics,
                "pod_identity_imds_connects_total{decision=\"allow\",namespace=\"_node\"}"
            ),
            3.0
        );
        // Credentials are served as ever.
        env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    }
    Ok(())
}

#[test]
fn a_pod_created_while_the_agent_runs_is_classified_before_its_first_connect() -> Result<()> {
    harness::require_privilege!();
    let env = guarded("enforce", &[])?;
    let (_, net) = env.placement(Who::A);
    let mut wrong = Vec::new();
    let mut pods = Vec::new();
    for i in 0..100 {
        let driver = if i % 2 == 0 {
            Driver::Systemd
        } else {
            Driver::Cgroupfs
        };
        let pod = PodSpec::new(driver);
        // kubelet's order: the pod's cgroup, its log directory, then the
        // container — which connects at once.
        let cgroup = env.tree.pod(&pod)?;
        let allowed = i % 3 != 0;
        let namespace = if allowed { "kube-system" } else { "default" };
        env.logs.add(namespace, &format!("pod-{i}"), &pod.uid)?;
        let tally = imds_connect(&env, &cgroup, net, IMDS_V4, 1)?;
        if tally["connected"] != u32::from(allowed) {
            wrong.push((i, namespace, tally));
        }
        pods.push((pod, cgroup));
    }
    assert!(wrong.is_empty(), "wrong verdicts: {wrong:?}");

    // Pods deleted: their entries leave the kernel's map.
    let verdicts = pinned_verdicts(&env.node.netns)?;
    let ids: Vec<u64> = pods
        .iter()
        .map(|(_, cgroup)| pod_cgroup_id(cgroup))
        .collect::<Result<_>>()?;
    for id in &ids {
        ensure!(
            verdicts.contains(id),
            "pod cgroup {id} has no verdict: {verdicts:?}"
        );
    }
    for (_, cgroup) in &pods {
        std::fs::remove_dir(cgroup)?;
        std::fs::remove_dir(cgroup.parent().context("pod cgroup")?)?;
    }
    wait_for(
        "the deleted pods' entries gone",
        Duration::from_secs(30),
        || {
            let left = pinned_verdicts(&env.node.netns)?;
            Ok(ids.iter().all(|id| !left.contains(id)))
        },
    )?;
    Ok(())
}

/// The keys of the verdict map the node's agent pinned.
fn pinned_verdicts(node: &Netns) -> Result<Vec<u64>> {
    let generation = std::fs::read_dir(node.pin_dir())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join(agent_ebpf::IMDS_VERDICTS_MAP).exists())
        .context("no pinned generation")?;
    let map = aya::maps::MapData::from_pin(generation.join(agent_ebpf::IMDS_VERDICTS_MAP))?;
    let map = aya::maps::Map::from_map_data(map)?;
    let verdicts: aya::maps::HashMap<_, u64, agent_ebpf::ImdsVerdict> =
        aya::maps::HashMap::try_from(map)?;
    Ok(verdicts.keys().filter_map(Result::ok).collect())
}

#[test]
fn a_flood_of_connects_is_counted_aggregated_and_costs_serving_nothing() -> Result<()> {
    harness::require_privilege!();
    const FLOOD: u32 = 100_000;
    let env = guarded("enforce", &[])?;
    let (cg_a, net_a) = env.placement(Who::A);
    let flood = env
        .pod_client(cg_a, net_a)?
        .args(["imds-connect", IMDS_V4, &FLOOD.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    // Credentials while the flood runs.
    for _ in 0..5 {
        env.sdk_ok(Who::B, V4_URI, &env.own_token(Who::B)?)?;
    }
    let tally = harness::pod::finish(flood, "the flood")?;
    assert_eq!(tally["eperm"], FLOOD, "{tally}");
    let pid = tally["pid"].as_u64().context("pid")?;
    // Every connect is accounted for: counted (one by one, or by the kernel
    // in a summary) or lost to a full ring, which is counted too.
    let denied = "pod_identity_imds_connects_total{decision=\"deny\",namespace=\"default\"}";
    let mut seen = (0.0, 0.0);
    wait_for("every connect counted", Duration::from_secs(60), || {
        let metrics = env.metrics()?;
        seen = (
            metric(&metrics, denied),
            metric(&metrics, "pod_identity_imds_events_lost_total"),
        );
        Ok(seen.0 + seen.1 >= f64::from(FLOOD))
    })?;
    assert_eq!(seen.0 + seen.1, f64::from(FLOOD), "{seen:?}");
    // The audit trail holds them in a few lines whose counts add up.
    let mut events = Vec::new();
    wait_for("the summaries written", Duration::from_secs(30), || {
        events = imds_events_now(&env)
            .into_iter()
            .filter(|e| e["pid"] == pid)
            .collect();
        let counted: u64 = events.iter().filter_map(|e| e["count"].as_u64()).sum();
        Ok(counted as f64 == seen.0)
    })?;
    ensure!(
        events.len() < 200,
        "{} audit lines for one looping pod: not aggregated",
        events.len()
    );
    assert!(
        events
            .iter()
            .all(|e| e["decision"] == "deny" && e["pod_uid"] == env.pod(Who::A).uid.as_str())
    );
    // Healthy, and serving.
    assert_eq!(get_local(&env.node.netns, 2703, "/healthz")?.status, 200);
    env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    Ok(())
}

#[test]
fn an_agent_that_adopts_the_programs_brings_their_verdicts_up_to_date() -> Result<()> {
    harness::require_privilege!();
    let mut env = guarded("enforce", &[])?;
    let gone = PodSpec::new(Driver::Cgroupfs);
    let gone_cgroup = env.tree.pod(&gone)?;
    env.logs.add("default", "short-lived", &gone.uid)?;
    let gone_id = pod_cgroup_id(&gone_cgroup)?;
    wait_for("the pod classified", Duration::from_secs(30), || {
        Ok(pinned_verdicts(&env.node.netns)?.contains(&gone_id))
    })?;
    // The agent dies (its programs stay pinned, attached, deciding); while
    // none runs, one pod goes and another comes.
    env.served.agent.kill()?;
    harness::cgroups::remove_tree(gone_cgroup.parent().context("pod cgroup")?)?;
    let new = PodSpec::new(Driver::Systemd);
    let new_cgroup = env.tree.pod(&new)?;
    env.logs.add("kube-system", "aws-node-q8z", &new.uid)?;
    let new_id = pod_cgroup_id(&new_cgroup)?;
    // The next agent adopts the programs and brings their map up to date.
    env.served.agent = AgentProcess::start(&env.node.netns, &env.args)?;
    ensure!(
        env.agent.logs().contains("kernel programs adopted"),
        "{}",
        env.agent.logs()
    );
    wait_for("the map up to date", Duration::from_secs(30), || {
        let verdicts = pinned_verdicts(&env.node.netns)?;
        Ok(verdicts.contains(&new_id) && !verdicts.contains(&gone_id))
    })?;
    let (_, net) = env.placement(Who::A);
    let tally = imds_connect(&env, &new_cgroup, net, IMDS_V4, 1)?;
    assert_eq!(
        tally["connected"], 1,
        "the allowed pod started meanwhile: {tally}"
    );
    Ok(())
}

#[test]
fn a_successor_takes_over_reading_events_and_records_each_once() -> Result<()> {
    harness::require_privilege!();
    let mut env = guarded("enforce", &[])?;
    let mut pids = Vec::new();
    let mut connect = |env: &Served| -> Result<()> {
        let (cgroup, net) = env.placement(Who::A);
        let tally = imds_connect(env, cgroup, net, IMDS_V4, 1)?;
        ensure!(tally["eperm"] == 1, "{tally}");
        pids.push(tally["pid"].as_u64().context("pid")?);
        Ok(())
    };
    connect(&env)?;
    // A surge update: the successor shares the programs and their event
    // ring; both agents run a while. Pod B connects in a loop all through
    // the handover: its connects are mostly counted by the kernel, and
    // reported by whichever agent reads.
    const LOOP: u64 = 400_000;
    let mut successor = AgentProcess::spawn(&env.node.netns, &env.args, None)?;
    let (cg_b, net_b) = env.placement(Who::B);
    let mut looping = env
        .pod_client(cg_b, net_b)?
        .args(["imds-connect", IMDS_V4, &LOOP.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    successor.wait_for_log(
        "took over from the agent serving on this node",
        Duration::from_secs(60),
    )?;
    ensure!(
        looping.try_wait()?.is_none(),
        "pod B's loop ended before the handover: make it longer"
    );
    let looped = harness::pod::finish(looping, "pod B's loop")?;
    ensure!(looped["eperm"] == LOOP, "{looped}");
    for _ in 0..5 {
        connect(&env)?;
    }
    let mut predecessor = std::mem::replace(&mut env.served.agent, successor);
    predecessor.terminate(Duration::from_secs(30))?;
    for _ in 0..3 {
        connect(&env)?;
    }
    env.served.agent.terminate(Duration::from_secs(30))?;
    // Both have written out what they recorded: each connect once, in an
    // event of its own or in a summary's count.
    let trail = std::fs::read_to_string(env.audit_log())?;
    let recorded = |who: Who| -> u64 {
        harness::imds::events(&trail)
            .filter(|e| e["pod_uid"] == env.pod(who).uid.as_str())
            .filter_map(|e| e["count"].as_u64())
            .sum()
    };
    assert_eq!(recorded(Who::B), LOOP, "pod B's loop recorded exactly once");
    assert_eq!(
        recorded(Who::A),
        pids.len() as u64,
        "each connect recorded exactly once:\n{trail}"
    );
    Ok(())
}

/// The id of the pod-level cgroup above a container's.
fn pod_cgroup_id(container: &Path) -> Result<u64> {
    Ok(agent::caller::cgroup::CgroupResolver::id_of(
        container.parent().context("pod cgroup")?,
    )?)
}

#[test]
fn without_the_kernel_programs_enforce_refuses_to_start_and_audit_says_so() -> Result<()> {
    harness::require_privilege!();
    let cluster = Cluster::new(NODE)?;
    // Enforce asked for what cannot run: the agent stops, naming why.
    let args = cluster.agent_args("off", &["--imds", "enforce"]);
    let mut agent = AgentProcess::spawn(&cluster.node.netns, &args, None)?;
    let status = agent.wait_exit(Duration::from_secs(60))?;
    let logs = agent.logs();
    ensure!(
        !status.success(),
        "ran with --imds enforce and no programs:\n{logs}"
    );
    ensure!(
        logs.contains("--imds enforce needs the kernel programs"),
        "the error does not say why:\n{logs}"
    );
    drop(agent);
    // Audit (the default) serves on, and says loudly that nothing is seen.
    let args = cluster.agent_args("off", &[]);
    let mut agent = AgentProcess::start(&cluster.node.netns, &args)?;
    agent.wait_for_log("IMDS GUARD IS OFF", Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn a_cgroup_named_like_an_allowed_pod_inside_a_denied_one_gets_the_denied_pods_verdict()
-> Result<()> {
    harness::require_privilege!();
    // An event per connect: each impostor's is checked.
    let env = guarded("enforce", &["--imds-audit-interval", "0"])?;
    let allowed = PodSpec::new(Driver::Cgroupfs);
    let allowed_cgroup = env.tree.pod(&allowed)?;
    env.logs.add("kube-system", "aws-node-n5c", &allowed.uid)?;
    let (cg_a, net_a) = env.placement(Who::A);
    // What a process that may create cgroups in its own container names
    // them: the allowed pod's cgroup (both drivers' spellings) and its
    // container, below pod A's container.
    let mut impostors = Vec::new();
    for name in [
        format!("pod{}/{}", allowed.uid, allowed.container_id),
        format!(
            "kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
            allowed.uid.replace('-', "_"),
            allowed.container_id
        ),
    ] {
        let dir = cg_a.join(name);
        std::fs::create_dir_all(&dir)?;
        impostors.push(dir);
    }
    wait_for(
        "the allowed pod classified",
        Duration::from_secs(30),
        || Ok(imds_connect(&env, &allowed_cgroup, net_a, IMDS_V4, 1)?["connected"] == 1),
    )?;
    for dir in &impostors {
        let tally = imds_connect(&env, dir, net_a, IMDS_V4, 1)?;
        assert_eq!(tally["eperm"], 1, "{}: {tally}", dir.display());
        let pid = tally["pid"].as_u64().context("pid")?;
        let events = imds_events(&env, pid)?;
        assert!(
            events.iter().all(|e| e["decision"] == "deny"
                && e["reason"] == "not-allowed"
                && e["namespace"] == "default"),
            "{events:?}"
        );
    }
    for dir in impostors.iter().rev() {
        std::fs::remove_dir(dir)?;
        let _ = std::fs::remove_dir(dir.parent().context("parent")?);
    }
    Ok(())
}

#[test]
fn a_pods_process_that_is_not_root_gets_its_pods_verdict() -> Result<()> {
    harness::require_privilege!();
    // An event per connect: each is checked.
    let env = guarded("enforce", &["--imds-audit-interval", "0"])?;
    let nobody = harness::privilege::NOBODY.to_string();
    for who in [Who::A, Who::B] {
        let (cgroup, netns) = env.placement(who);
        let mut client = env.pod_client(cgroup, netns)?;
        client.args(["as-uid", &nobody]);
        let tally = harness::imds::connect(client, IMDS_V4, 1)?;
        assert_eq!(tally["eperm"], 1, "{who:?}: {tally}");
        let pid = tally["pid"].as_u64().context("pid")?;
        let events = imds_events(&env, pid)?;
        assert!(
            events.iter().all(|e| e["decision"] == "deny"
                && e["reason"] == "not-allowed"
                && e["pod_uid"] == env.pod(who).uid.as_str()),
            "{who:?}: {events:?}"
        );
    }
    Ok(())
}
