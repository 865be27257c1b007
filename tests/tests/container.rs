//! The image and deploy/daemonset.yaml in a real container runtime (podman
//! with runc): the image built from the project's Dockerfile, the init and
//! server containers run with exactly the manifest's security context and
//! volumes (read from it, not retyped), on a node network namespace the
//! test made, with a private cgroup namespace — and then the whole promise:
//! pods get their own credentials with the real SDK, a replay is refused,
//! the audit names the pod, the IMDS guard names a pod that reaches for the
//! instance metadata service, the probes and metrics answer, SIGTERM ends it
//! within the grace period. Then what must fail does: each capability
//! removed, and the runtime's default seccomp profile instead of ours.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use harness::{
    agent_bin::agent_binary,
    agent_proc::{AGENT_ENV, get_local},
    cluster::{Cluster, Who},
    imds::{IMDS_V4, PodLogs, start_fake_imds},
    pod::{pod_command, sdk_credentials},
    podman::{self, Container, Image, Placement},
    privilege::privileged_or_skip,
    tempdir::TempDir,
    topology::V4_URI,
    wait::wait_for,
};
use serde_yaml_ng::Value;

const NODE: &str = "node-1";

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn daemonset() -> Result<Value> {
    let text = std::fs::read_to_string(repo().join("deploy/daemonset.yaml"))?;
    serde_yaml_ng::from_str(&text).context("deploy/daemonset.yaml")
}

/// Whether the runtime is there; under CI it must be (setup installs it).
fn runtime_or_skip(test: &str) -> bool {
    if podman::available() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: podman and runc are missing (cargo xtask setup installs them)");
    }
    eprintln!("SKIPPED {test}: podman and runc are not installed");
    false
}

