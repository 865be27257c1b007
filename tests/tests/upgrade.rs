//! Upgrades and crashes, with the real agent binary, the real SDK in pods
//! and the real kernel: a new agent takes the listening sockets and the
//! pinned kernel programs from the one serving, so an upgrade fails no
//! request and refuses no one; a killed agent's successor adopts the
//! programs, so only the seconds without a listener are lost.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use harness::{
    agent_bin::built_binary,
    agent_proc::AgentProcess,
    caps::restrict_to,
    cluster::{UNLIMITED, Who},
    netns::Netns,
    pod::{finish, first_line, sdk_env},
    privilege::NOBODY,
    served::Served,
    tempdir::TempDir,
    topology::{AGENT_V4, V4_URI},
    wait::wait_for,
};
use serde_json::Value;

const NODE: &str = "node-up";
/// Every pod fetches as fast as it can: no rate limit may answer 429. A
/// stopped agent serves until a successor takes over (up to 20 s).
fn args() -> Vec<&'static str> {
    [&UNLIMITED[..], &["--successor-wait=20s"]].concat()
}

/// The real SDK fetching credentials for `seconds` from `who`'s pod
/// (`fresh`: a new connection per fetch; `shared`: one kept alive).
fn sdk_load(env: &Served, who: Who, seconds: u32, mode: &str) -> Result<Child> {
    let (cgroup, netns) = env.placement(who);
    let file = env.token_file(&env.own_token(who)?)?;
    let mut cmd = env.pod_client(cgroup, netns)?;
    sdk_env(&mut cmd, V4_URI, &file)
        .args(["sdk-load", &seconds.to_string(), mode])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn pod-client sdk-load")
}

/// Credential requests `agent` has audited (its own log, one line each).
fn served_by(agent: &AgentProcess) -> usize {
    agent
        .logs()
        .lines()
        .filter(|l| l.contains("credential request"))
        .count()
}

/// Waits until `agent` has audited one more credential request than now.
fn serves_more(agent: &AgentProcess, what: &str) -> Result<()> {
    let before = served_by(agent);
    wait_for(what, Duration::from_secs(30), || {
        Ok(served_by(agent) > before)
    })
}

/// The loads every test here runs: pods A (own netns) and B (hostNetwork),
/// each with a new connection per fetch and with one kept alive.
fn loads(env: &Served, seconds: u32) -> Result<Vec<(String, Child)>> {
    let mut loads = Vec::new();
    for who in [Who::A, Who::B] {
        for mode in ["fresh", "shared"] {
            loads.push((
                format!("{who:?} {mode}"),
                sdk_load(env, who, seconds, mode)?,
            ));
        }
    }
    Ok(loads)
}

/// Whether a load may count failed fetches (connection refused while no
/// agent listens, after the SDK's retries).
#[derive(PartialEq)]
enum Failures {
    None,
    Allowed,
}

