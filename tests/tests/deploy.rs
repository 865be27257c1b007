//! deploy/ and the Dockerfile's promises: manifests valid against the
//! Kubernetes schemas, flags the binary accepts, and capability sets that
//! are exactly enough — verified by running the agent with precisely those
//! capabilities, then without each one.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agent::config::Cli;
use anyhow::{Context as _, Result, ensure};
use clap::Parser as _;
use harness::{
    agent_bin::agent_binary,
    agent_proc::AgentProcess,
    caps::restrict_to,
    cluster::{Cluster, Who},
    manifest::{expand_args, strings},
    netns::Netns,
    pod::{pod_command, sdk_credentials},
};
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The DaemonSets: cloud nodes, hybrid nodes, hybrid Bottlerocket nodes.
const DAEMONSETS: [&str; 3] = [
    "daemonset.yaml",
    "daemonset-hybrid.yaml",
    "daemonset-hybrid-bottlerocket.yaml",
];

fn manifest(name: &str) -> Result<Value> {
    let text = std::fs::read_to_string(deploy_dir().join(name))?;
    serde_yaml_ng::from_str(&text).with_context(|| name.to_owned())
}

fn daemonset() -> Result<Value> {
    manifest(DAEMONSETS[0])
}

fn pod_spec(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]
}

fn container<'a>(ds: &'a Value, list: &str) -> &'a Value {
    &pod_spec(ds)[list][0]
}

fn caps_of(c: &Value) -> Vec<String> {
    strings(&c["securityContext"]["capabilities"]["add"])
}