#[test]
fn the_daemonset_runs_in_a_real_container_runtime() -> Result<()> {
    let test = "the_daemonset_runs_in_a_real_container_runtime";
    if !privileged_or_skip(test) || !runtime_or_skip(test) {
        return Ok(());
    }
    let image: Image = podman::build_image(&repo().join("Dockerfile"), &agent_binary()?)?;
    let ds = daemonset()?;
    let pod_spec = &ds["spec"]["template"]["spec"];
    let cluster = Cluster::uninitialized(NODE)?;
    let netns_path = format!("/run/netns/{}", cluster.node.netns.name());
    let cgroup2 = cluster.tree.mount().to_owned();
    let seccomp_root = repo().join("deploy");
    let downward = [("NODE_NAME", NODE)];
    // kubelet's pod log directories, and an IMDS for the guard to see.
    let logs = PodLogs::new()?;
    logs.add("default", "pod-a", &cluster.pod_a.uid)?;
    logs.add("default", "pod-b", &cluster.pod_b.uid)?;
    start_fake_imds(&cluster.node.netns)?;
    // The node's bpffs and handover directories, private to this test (and
    // removed with its node namespace).
    let host_paths = [
        ("/sys/fs/bpf", cluster.node.netns.pin_dir()),
        (
            "/run/eks-pod-identity-agent",
            cluster
                .node
                .netns
                .handover_socket()
                .parent()
                .context("handover dir")?
                .to_owned(),
        ),
        ("/var/log/pods", logs.path().to_owned()),
    ];
    let at = Placement {
        netns_path: &netns_path,
        cgroup2_mount: &cgroup2,
        seccomp_root: &seccomp_root,
        downward: &downward,
        host_paths: &host_paths,
    };

    // The init container: the link and the addresses.
    let init = &pod_spec["initContainers"][0];
    let flags = podman::run_flags(pod_spec, init, &at)?;
    let out = podman::podman()
        .args(["run", "--rm"])
        .args(&flags)
        .arg(&image.tag)
        .args(podman::args_of(init, &flags))
        .output()?;
    ensure!(
        out.status.success(),
        "init container: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let links = cluster.node.netns.run_in(|| {
        let out = Command::new("ip")
            .args(["-o", "addr", "show", "pod-id-link0"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    ensure!(
        links.contains("169.254.170.23/32") && links.contains("fd00:ec2::23/128"),
        "the init container did not own the addresses: {links}"
    );

    // The server container, as the manifest runs it, on this test's
    // cgroup subtree and fake EKS Auth.
    let server = &pod_spec["containers"][0];
    let audit = TempDir::new("epia-container-audit-")?;
    let container = Container::new("epia-agent-");
    let start = |server: &Value, container: &Container, extra_flags: &[String]| -> Result<()> {
        let mut flags = podman::run_flags(pod_spec, server, &at)?;
        flags.extend(extra_flags.iter().cloned());
        for (name, value) in AGENT_ENV {
            if !name.starts_with("AWS_CONFIG") && !name.starts_with("AWS_SHARED") {
                flags.extend(["-e".into(), format!("{name}={value}")]);
            }
        }
        flags.extend(["-e".into(), "CLUSTER_NAME=test-cluster".into()]);
        let mut args = podman::args_of(server, &flags);
        let tree = cluster
            .tree
            .root()
            .strip_prefix(&cgroup2)
            .context("tree outside the mount")?
            .to_string_lossy()
            .into_owned();
        args.extend([
            format!("--endpoint={}", cluster.fake.endpoint()),
            format!("--cgroup-root=/host/sys/fs/cgroup/{tree}"),
            "--audit-log=/audit/audit.jsonl".into(),
        ]);
        for root in cluster.tree.kubepods_roots() {
            args.push(format!("--kubepods-root={root}"));
        }
        let out = podman::podman()
            .args(["run", "-d", "--name", &container.name])
            .args(&flags)
            .args(["-v", &format!("{}:/audit", audit.path().display())])
            .arg(&image.tag)
            .args(&args)
            .output()?;
        ensure!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    start(server, &container, &[])?;
    let probe = |path: &str, port: u16| get_local(&cluster.node.netns, port, path);
    wait_for(
        "the server container to be ready",
        Duration::from_secs(60),
        || Ok(probe("/readyz", 2703).is_ok_and(|r| r.status == 200)),
    )
    .with_context(|| format!("container logs:\n{}", container.logs()))?;

    // Pods get their own credentials; a replay is refused; the audit names
    // the pod.
    let sdk = |who: Who, token: &str| -> Result<std::process::Output> {
        let (cgroup, netns) = cluster.placement(who);
        let file = cluster.dir.file("token-", token)?;
        let mut cmd = pod_command(env!("CARGO_BIN_EXE_pod-client").as_ref(), cgroup, netns)?;
        Ok(sdk_credentials(&mut cmd, V4_URI, &file).output()?)
    };
    let token_a = cluster.own_token(Who::A)?;
    for who in [Who::A, Who::B] {
        let out = sdk(who, &cluster.own_token(who)?)?;
        ensure!(
            out.status.success(),
            "pod {who:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            container.logs()
        );
    }
    let replay = sdk(Who::B, &token_a)?;
    ensure!(!replay.status.success(), "a replayed token was served");
    // The agent's writer thread appends a moment after each answer.
    let trail_of = |lines: usize| -> Result<String> {
        let mut trail = String::new();
        wait_for("the audit events", Duration::from_secs(30), || {
            trail = std::fs::read_to_string(audit.path().join("audit.jsonl")).unwrap_or_default();
            Ok(trail.lines().count() >= lines)
        })
        .with_context(|| format!("audit trail:\n{trail}\n{}", container.logs()))?;
        Ok(trail)
    };
    let trail = trail_of(3)?;
    let events: Vec<serde_json::Value> = trail
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(events.len() == 3, "{trail}");
    ensure!(
        events[0]["pod_uid"] == cluster.pod(Who::A).uid.as_str()
            && events[0]["decision"] == "allow"
            && events[0]["process"] == "pod-client",
        "{trail}"
    );
    ensure!(
        events[2]["pod_uid"] == cluster.pod(Who::B).uid.as_str()
            && events[2]["reason"] == "pod-mismatch",
        "{trail}"
    );
    // The IMDS guard, as the manifest runs it (audit): pod A's connect goes
    // through and is recorded with the pod's name from kubelet's logs.
    let (cg_a, net_a) = cluster.placement(Who::A);
    let client = pod_command(env!("CARGO_BIN_EXE_pod-client").as_ref(), cg_a, net_a)?;
    let tally = harness::imds::connect(client, IMDS_V4, 1)?;
    ensure!(tally["connected"] == 1, "{tally}");
    let trail = trail_of(4)?;
    let imds: serde_json::Value = serde_json::from_str(trail.lines().nth(3).unwrap_or_default())?;
    ensure!(
        imds["event"] == "imds-connect"
            && imds["decision"] == "audit-only"
            && imds["namespace"] == "default"
            && imds["pod_name"] == "pod-a"
            && imds["pid"] == tally["pid"],
        "{imds}"
    );
    for (path, port) in [("/healthz", 2703), ("/readyz", 2703), ("/metrics", 2705)] {
        let reply = probe(path, port)?;
        ensure!(reply.status == 200, "{path}: {}", reply.status);
    }
    ensure!(
        probe("/metrics", 2705)?
            .body
            .contains(r#"pod_identity_attribution_mode{mode="enforce"} 1"#)
    );

    // A surge update as the DaemonSet rolls one: a second server container
    // from the same manifest starts beside the first, takes its listening
    // sockets and adopts its pinned kernel programs; then the first gets
    // SIGTERM and exits cleanly within the grace period; pods are served
    // by the second, which stops as cleanly.
    let grace = pod_spec["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    let stop = |container: &Container| -> Result<()> {
        let asked = Instant::now();
        let out = podman::podman()
            .args(["stop", "-t", &grace.to_string(), &container.name])
            .output()?;
        ensure!(out.status.success(), "podman stop failed");
        let took = asked.elapsed();
        let exit = podman::podman()
            .args(["inspect", "-f", "{{.State.ExitCode}}", &container.name])
            .output()?;
        let code = String::from_utf8_lossy(&exit.stdout).trim().to_owned();
        ensure!(
            code == "0" && took < Duration::from_secs(grace),
            "SIGTERM: exit {code} after {took:?}\n{}",
            container.logs()
        );
        Ok(())
    };
    let successor = Container::new("epia-agent-next-");
    start(server, &successor, &[])?;
    wait_for(
        "the new container to take over",
        Duration::from_secs(60),
        || {
            Ok(successor
                .logs()
                .contains("took over from the agent serving on this node"))
        },
    )
    .with_context(|| format!("new container logs:\n{}", successor.logs()))?;
    ensure!(
        successor.logs().contains("kernel programs adopted"),
        "the new container did not adopt the pinned programs:\n{}",
        successor.logs()
    );
    stop(&container)?;
    for who in [Who::A, Who::B] {
        let out = sdk(who, &cluster.own_token(who)?)?;
        ensure!(
            out.status.success(),
            "pod {who:?} after the update: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            successor.logs()
        );
    }
    stop(&successor)?;

    // What must fail, fails, naming why: each capability removed in turn …
    for cap in podman::strings(&server["securityContext"]["capabilities"]["add"]) {
        let mut fewer = server.clone();
        if let Some(adds) = fewer["securityContext"]["capabilities"]["add"].as_sequence_mut() {
            adds.retain(|c| c.as_str() != Some(cap.as_str()));
        }
        let without = Container::new("epia-agent-nocap-");
        start(&fewer, &without, &[])?;
        let logs = wait_for_exit(&without)?;
        ensure!(
            logs.contains(&format!("CAP_{cap}")),
            "without {cap}: the error does not name it:\n{logs}"
        );
    }
    // … and the runtime's default seccomp profile (what the kubelet applies
    // when the manifest names none).
    let mut default_seccomp = server.clone();
    if let Some(sc) = default_seccomp["securityContext"].as_mapping_mut() {
        sc.remove("seccompProfile");
    }
    let confined = Container::new("epia-agent-seccomp-");
    start(&default_seccomp, &confined, &[])?;
    let logs = wait_for_exit(&confined)?;
    ensure!(
        logs.contains("refused for lack of permission") && logs.contains("seccomp"),
        "under RuntimeDefault seccomp the agent did not stop naming why:\n{logs}"
    );
    Ok(())
}

/// Waits until `container` has exited (non-zero), returning its logs.
fn wait_for_exit(container: &Container) -> Result<String> {
    wait_for("the container to exit", Duration::from_secs(60), || {
        let out = podman::podman()
            .args(["inspect", "-f", "{{.State.Running}}", &container.name])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "false")
    })?;
    let exit = podman::podman()
        .args(["inspect", "-f", "{{.State.ExitCode}}", &container.name])
        .output()?;
    let code = String::from_utf8_lossy(&exit.stdout).trim().to_owned();
    let logs = container.logs();
    ensure!(code != "0", "it exited 0:\n{logs}");
    Ok(logs)
}