/// Every load got credentials and nothing but 200 (no refusal, no retry
/// answer); with `Failures::None`, no fetch failed either.
fn served(loads: Vec<(String, Child)>, across: &str, failures: Failures) -> Result<()> {
    for (what, child) in loads {
        let tally = finish(child, &what)?;
        let statuses = tally["statuses"].as_object().context("statuses")?;
        ensure!(
            statuses.keys().all(|s| s == "200") && statuses.contains_key("200"),
            "{what} across {across}: {tally}"
        );
        ensure!(
            failures == Failures::Allowed
                || tally["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{what} failed requests across {across}: {tally}"
        );
        eprintln!("{what} across {across}: {tally}");
    }
    Ok(())
}

fn still_running(loads: &mut [(String, Child)]) -> Result<()> {
    for (what, child) in loads {
        ensure!(
            child.try_wait()?.is_none(),
            "load {what} ended before the last agent change: lengthen it"
        );
    }
    Ok(())
}

/// `pod-client squat` as root in `cgroup` on the node: every way to bind
/// the served address and port, and what each got.
fn squat(env: &Served, cgroup: &Path, netns: &Netns) -> Result<Value> {
    let target = SocketAddr::from((AGENT_V4, 80)).to_string();
    let out = env
        .pod_client(cgroup, netns)?
        .args(["squat", &target])
        .output()?;
    ensure!(
        out.status.success(),
        "squat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn five_handovers_under_sdk_load_fail_no_request_and_refuse_no_one() -> Result<()> {
    harness::require_privilege!();
    let mut env = Served::start(NODE, "enforce", &args())?;
    let intruder = env.tree.create("system.slice/squatter.service")?;
    let mut loads = loads(&env, 40)?;
    let mut handovers = Vec::new();
    for round in 0..5 {
        serves_more(&env.agent, "the serving agent to serve")?;
        // Odd rounds: the kubelet stops the serving agent before the new
        // one has connected (it does not wait for one); the old one serves
        // on until its successor takes over.
        let stopped_first = round % 2 == 1;
        if stopped_first {
            env.agent.sigterm();
            env.agent.wait_for_log(
                "serving until a successor takes over",
                Duration::from_secs(30),
            )?;
        }
        let started = Instant::now();
        let args = env.agent_args("enforce", &args());
        // Its readiness probe would be answered by the serving agent too:
        // it is ready when it says it took over.
        let mut successor = AgentProcess::spawn(&env.node.netns, &args, None)?;
        successor.wait_for_log(
            "took over from the agent serving on this node",
            Duration::from_secs(60),
        )?;
        let ready = started.elapsed();
        ensure!(
            successor.logs().contains("kernel programs adopted"),
            "round {round}: the successor did not adopt the programs:\n{}",
            successor.logs()
        );
        // Both agents run: nobody else can bind the port, either way.
        let squatted = squat(&env, &intruder, &env.node.netns)?;
        for (attempt, outcome) in squatted.as_object().context("squat output")? {
            ensure!(
                outcome != "bound",
                "round {round}: a root process bound {attempt}: {squatted}"
            );
        }
        let mut predecessor = std::mem::replace(&mut env.agent, successor);
        if stopped_first {
            predecessor.wait_exit(Duration::from_secs(30))?;
        } else {
            predecessor.terminate(Duration::from_secs(30))?;
        }
        // The programs it shares with its successor stay: the successor
        // holds them.
        ensure!(
            !predecessor.logs().contains("kernel programs unpinned"),
            "round {round}: the predecessor unpinned programs in use:\n{}",
            predecessor.logs()
        );
        serves_more(&env.agent, "the successor to serve")?;
        handovers.push(ready);
    }
    still_running(&mut loads)?;
    served(loads, "handovers", Failures::None)?;
    let refused = env.refused()?;
    ensure!(refused.is_empty(), "refused across handovers: {refused:?}");
    let squatted = squat(&env, &intruder, &env.node.netns)?;
    for (attempt, outcome) in squatted.as_object().context("squat output")? {
        ensure!(
            outcome != "bound",
            "after the handovers, a root process bound {attempt}: {squatted}"
        );
    }
    eprintln!("successor start → ready, per handover: {handovers:?}");
    Ok(())
}

#[test]
fn an_upgrade_across_a_kernel_abi_change_refuses_no_one() -> Result<()> {
    harness::require_privilege!();
    // Built by `cargo xtask test`: the agent with another map layout.
    let variant = built_binary("eks-pod-identity-agent-abi-variant")?;
    let default = harness::agent_bin::agent_binary()?;
    let mut env = Served::start(NODE, "enforce", &args())?;
    let mut loads = loads(&env, 30)?;
    // There and back: default → variant → default, each a new generation.
    for (round, binary) in [&variant, &default].into_iter().enumerate() {
        serves_more(&env.agent, "the serving agent to serve")?;
        let args = env.agent_args("enforce", &args());
        let mut successor = AgentProcess::spawn_binary(binary, &env.node.netns, &args, None, &[])?;
        successor.wait_for_log(
            "took over from the agent serving on this node",
            Duration::from_secs(60),
        )?;
        ensure!(
            successor
                .logs()
                .contains("kernel programs loaded and pinned"),
            "round {round}: another ABI must load its own programs:\n{}",
            successor.logs()
        );
        let mut predecessor = std::mem::replace(&mut env.agent, successor);
        // Its programs stop recording new connections once the successor's
        // serve, and go when it exits: nobody else holds them.
        predecessor.wait_for_log("kernel programs switched", Duration::from_secs(30))?;
        predecessor.terminate(Duration::from_secs(30))?;
        let logs = predecessor.logs();
        ensure!(
            logs.contains("kernel programs unpinned"),
            "round {round}: the predecessor's programs stayed:\n{logs}"
        );
        serves_more(&env.agent, "the successor to serve")?;
    }
    still_running(&mut loads)?;
    let refused = env.refused()?;
    ensure!(
        refused.is_empty(),
        "refused across the ABI change: {refused:?}"
    );
    let generations: Vec<_> = std::fs::read_dir(env.node.netns.pin_dir())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(
        generations.len() == 1,
        "one generation pinned at the end, not {generations:?}"
    );

    served(loads, "the ABI change", Failures::None)?;
    Ok(())
}

#[test]
fn a_killed_agent_is_replaced_and_pods_recover_by_themselves() -> Result<()> {
    harness::require_privilege!();
    let mut env = Served::start(NODE, "enforce", &args())?;
    let mut loads = loads(&env, 40)?;
    let target = SocketAddr::from((AGENT_V4, 80)).to_string();
    let token = env.token_file(&env.own_token(Who::A)?)?;
    let mut windows = Vec::new();
    for round in 0..5 {
        serves_more(&env.agent, "the agent to serve")?;
        // Pod A's view: from its first failed request to its next served.
        let (cgroup, netns) = env.placement(Who::A);
        let mut watcher = env
            .pod_client(cgroup, netns)?
            .args(["outage", &target, &token.to_string_lossy(), "60"])
            .stdout(Stdio::piped())
            .spawn()?;
        let first = first_line(&mut watcher, "outage watcher")?;
        ensure!(first == "served", "outage watcher: {first:?}");
        env.agent.kill()?;
        // What the kubelet does: start the container again at once.
        let args = env.agent_args("enforce", &args());
        env.agent = AgentProcess::spawn(&env.node.netns, &args, None)?;
        let seen = finish(watcher, "outage watcher")?;
        let outage = seen["outage_ms"].as_f64().context("no outage seen")?;
        windows.push(Duration::from_secs_f64(outage / 1000.0));
        env.agent
            .wait_for_log("kernel programs adopted", Duration::from_secs(30))
            .with_context(|| {
                format!("round {round}: the restarted agent did not adopt the programs")
            })?;
    }
    still_running(&mut loads)?;
    // The SDK's own retries ride out part of each window; what they cannot
    // is counted (and printed), never a refusal.
    served(loads, "5 crashes", Failures::Allowed)?;
    let refused = env.refused()?;
    ensure!(refused.is_empty(), "refused across crashes: {refused:?}");
    windows.sort();
    eprintln!(
        "crash window (SIGKILL → served again), median of 5: {:?} (all: {windows:?})",
        windows[2]
    );
    Ok(())
}

#[test]
fn the_handover_socket_trusts_no_root_process_without_the_agents_key() -> Result<()> {
    harness::require_privilege!();
    let mut env = Served::start(NODE, "enforce", &args())?;
    let intruder = env.tree.create("system.slice/impostor.service")?;
    let socket = env.node.netns.handover_socket();
    // Root, knowing the protocol, asks the serving agent for its listeners.
    let taken = finish(impostor(&env, &intruder, None, &["take"])?, "impostor take")?;
    ensure!(
        taken["descriptors"] == 0,
        "a root process without the key got the listeners: {taken}"
    );
    env.agent
        .wait_for_log("could not prove it holds", Duration::from_secs(30))?;
    pod_a_is_served(&env)?;
    // Root poses as the serving agent for the next agent to start.
    env.agent.kill()?;
    // It names the real generation (its pins outlive the agent), so the
    // new agent checks the proof against the real key, and it fails.
    let generation = std::fs::read_dir(env.node.netns.pin_dir())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.len() == 16)
        .context("no pinned generation")?;
    // The dead agent's socket file stays; the impostor's replaces it.
    std::fs::remove_file(&socket)?;
    let giver = posing_as_the_serving_agent(&env, &intruder, &["give", &generation])?;
    let args = env.agent_args("enforce", &args());
    env.agent = AgentProcess::start(&env.node.netns, &args)?;
    env.agent
        .wait_for_log("could not prove it holds", Duration::from_secs(30))?;
    not_served_by(giver)?;
    pod_a_is_served(&env)?;
    Ok(())
}

/// Pod A's SDK gets credentials from the agent serving now.
fn pod_a_is_served(env: &Served) -> Result<()> {
    let served = env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    ensure!(served["access_key_id"].is_string(), "{served}");
    Ok(())
}

/// `pod-client impostor give …` in `cgroup`, once it listens at the
/// handover socket.
fn posing_as_the_serving_agent(env: &Served, cgroup: &Path, give: &[&str]) -> Result<Child> {
    let giver = impostor(env, cgroup, None, give)?;
    let socket = env.node.netns.handover_socket();
    wait_for("the impostor to listen", Duration::from_secs(30), || {
        Ok(socket.exists())
    })?;
    Ok(giver)
}

/// An impostor posing as the serving agent was not told by the starting
/// agent that it serves on the impostor's sockets.
fn not_served_by(giver: Child) -> Result<()> {
    let given = finish(giver, "impostor give")?;
    let said = given["outcome"].as_str().unwrap_or_default();
    ensure!(
        !said.contains("Serving"),
        "the agent served on an impostor's sockets: {given}"
    );
    Ok(())
}

/// `successor`, handed nothing, waits while the serving agent holds the
/// ports (pod A still served), and serves once it is stopped.
fn serves_once_the_old_agent_is_gone(env: &mut Served, mut successor: AgentProcess) -> Result<()> {
    successor.wait_for_log("held and nothing was handed over", Duration::from_secs(60))?;
    pod_a_is_served(env)?;
    std::mem::replace(&mut env.agent, successor).terminate(Duration::from_secs(30))?;
    env.agent
        .wait_for_log("\"msg\":\"serving\"", Duration::from_secs(60))?;
    Ok(())
}

/// `pod-client impostor ROLE SOCKET ARGS…` (`role_and_args`) as root in
/// `cgroup` on the node, with only `caps` if given.
fn impostor(
    env: &Served,
    cgroup: &Path,
    caps: Option<&[String]>,
    role_and_args: &[&str],
) -> Result<Child> {
    let mut cmd = env.pod_client(cgroup, &env.node.netns)?;
    if let Some(caps) = caps {
        restrict_to(&mut cmd, caps)?;
    }
    let (role, args) = role_and_args.split_first().context("an impostor role")?;
    Ok(cmd
        .args(["impostor", role])
        .arg(env.node.netns.handover_socket())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?)
}

/// Docker's default capability set: what root in an ordinary container
/// holds (given a hostPath to the handover directory, it reaches the socket).
const CONTAINER_DEFAULT: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

#[test]
fn a_root_process_relaying_a_handover_between_two_agents_gets_no_listeners() -> Result<()> {
    harness::require_privilege!();
    let mut env = Served::start(NODE, "enforce", &args())?;
    let intruder = env.tree.create("system.slice/relay.service")?;
    let socket = env.node.netns.handover_socket();
    wait_for("the handover offer", Duration::from_secs(30), || {
        Ok(socket.exists())
    })?;
    // Root in a container's capabilities, with the handover directory.
    let keep: Vec<String> = CONTAINER_DEFAULT.iter().map(|c| c.to_string()).collect();
    let relay = impostor(&env, &intruder, Some(&keep), &["relay"])?;
    let aside = socket.with_extension("real");
    wait_for("the relay in place", Duration::from_secs(30), || {
        Ok(aside.exists() && socket.exists())
    })?;
    let successor =
        AgentProcess::spawn(&env.node.netns, &env.agent_args("enforce", &args()), None)?;
    let relayed = finish(relay, "impostor relay")?;
    ensure!(
        relayed["descriptors"] == 0,
        "the relay kept the listeners: {relayed}"
    );
    // Each agent's proof named the relay's socket, not the other agent's.
    env.agent
        .wait_for_log("could not prove it holds", Duration::from_secs(30))?;
    serves_once_the_old_agent_is_gone(&mut env, successor)?;
    pod_a_is_served(&env)?;
    Ok(())
}

#[test]
fn without_attribution_no_root_process_gets_or_gives_the_listeners() -> Result<()> {
    harness::require_privilege!();
    // No kernel programs, so no key: uid 0 proves nothing (root confined to
    // a container's capabilities, or root of its own user namespace, is
    // uid 0 too), so there is no handover either way.
    let mut env = Served::start(NODE, "off", &args())?;
    let intruder = env.tree.create("system.slice/impostor.service")?;
    let socket = env.node.netns.handover_socket();
    // The offer (or its refusal) comes after readiness.
    let refusal = "cannot offer a handover";
    wait_for(
        "the handover offer's verdict",
        Duration::from_secs(30),
        || Ok(env.agent.logs().contains(refusal) || socket.exists()),
    )?;
    let taken = finish(impostor(&env, &intruder, None, &["take"])?, "impostor take")?;
    ensure!(
        taken["descriptors"] == 0,
        "a root process got the listeners of an agent without attribution: {taken}"
    );
    ensure!(env.agent.logs().contains(refusal), "{}", env.agent.logs());
    // Root poses as a serving agent without attribution for the next one
    // (in the hostPath directory, which outlives every agent).
    env.agent.kill()?;
    std::fs::create_dir_all(socket.parent().context("handover directory")?)?;
    let giver = posing_as_the_serving_agent(&env, &intruder, &["give"])?;
    env.agent = AgentProcess::start(&env.node.netns, &env.agent_args("off", &args()))?;
    env.agent.wait_for_log(
        "did not hand over; binding our own listeners",
        Duration::from_secs(30),
    )?;
    not_served_by(giver)?;
    pod_a_is_served(&env)?;
    // Stopped while it waits for the ports (a rollback, a drain): it goes.
    let mut waiting = AgentProcess::spawn(&env.node.netns, &env.agent_args("off", &args()), None)?;
    waiting.wait_for_log("held and nothing was handed over", Duration::from_secs(60))?;
    waiting.sigterm();
    let status = waiting.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "{status}:\n{}", waiting.logs());
    // A surge update without a handover: the new agent waits (it does not
    // exit, or the old pod would never be removed), and binds once the old
    // agent is gone.
    let successor = AgentProcess::spawn(&env.node.netns, &env.agent_args("off", &args()), None)?;
    serves_once_the_old_agent_is_gone(&mut env, successor)?;
    ensure!(
        env.agent.logs().contains("ports were released"),
        "{}",
        env.agent.logs()
    );
    pod_a_is_served(&env)?;
    Ok(())
}