/// Container args with `$(VAR)` expanded from its env (downward-API values
/// stand in as a sample node name).
fn args_of(c: &Value) -> Vec<String> {
    let env: Vec<(String, String)> = c["env"]
        .as_sequence()
        .map(|vars| {
            vars.iter()
                .map(|v| {
                    let name = v["name"].as_str().unwrap_or_default().to_owned();
                    let value = v["value"]
                        .as_str()
                        .unwrap_or("ip-10-0-1-23.ec2.internal")
                        .to_owned();
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default();
    expand_args(c, &env)
}

#[test]
fn manifests_pass_the_kubernetes_schemas() -> Result<()> {
    let dir = deploy_dir();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .arg(dir.join("namespace.yaml"))
        .args(DAEMONSETS.iter().map(|d| dir.join(d)))
        .output()
        .context("python3 -m kubernetes_validate (installed by `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "schema validation failed (is kubernetes-validate installed? `cargo xtask setup`):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let kustomization: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    for resource in strings(&kustomization["resources"]) {
        ensure!(
            dir.join(&resource).is_file(),
            "kustomization lists missing {resource}"
        );
    }
    Ok(())
}

#[test]
fn manifest_flags_are_flags_the_binary_accepts() -> Result<()> {
    for name in DAEMONSETS {
        let ds = manifest(name)?;
        for list in ["initContainers", "containers"] {
            let args = args_of(container(&ds, list));
            let argv =
                std::iter::once("eks-pod-identity-agent".to_owned()).chain(args.iter().cloned());
            Cli::try_parse_from(argv)
                .map_err(|e| anyhow::anyhow!("{name} {list} args {args:?} rejected:\n{e}"))?;
        }
        // As the AWS chart: readiness may take 30 probes; scraped by annotation.
        let server = container(&ds, "containers");
        assert_eq!(server["readinessProbe"]["failureThreshold"], 30, "{name}");
        assert_eq!(
            ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"], "true",
            "{name}"
        );
        assert!(
            server["resources"]["limits"]["memory"].is_null(),
            "{name}: a memory limit can OOM-kill a node-critical agent"
        );
        // A surge update: the new pod must fit beside the old one, so no
        // container declares a port (hostNetwork turns them into host
        // ports, which the scheduler will not give twice).
        let strategy = &ds["spec"]["updateStrategy"];
        assert_eq!(strategy["type"], "RollingUpdate", "{name}");
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"].as_u64(),
            Some(0),
            "{name}"
        );
        assert!(
            !strategy["rollingUpdate"]["maxSurge"].is_null(),
            "{name}: maxSurge"
        );
        for kind in ["initContainers", "containers"] {
            for c in pod_spec(&ds)[kind].as_sequence().into_iter().flatten() {
                assert!(c["ports"].is_null(), "{name}: {kind} declares ports");
            }
        }
        let mounts: Vec<&str> = server["volumeMounts"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        for needed in ["/sys/fs/bpf", "/run/eks-pod-identity-agent"] {
            assert!(mounts.contains(&needed), "{name}: {needed} not mounted");
        }
        let hybrid = name.contains("hybrid");
        assert_eq!(
            args_of(server)
                .iter()
                .any(|a| a == "--rotate-credentials=true"),
            hybrid,
            "{name}: --rotate-credentials"
        );
    }
    let ds = daemonset()?;
    let spec = pod_spec(&ds);
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    assert_eq!(spec["automountServiceAccountToken"], Value::Bool(false));
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let server = container(&ds, "containers");
    let args = args_of(server);
    for flag in ["--probe-port=2703", "--metrics-port=2705"] {
        assert!(args.iter().any(|a| a == flag), "{flag} missing");
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            server[probe]["httpGet"]["port"].as_u64(),
            Some(2703),
            "{probe}"
        );
    }
    for c in [container(&ds, "initContainers"), server] {
        let sc = &c["securityContext"];
        assert_eq!(strings(&sc["capabilities"]["drop"]), vec!["ALL"]);
        assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true));
        assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
        assert!(sc.get("privileged").is_none(), "no privileged containers");
    }
    Ok(())
}

#[test]
fn the_init_capability_set_suffices_and_each_is_needed() -> Result<()> {
    harness::require_privilege!();
    let caps = caps_of(container(&daemonset()?, "initContainers"));
    assert_eq!(caps, vec!["NET_ADMIN"]);
    let run = |ns: &Netns, caps: &[String]| -> Result<std::process::Output> {
        let mut cmd = ns.command(agent_binary()?)?;
        cmd.arg("init");
        restrict_to(&mut cmd, caps)?;
        Ok(cmd.output()?)
    };
    let ns = Netns::new("epk")?;
    let out = run(&ns, &caps)?;
    ensure!(
        out.status.success(),
        "init with {caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| c != &dropped).cloned().collect();
        let fresh = Netns::new("epk")?;
        let out = run(&fresh, &fewer)?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "init worked without {dropped}");
        ensure!(
            err.contains(&format!("CAP_{dropped}")),
            "the error does not name CAP_{dropped}: {err}"
        );
    }
    Ok(())
}

#[test]
fn the_server_capability_set_suffices_to_attach_resolve_and_serve_and_each_is_needed() -> Result<()>
{
    harness::require_privilege!();
    let caps = caps_of(container(&daemonset()?, "containers"));
    let cluster = Cluster::new("node-1")?;
    let node = &cluster.node;
    let args = cluster.agent_args("enforce", &[]);

    // Exactly the manifest's set: attach, resolve, serve.
    let mut agent = AgentProcess::start_with_caps(&node.netns, &args, Some(&caps))?;
    let file = cluster.dir.file("token-", &cluster.own_token(Who::A)?)?;
    let mut client = pod_command(
        env!("CARGO_BIN_EXE_pod-client").as_ref(),
        &cluster.cg_a,
        &cluster.net_a.netns,
    )?;
    let out = sdk_credentials(&mut client, harness::topology::V4_URI, &file).output()?;
    ensure!(
        out.status.success(),
        "SDK against the agent with {caps:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.logs()
    );
    agent
        .wait_for_log(r#""decision":"allow""#, Duration::from_secs(30))
        .context("not verified")?;
    drop(agent);

    // Without any one of them it refuses to start, naming it.
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| c != &dropped).cloned().collect();
        let mut agent = AgentProcess::spawn(&node.netns, &args, Some(&fewer))?;
        let status = agent.wait_exit(Duration::from_secs(60))?;
        let logs = agent.logs();
        ensure!(!status.success(), "the agent ran without {dropped}");
        ensure!(
            logs.contains(&format!("CAP_{dropped}")),
            "the error does not name CAP_{dropped}:\n{logs}"
        );
    }
    Ok(())
}
