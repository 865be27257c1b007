//! The agent against an attacker on the node, in enforce mode: every test
//! here is an attack that once worked (or could have), now run against the
//! real agent binary, the real kernel programs and the real SDK.
//!
//! * lookalike cgroups — kubelet's layout rebuilt where kubelet does not put
//!   pods, by root or by an unprivileged user in a subtree delegated to it;
//! * connection-record collisions from an unprivileged user+network
//!   namespace that holds the victims' source addresses;
//! * a pod holding ten thousand idle connections to the credential
//!   endpoint, or to the probe port;
//! * restarts under load (no connection accepted before attribution).

use std::{
    net::SocketAddr,
    os::unix::fs::chown,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use harness::{
    cgroups::{Driver, PodSpec},
    cluster::{UNLIMITED, Who},
    netns::Netns,
    pod::{finish, first_line, sdk_credentials},
    privilege::NOBODY,
    served::Served,
    topology::{AGENT_V4, V4_URI},
    wait::wait_for,
};
use serde_json::Value;

const NODE: &str = "node-1";

/// The DaemonSet's probe `timeoutSeconds`: past it the kubelet counts a
/// failure.
const PROBE_TIMEOUT_MS: f64 = 10_000.0;
/// The agent in enforce mode; `unlimited`: without the request rate limits
/// ([`UNLIMITED`]), for tests whose victims fetch back to back: what they
/// measure is the attack.
fn env(unlimited: bool) -> Result<Served> {
    let extra: &[&str] = if unlimited { &UNLIMITED } else { &[] };
    Served::start(NODE, "enforce", extra)
}

/// Hands a cgroup to `uid` the way systemd delegates one: the directory and
/// the files its owner needs to create children and move processes.
fn delegate(dir: &Path, uid: u32) -> Result<()> {
    for path in [
        dir.to_owned(),
        dir.join("cgroup.procs"),
        dir.join("cgroup.threads"),
        dir.join("cgroup.subtree_control"),
    ] {
        chown(&path, Some(uid), Some(uid)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Runs the SDK with `token` as `nobody`: it starts in `start` (a cgroup
/// delegated to it), creates `target` itself and moves itself there.
fn sdk_as_nobody(env: &Served, start: &Path, target: &Path, token: &str) -> Result<Value> {
    let file = env.token_file(token)?;
    let mut cmd = env.pod_client(start, &env.node.netns)?;
    cmd.args(["as-user", &NOBODY.to_string(), &target.to_string_lossy()]);
    let out = sdk_credentials(&mut cmd, V4_URI, &file).output()?;
    ensure!(
        !out.status.success(),
        "served a stolen token as nobody in {}",
        target.display()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !stderr.contains("join") && !stderr.contains("mkdir"),
        "the attack itself failed to set up: {stderr}"
    );
    env.last_audit()
}

#[test]
fn lookalike_cgroups_outside_kubelets_roots_or_delegated_are_not_pods() -> Result<()> {
    harness::require_privilege!();
    let env = env(false)?;
    let stolen = env.own_token(Who::A)?;
    let victim = env.pod(Who::A).clone();
    let uid_ = victim.uid.replace('-', "_");
    let cid = PodSpec::new(Driver::Systemd).container_id;
    let systemd_pod = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{cid}.scope"
    );

    // Root rebuilds kubelet's layout elsewhere: under a node service, under
    // a top-level name that only starts like kubelet's root.
    for (what, rel) in [
        (
            "kubelet's systemd layout under a node service",
            format!("system.slice/backup.service/{systemd_pod}"),
        ),
        (
            "a root named like kubelet's, plus a suffix",
            systemd_pod.replacen("kubepods.slice", "kubepods.slice.old", 1),
        ),
        (
            "kubelet's cgroupfs layout under an unconfigured prefix",
            format!("test-run-4243/kubepods/besteffort/pod{}/{cid}", victim.uid),
        ),
    ] {
        let cgroup = env.tree.create(&rel)?;
        let out = env.sdk_in(&cgroup, &env.node.netns, V4_URI, &stolen)?;
        ensure!(!out.status.success(), "{what}: served a stolen token");
        let event = env.last_audit()?;
        assert_eq!(event["reason"], "caller-not-a-pod", "{what}: {event}");
        assert_eq!(event["status"], 403, "{what}");
    }

    // No root needed: systemd delegates user@UID.service to its user, who
    // builds kubelet's cgroupfs layout inside and moves itself in.
    let delegated = env.tree.create(&format!(
        "user.slice/user-{NOBODY}.slice/user@{NOBODY}.service"
    ))?;
    delegate(&delegated, NOBODY)?;
    let start = env.tree.create(&format!(
        "user.slice/user-{NOBODY}.slice/user@{NOBODY}.service/init.scope"
    ))?;
    delegate(&start, NOBODY)?;
    let lookalike = delegated.join(format!(
        "app.slice/kubepods/besteffort/pod{}/{cid}",
        victim.uid
    ));
    let event = sdk_as_nobody(&env, &start, &lookalike, &stolen)?;
    assert_eq!(
        event["reason"], "caller-not-a-pod",
        "delegated lookalike: {event}"
    );

    // Below kubelet's root, in kubelet's layout, but a directory on the way
    // is not root's: whoever owns it may have made the rest.
    let pod_dir = env
        .tree
        .create(&format!("kubepods/besteffort/pod{}", victim.uid))?;
    delegate(&pod_dir, NOBODY)?;
    let start = env
        .tree
        .create(&format!("kubepods/besteffort/pod{}/start", victim.uid))?;
    delegate(&start, NOBODY)?;
    let event = sdk_as_nobody(&env, &start, &pod_dir.join(&cid), &stolen)?;
    assert_eq!(
        event["reason"], "caller-cgroup-delegated",
        "delegated cgroup below a root: {event}"
    );

    // And the victim itself is still served.
    env.sdk_ok(Who::A, V4_URI, &stolen)?;
    Ok(())
}

/// Spawns `pod-client` with `args` in `cgroup`/`netns`, stdout piped.
fn spawn(env: &Served, cgroup: &Path, netns: &Netns, args: &[&str]) -> Result<Child> {
    env.pod_client(cgroup, netns)?
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn pod-client")
}

/// Waits for a `pod-client hold` to say it has opened its first fill
/// (one line on stdout; its tally comes last, for `finish`).
fn filled(child: &mut Child, what: &str) -> Result<()> {
    let line: Value = serde_json::from_str(&first_line(child, what)?)?;
    ensure!(line["filled"].as_u64() > Some(0), "{what}: {line}");
    eprintln!("{what}: {line}");
    Ok(())
}

/// Audit events written so far (lines in the audit file).
fn audited(env: &Served) -> usize {
    std::fs::read_to_string(env.audit_log()).map_or(0, |t| t.lines().count())
}

/// `pod-client http-load`: requests to `path` at `target`, a new
/// connection each, for `seconds`, from a process in `cgroup` and `netns`.
fn load(
    env: &Served,
    (cgroup, netns): (&Path, &Netns),
    target: SocketAddr,
    path: &str,
    token_file: &Path,
    seconds: u32,
) -> Result<Child> {
    spawn(
        env,
        cgroup,
        netns,
        &[
            "http-load",
            &target.to_string(),
            path,
            &token_file.to_string_lossy(),
            &seconds.to_string(),
        ],
    )
}

fn count(tally: &Value, status: &str) -> u64 {
    tally["statuses"][status].as_u64().unwrap_or(0)
}

fn total(tally: &Value) -> u64 {
    tally["statuses"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

/// Source ports every client in the node and pod A's namespaces draws from
/// during the collision test: few enough that the attacker covers them all.
const PORT_LO: u16 = 45000;
const PORT_HI: u16 = 45063;

#[test]
fn a_namespace_owning_the_victims_source_addresses_cannot_touch_their_records() -> Result<()> {
    harness::require_privilege!();
    let env = env(true)?;
    let range = format!("{PORT_LO} {PORT_HI}");
    for netns in [&env.net_a.netns, &env.node.netns] {
        netns.sysctl("net.ipv4.ip_local_port_range", &range)?;
    }
    let target: SocketAddr = (AGENT_V4, 80).into();
    let file_a = env.token_file(&env.own_token(Who::A)?)?;
    let file_b = env.token_file(&env.own_token(Who::B)?)?;
    let (cg_a, cg_b) = (env.cg_a.clone(), env.cg_b.clone());

    // The victims' live keep-alive connections, one request every 50 ms.
    let keep = |cgroup: &Path, netns: &Netns, file: &PathBuf| {
        spawn(
            &env,
            cgroup,
            netns,
            &[
                "keepalive",
                &target.to_string(),
                &file.to_string_lossy(),
                "60",
                "50",
            ],
        )
    };
    let keep_a = keep(&cg_a, &env.net_a.netns, &file_a)?;
    let keep_b = keep(&cg_b, &env.node.netns, &file_b)?;

    // The attacker: nobody, in a cgroup of its own (delegated, as systemd
    // would), spraying every (victim address, port in range) from its own
    // user+network namespace, round after round.
    let attacker = env.tree.create("user.slice/attacker")?;
    delegate(&attacker, NOBODY)?;
    let sources = format!("{},{AGENT_V4}", env.net_a.ipv4);
    let spray = spawn(
        &env,
        &attacker,
        &env.node.netns,
        &[
            "as-user",
            &NOBODY.to_string(),
            &attacker.to_string_lossy(),
            "userns-spray",
            &target.to_string(),
            &sources,
            &PORT_LO.to_string(),
            &PORT_HI.to_string(),
            "40",
        ],
    )?;
    // Meanwhile both victims open new connections from the same ports.
    let load_a = load(
        &env,
        (&cg_a, &env.net_a.netns),
        target,
        "/v1/credentials",
        &file_a,
        3,
    )?;
    let load_b = load(
        &env,
        (&cg_b, &env.node.netns),
        target,
        "/v1/credentials",
        &file_b,
        3,
    )?;

    let sprayed = finish(spray, "attacker")?;
    ensure!(
        sprayed["connected"].as_u64() >= Some(2 * 64 * 40),
        "the attack did not run: {sprayed}"
    );
    for (what, child) in [
        ("pod A keep-alive", keep_a),
        ("pod B keep-alive", keep_b),
        ("pod A new connections", load_a),
        ("pod B new connections", load_b),
    ] {
        let tally = finish(child, what)?;
        ensure!(
            count(&tally, "200") == total(&tally) && total(&tally) > 0,
            "{what}: {tally}\nagent:\n{}",
            env.agent.logs()
        );
    }
    // Every credential hand-out names the right pod.
    for event in env.audit()? {
        let pod = event["pod_uid"].as_str().unwrap_or_default();
        assert_eq!(event["decision"], "allow", "{event}");
        let expected = if event["service_account"] == "app-a" {
            &env.pod(Who::A).uid
        } else {
            &env.pod(Who::B).uid
        };
        assert_eq!(pod, expected, "{event}");
    }
    // The attacker's own connection to the agent is the attacker's.
    let out = env.sdk_in(&attacker, &env.node.netns, V4_URI, &env.own_token(Who::A)?)?;
    ensure!(!out.status.success(), "the attacker was served");
    let event = env.last_audit()?;
    assert_eq!(event["reason"], "caller-not-a-pod", "{event}");
    assert_eq!(
        event["cgroup_id"].as_u64(),
        Some(agent::caller::cgroup::CgroupResolver::id_of(&attacker)?),
        "{event}"
    );
    Ok(())
}

/// Each hog holds this many idle connections (and reopens every one the
/// agent closes).
const HOG: &str = "10000";

#[test]
fn ten_thousand_idle_connections_from_a_pod_and_a_user_starve_no_one() -> Result<()> {
    harness::require_privilege!();
    let env = env(true)?;
    // The hogs: a pod, and an unprivileged user in a cgroup delegated to it
    // (a caller the kernel cannot vouch for, so it shares the unverified
    // callers' share).
    let hog_pod = env.tree.pod(&PodSpec::new(Driver::Cgroupfs))?;
    let hog_user = env.tree.create("user.slice/user-65534.slice/hog")?;
    delegate(&hog_user, NOBODY)?;
    // The kubelet: a system service, in a root-owned cgroup of its own.
    let kubelet = env.tree.create("system.slice/kubelet.service")?;
    let credentials: SocketAddr = (AGENT_V4, 80).into();
    let probe: SocketAddr = "127.0.0.1:2703".parse()?;
    let file_a = env.token_file(&env.own_token(Who::A)?)?;
    let file_b = env.token_file(&env.own_token(Who::B)?)?;
    // (what, hogged address, victims: who, cgroup, netns, address, path, token file)
    type Victim<'a> = (&'a str, &'a Path, &'a Netns, SocketAddr, &'a str, &'a Path);
    let cases: [(&str, SocketAddr, Vec<Victim>); 2] = [
        (
            "credential endpoint",
            credentials,
            vec![
                (
                    "pod A",
                    &env.cg_a,
                    &env.net_a.netns,
                    credentials,
                    "/v1/credentials",
                    &file_a,
                ),
                (
                    "pod B",
                    &env.cg_b,
                    &env.node.netns,
                    credentials,
                    "/v1/credentials",
                    &file_b,
                ),
            ],
        ),
        (
            "probe port",
            probe,
            vec![
                (
                    "kubelet",
                    &kubelet,
                    &env.node.netns,
                    probe,
                    "/healthz",
                    &file_b,
                ),
                (
                    "pod B",
                    &env.cg_b,
                    &env.node.netns,
                    credentials,
                    "/v1/credentials",
                    &file_b,
                ),
            ],
        ),
    ];
    for (what, hogged, victims) in cases {
        let hogged = hogged.to_string();
        let mut hogs = [
            spawn(
                &env,
                &hog_pod,
                &env.node.netns,
                &["hold", &hogged, HOG, "6"],
            )?,
            spawn(
                &env,
                &hog_user,
                &env.node.netns,
                &[
                    "as-user",
                    &NOBODY.to_string(),
                    &hog_user.to_string_lossy(),
                    "hold",
                    &hogged,
                    HOG,
                    "6",
                ],
            )?,
        ];
        // Let the hogs fill their shares first.
        for (hog, child) in ["pod hog", "user hog"].into_iter().zip(&mut hogs) {
            filled(child, hog)?;
        }
        let loads: Vec<(&str, Child)> = victims
            .iter()
            .map(|(who, cgroup, netns, to, path, file)| {
                load(&env, (cgroup, netns), *to, path, file, 3).map(|c| (*who, c))
            })
            .collect::<Result<_>>()?;
        for (who, child) in loads {
            let tally = finish(child, what)?;
            ensure!(
                count(&tally, "200") == total(&tally) && total(&tally) > 20,
                "{what}: {who} not served: {tally}"
            );
            ensure!(
                tally["errors"].as_object().is_some_and(|e| e.is_empty()),
                "{what}: {who} could not connect or was cut off: {tally}"
            );
            // Starved means answered later than the kubelet waits for a
            // probe (the manifest's timeoutSeconds): a functional bound,
            // not a performance goal (those live in `cargo xtask bench`).
            let max = tally["max_ms"].as_f64().unwrap_or(f64::MAX);
            ensure!(
                max < PROBE_TIMEOUT_MS,
                "{what}: {who} waited {max:.0} ms: {tally}"
            );
            eprintln!("{what}: {who} under the hogs: {tally}");
        }
        for (hog, child) in ["pod", "user"].into_iter().zip(hogs) {
            let held = finish(child, hog)?;
            ensure!(
                held["closed_by_server"].as_u64() > Some(1000),
                "{what}: the {hog} hog was not held to its share: {held}"
            );
        }
    }
    let metrics = env.metrics()?;
    for listener in ["credentials", "probe"] {
        ensure!(
            metrics.contains(&format!(
                "pod_identity_connections_refused_total{{listener=\"{listener}\",reason=\"client-limit\"}}"
            )),
            "no refusal counted on {listener}:\n{metrics}"
        );
    }
    Ok(())
}

#[test]
fn a_restart_under_load_refuses_no_legitimate_request() -> Result<()> {
    harness::require_privilege!();
    let mut env = env(true)?;
    let target: SocketAddr = (AGENT_V4, 80).into();
    let files = [
        env.token_file(&env.own_token(Who::A)?)?,
        env.token_file(&env.own_token(Who::B)?)?,
    ];
    let loads: Vec<Child> = [Who::A, Who::B]
        .iter()
        .zip(&files)
        .map(|(who, file)| {
            load(
                &env,
                env.placement(*who),
                target,
                "/v1/credentials",
                file,
                8,
            )
        })
        .collect::<Result<_>>()?;
    // Each agent serves before it is replaced.
    for _ in 0..3 {
        let served = audited(&env);
        wait_for("requests served", Duration::from_secs(30), || {
            Ok(audited(&env) > served)
        })?;
        env.agent.terminate(Duration::from_secs(15))?;
        let args = env.agent_args("enforce", &UNLIMITED);
        env.agent = harness::agent_proc::AgentProcess::start(&env.node.netns, &args)?;
    }
    let tallies: Vec<(Who, Value)> = [Who::A, Who::B]
        .into_iter()
        .zip(loads)
        .map(|(who, child)| Ok((who, finish(child, "load")?)))
        .collect::<Result<_>>()?;
    // What the agents recorded of any refusal, to say why.
    let denied = env.refused()?;
    for (who, tally) in &tallies {
        ensure!(count(tally, "200") > 0, "pod {who:?}: {tally}");
        ensure!(
            count(tally, "200") == total(tally),
            "pod {who:?} got refusals across restarts: {tally}\nrefusals recorded: {denied:?}"
        );
    }
    ensure!(denied.is_empty(), "refused across restarts: {denied:?}");
    Ok(())
}

/// Runs `pod-client socket-get` as `who` with `token` over a socket of
/// `kind`; the HTTP status and the audit event it left.
fn socket_get(env: &Served, who: Who, token: &str, kind: &str) -> Result<(u16, Value)> {
    let (cgroup, netns) = env.placement(who);
    let file = env.token_file(token)?;
    let target = SocketAddr::from((AGENT_V4, 80)).to_string();
    let out = env
        .pod_client(cgroup, netns)?
        .args(["socket-get", &target, &file.to_string_lossy(), kind])
        .output()?;
    ensure!(
        out.status.success(),
        "{kind}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok((status, env.last_audit()?))
}

#[test]
fn socket_options_a_caller_chooses_never_misattribute() -> Result<()> {
    harness::require_privilege!();
    let env = env(false)?;
    let (uid_a, token_a) = (env.pod(Who::A).uid.clone(), env.own_token(Who::A)?);
    // Fast Open (its cookie request takes the room the stamp needs) and
    // MPTCP (its SYN is not stamped): the kernel cannot attribute them, so
    // even A's own request is refused; a stolen token is refused whatever
    // the socket, and nobody is taken for another pod.
    for (kind, a_served) in [("plain", true), ("fastopen", false), ("mptcp", false)] {
        let (status, event) = socket_get(&env, Who::B, &token_a, kind)?;
        ensure!(
            status == 403 && event["pod_uid"] != uid_a.as_str(),
            "{kind}: B replaying A's token: {status} {event}"
        );
        let (status, event) = socket_get(&env, Who::A, &token_a, kind)?;
        let expected = if a_served {
            status == 200 && event["pod_uid"] == uid_a.as_str()
        } else {
            status == 403 && event["reason"] == "caller-not-a-pod"
        };
        ensure!(expected, "{kind}: A's own request: {status} {event}");
    }
    Ok(())
}

#[test]
fn syn_cookies_answer_503_retry_not_a_refusal() -> Result<()> {
    harness::require_privilege!();
    let env = env(false)?;
    let token_a = env.own_token(Who::A)?;
    // What a SYN flood makes the kernel do (cookies, no saved SYN), without
    // the flood: cookies for every connection in the node's namespace.
    env.node.netns.sysctl("net.ipv4.tcp_syncookies", "2")?;
    let (status, event) = socket_get(&env, Who::A, &token_a, "plain")?;
    env.node.netns.sysctl("net.ipv4.tcp_syncookies", "1")?;
    ensure!(
        status == 503 && event["reason"] == "syn-not-kept",
        "under SYN cookies: {status} {event}"
    );
    let (status, event) = socket_get(&env, Who::A, &token_a, "plain")?;
    ensure!(status == 200, "after the flood: {status} {event}");
    Ok(())
}