/// How `nobody` prepares the agent's directories before it first starts.
#[derive(Clone, Copy, Debug)]
enum Squat {
    /// Creates the pin and handover directories (bpffs is often 1777).
    BothDirectories,
    /// Plants symlinks of its own where they go, pointing at directories
    /// of root's (which pass any check that follows the link).
    Symlinks,
    /// Creates only the pin directory: the programs stay unpinned, and an
    /// unpinned agent must not offer its listeners (no successor could
    /// prove it is an agent).
    PinDirectory,
}

#[test]
fn a_root_owned_symlink_into_a_users_directory_is_not_trusted() -> Result<()> {
    harness::require_privilege!();
    // `nobody`'s directory on bpffs, reached through a symlink of root's:
    // every name on the given path is root's, but `nobody` can rename or
    // swap what the agent would create inside.
    let cluster = harness::cluster::Cluster::new(NODE)?;
    let bpffs = cluster
        .node
        .netns
        .pin_dir()
        .parent()
        .context("pin parent")?
        .to_owned();
    std::fs::create_dir_all(&bpffs)?;
    let theirs = TempDir::new_in(&bpffs, "nobodys-")?;
    std::os::unix::fs::chown(theirs.path(), Some(NOBODY), Some(NOBODY))?;
    let base = TempDir::new_in(&bpffs, "root-link-")?;
    let link = base.path().join("link");
    std::os::unix::fs::symlink(theirs.path(), &link)?;
    let pin_dir = link.join("pins").to_string_lossy().into_owned();
    let mut extra = args();
    extra.extend(["--bpf-pin-dir", &pin_dir]);
    let mut agent =
        AgentProcess::start(&cluster.node.netns, &cluster.agent_args("enforce", &extra))?;
    agent
        .wait_for_log("KERNEL PROGRAMS NOT PINNED", Duration::from_secs(30))
        .context("the agent pinned inside nobody's directory")?;
    let logs = agent.logs();
    ensure!(
        logs.contains(&format!("owned by uid {NOBODY}")),
        "the refusal does not name the owner:\n{logs}"
    );
    Ok(())
}

#[test]
fn directories_an_unprivileged_user_made_first_are_not_trusted() -> Result<()> {
    harness::require_privilege!();
    // `nobody` gets there before the agent, to unlink its pins later or put
    // its own socket where successors look.
    let cluster = harness::cluster::Cluster::new(NODE)?;
    let netns = &cluster.node.netns;
    let pin_dir = netns.pin_dir();
    let handover_dir = netns.handover_socket().parent().context("dir")?.to_owned();
    // Root's directories the symlinks point at: the pin directory's on
    // bpffs (so only ownership can refuse it), the handover one anywhere.
    let bpffs = pin_dir.parent().context("pin parent")?.to_owned();
    std::fs::create_dir_all(&bpffs)?;
    let roots = [
        TempDir::new_in(&bpffs, "root-owned-")?,
        TempDir::new("epia-root-owned-")?,
    ];
    let mut env: Option<Served> = None;
    let mut cluster = Some(cluster);
    for squat in [Squat::BothDirectories, Squat::Symlinks, Squat::PinDirectory] {
        let cluster = match env.take() {
            Some(Served { mut agent, cluster }) => {
                agent.terminate(Duration::from_secs(30))?;
                cluster
            }
            None => cluster.take().context("the cluster")?,
        };
        for dir in [&pin_dir, &handover_dir] {
            let _ = std::fs::remove_file(dir);
            let _ = std::fs::remove_dir_all(dir);
        }
        let squatted: Vec<&PathBuf> = match squat {
            Squat::PinDirectory => vec![&pin_dir],
            _ => vec![&pin_dir, &handover_dir],
        };
        for (n, dir) in squatted.into_iter().enumerate() {
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent)?;
            }
            match squat {
                Squat::Symlinks => {
                    std::os::unix::fs::symlink(roots[n].path(), dir)?;
                    std::os::unix::fs::lchown(dir, Some(NOBODY), Some(NOBODY))?;
                }
                _ => {
                    std::fs::create_dir_all(dir)?;
                    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))?;
                }
            }
        }
        let mut agent =
            AgentProcess::start(&cluster.node.netns, &cluster.agent_args("enforce", &args()))?;
        // The handover offer is set up after readiness: wait for its verdict.
        for refusal in ["KERNEL PROGRAMS NOT PINNED", "cannot offer a handover"] {
            agent
                .wait_for_log(refusal, Duration::from_secs(30))
                .with_context(|| format!("{squat:?}: the agent used what `nobody` made"))?;
        }
        let served = Served { agent, cluster };
        let logs = served.agent.logs();
        ensure!(
            logs.contains(&format!("owned by uid {NOBODY}")),
            "{squat:?}: the refusal does not name the owner:\n{logs}"
        );
        // Attribution still holds: unpinned, not off.
        let creds = served.sdk_ok(Who::A, V4_URI, &served.own_token(Who::A)?)?;
        ensure!(creds["access_key_id"].is_string(), "{squat:?}: {creds}");
        let replay = served.sdk(Who::B, V4_URI, &served.own_token(Who::A)?)?;
        ensure!(
            !replay.status.success(),
            "{squat:?}: a replayed token was served"
        );
        env = Some(served);
    }
    Ok(())
}

#[test]
fn init_with_an_agent_serving_changes_nothing() -> Result<()> {
    harness::require_privilege!();
    let env = Served::start(NODE, "enforce", &[])?;
    let links = || -> Result<Vec<u8>> {
        let mut state = Vec::new();
        for what in ["link", "addr", "route"] {
            let out = env
                .node
                .netns
                .command("ip")?
                .args(["-j", what, "show"])
                .output()?;
            ensure!(out.status.success(), "ip {what}");
            state.extend(out.stdout);
        }
        Ok(state)
    };
    let before = links()?;
    harness::agent_proc::init_node(&env.node.netns)?;
    ensure!(
        links()? == before,
        "init changed the node's links, addresses or routes while an agent served"
    );
    pod_a_is_served(&env)?;
    Ok(())
}
