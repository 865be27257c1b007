//! `cargo xtask demo`: the whole system on one machine — a node network
//! namespace owned by the agent's `init`, the agent `server` with caller
//! attribution enforced, a fake EKS Auth, two pods laid out as kubelet lays
//! them out, the real AWS SDK fetching credentials in one of them and a
//! stolen token replayed from the other; then the IMDS guard letting a
//! `kube-system` pod reach a fake instance metadata service and refusing
//! pod A.
//!
//! Prints what happens and why; exits non-zero if anything does not behave
//! as shown; removes every namespace, link, cgroup and process it made, also
//! on Ctrl-C or failure (everything is owned by values dropped on the way
//! out). `--keep` leaves it running until Ctrl-C.

use std::{
    path::{Path, PathBuf},
    process::{ExitCode, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use harness::{
    agent_bin::{agent_binary, built_binary},
    agent_proc::{AgentProcess, scrape_metrics},
    cgroups::{Driver, PodSpec},
    cluster::{Cluster, Who},
    imds::{IMDS_V4, PodLogs, start_fake_imds},
    netns::Netns,
    pod::pod_command,
    topology::V4_URI,
    wait::wait_for,
};
use serde_json::Value;

const NODE: &str = "demo-node";
const TOKEN_PATH: &str =
    "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token";

fn main() -> ExitCode {
    let keep = std::env::args().any(|a| a == "--keep");
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, interrupted.clone()) {
            eprintln!("demo: cannot handle signal {signal}: {e}");
            return ExitCode::FAILURE;
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("demo: needs root (network namespaces, cgroups, eBPF)");
        return ExitCode::FAILURE;
    }
    let result = run(keep, &interrupted);
    // Everything the demo made has been dropped (cleaned up) by now.
    match result {
        Ok(()) => {
            println!("\nDemo complete; namespaces, links, cgroups and processes removed.");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}\n(everything it created has been removed)");
            ExitCode::FAILURE
        }
    }
}

/// Stops between steps when Ctrl-C was pressed.
fn check(interrupted: &AtomicBool) -> Result<()> {
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(n: u32, title: &str, why: &str) {
    println!("\n── {n}. {title}");
    for line in why.lines() {
        println!("   {line}");
    }
}

/// Everything the demo owns, in drop (cleanup) order: the agent, then
/// the cluster it serves.
struct Demo {
    agent: AgentProcess,
    /// A `kube-system/aws-node` pod's container cgroup, for the IMDS guard.
    aws_node: (PodSpec, PathBuf),
    cluster: Cluster,
    logs: PodLogs,
}

impl std::ops::Deref for Demo {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

fn run(keep: bool, interrupted: &AtomicBool) -> Result<()> {
    println!(
        "EKS Pod Identity Agent demo: real kernel, real netlink, real HTTP, real AWS SDK; only EKS Auth is faked."
    );
    let cluster = Cluster::new(NODE)?;

    step(
        1,
        "A node",
        "A network namespace plays the node. The agent's `init` (netlink, as the DaemonSet's\ninit container) created pod-id-link0 with 169.254.170.23/32 and fd00:ec2::23/128.",
    );
    show_link(&cluster.node.netns)?;
    check(interrupted)?;

    step(
        2,
        "Pods, as kubelet lays them out",
        "Pod A: systemd cgroup driver, its own network namespace over a veth (as a CNI wires it).\nPod B: cgroupfs driver, hostNetwork (shares the node's namespace).",
    );
    println!(
        "   pod A  uid {}  netns {}  ip {}",
        cluster.pod_a.uid,
        cluster.net_a.netns.name(),
        cluster.net_a.ipv4
    );
    println!("          cgroup {}", cluster.cg_a.display());
    println!("   pod B  uid {}  hostNetwork", cluster.pod_b.uid);
    println!("          cgroup {}", cluster.cg_b.display());
    check(interrupted)?;

    step(
        3,
        "EKS Auth (fake) and the agent",
        "A local fake speaks EKS Auth's rest-json protocol and verifies tokens against the demo\ncluster's signing key. Associations: default/app-a → role-a, default/app-b → role-b.\nThe agent serves with --attribution enforce: eBPF attributes every connection to its pod.",
    );
    // kubelet's pod log directories (who each pod is, for the IMDS guard),
    // a third pod in kube-system, and a fake instance metadata service.
    let logs = PodLogs::new()?;
    logs.add("default", "pod-a", &cluster.pod_a.uid)?;
    logs.add("default", "pod-b", &cluster.pod_b.uid)?;
    let aws_node = PodSpec::new(Driver::Systemd);
    let aws_node_cgroup = cluster.tree.pod(&aws_node)?;
    logs.add("kube-system", "aws-node-x7k2p", &aws_node.uid)?;
    start_fake_imds(&cluster.node.netns)?;
    let log_dir = logs.path().to_string_lossy().into_owned();
    let args = cluster.agent_args(
        "enforce",
        &[
            "--imds",
            "enforce",
            "--imds-allow",
            "kube-system/aws-node",
            "--pod-log-dir",
            &log_dir,
        ],
    );
    let agent = AgentProcess::start(&cluster.node.netns, &args)?;
    println!(
        "   agent pid {} ready (EKS Auth at {})",
        agent.pid(),
        cluster.fake.endpoint()
    );
    let demo = Demo {
        agent,
        aws_node: (aws_node, aws_node_cgroup),
        cluster,
        logs,
    };
    check(interrupted)?;
    demo.scenario(interrupted)?;
    if keep {
        demo.print_keep_instructions();
        while !interrupted.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!("\nCtrl-C: cleaning up");
    }
    Ok(())
}

impl Demo {
    fn scenario(&self, interrupted: &AtomicBool) -> Result<()> {
        step(
            4,
            "The webhook's environment",
            "Each pod gets what the EKS mutating webhook injects, and its projected token.",
        );
        let token_a = self.own_token(Who::A)?;
        let env_a = self.write_pod_env("pod-a", &token_a)?;
        let env_b = self.write_pod_env("pod-b", &self.own_token(Who::B)?)?;
        for line in std::fs::read_to_string(&env_a)?.lines() {
            println!("   pod A: {line}");
        }
        println!(
            "   (a real pod reads its token at {TOKEN_PATH}; here it lives in {})",
            self.dir.path().display()
        );
        check(interrupted)?;

        step(
            5,
            "Pod A fetches credentials with the real AWS SDK",
            "aws-config's container credentials provider reads the token file and calls the agent.",
        );
        let out = self.sdk(&self.cg_a, &self.net_a.netns, &env_a)?;
        ensure!(
            out.status.success(),
            "pod A was refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let creds: Value = serde_json::from_slice(&out.stdout)?;
        let key = creds["access_key_id"].as_str().unwrap_or_default();
        println!("   AccessKeyId     {}", mask(key));
        println!(
            "   SecretAccessKey {}",
            mask(creds["secret_access_key"].as_str().unwrap_or_default())
        );
        println!(
            "   AccountId       {}",
            creds["account_id"].as_str().unwrap_or("-")
        );
        ensure!(key.starts_with("ASIA"), "unexpected credentials {creds}");
        check(interrupted)?;

        step(
            6,
            "Pod B replays pod A's stolen token",
            "Same token, different caller: the kernel says the connection comes from pod B's cgroup,\nthe token says pod A. The AWS agent would hand out A's role; this one refuses.",
        );
        let stolen = self.write_pod_env("pod-b-with-a-token", &token_a)?;
        let out = self.sdk(&self.cg_b, &self.node.netns, &stolen)?;
        ensure!(
            !out.status.success(),
            "pod B was served pod A's credentials"
        );
        let error = String::from_utf8_lossy(&out.stderr);
        ensure!(error.contains("403"), "unexpected failure: {error}");
        println!(
            "   SDK in pod B: {}",
            error.trim().split(" (").next().unwrap_or_default()
        );
        // Written by the agent's log thread a moment after the answer.
        let mut logs = String::new();
        wait_for(
            "the agent to log the refusal",
            Duration::from_secs(30),
            || {
                logs = self.agent.logs();
                Ok(logs.contains("caller check failed; refused"))
            },
        )?;
        let why = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["msg"] == "caller check failed; refused")
            .filter_map(|l| l["check"].as_str().map(str::to_owned))
            .next_back()
            .context("the agent logged no refusal")?;
        println!("   the agent's 403 body: Access Denied: {why}");
        ensure!(
            why.contains("pod check failed"),
            "unexpected refusal: {why}"
        );
        let out = self.sdk(&self.cg_b, &self.node.netns, &env_b)?;
        ensure!(
            out.status.success(),
            "pod B was refused its own credentials"
        );
        println!("   pod B with its own token: served");
        check(interrupted)?;

        step(
            7,
            "The IMDS guard",
            "The same kernel programs see every connect() to the instance metadata service\n(169.254.169.254, a fake here). --imds enforce --imds-allow kube-system/aws-node: the\naws-node pod reaches it; pod A, which should use its own role, gets EPERM at connect().",
        );
        let (aws_node, aws_node_cgroup) = &self.aws_node;
        let pod_client = built_binary("pod-client")?;
        for (who, cgroup, netns, expected) in [
            (
                "kube-system/aws-node",
                aws_node_cgroup.as_path(),
                &self.net_a.netns,
                1,
            ),
            ("default/pod-a", self.cg_a.as_path(), &self.net_a.netns, 0),
        ] {
            let client = pod_command(&pod_client, cgroup, netns)?;
            let tally = harness::imds::connect(client, IMDS_V4, 1)?;
            let outcome = if tally["connected"] == 1 {
                "connected".to_owned()
            } else {
                format!("refused ({} EPERM)", tally["eperm"])
            };
            println!("   {who:<22} connect {IMDS_V4}: {outcome}");
            ensure!(tally["connected"] == expected, "{who}: {tally}");
        }
        let mut imds = Vec::new();
        wait_for("the guard's audit events", Duration::from_secs(30), || {
            imds = harness::imds::events(&self.audit_trail()?).collect();
            Ok(imds.len() >= 2)
        })?;
        for e in &imds {
            println!(
                "   {:<10} {:<18} pod {}/{}  container {}…  pid {} {}",
                text(e, "decision"),
                text(e, "reason"),
                text(e, "namespace"),
                text(e, "pod_name"),
                text(e, "container_id").get(..12).unwrap_or("-"),
                e["pid"],
                text(e, "process"),
            );
        }
        ensure!(
            imds.iter()
                .any(|e| e["decision"] == "allow" && e["pod_uid"] == aws_node.uid.as_str())
                && imds
                    .iter()
                    .any(|e| e["decision"] == "deny" && e["pod_uid"] == self.pod_a.uid.as_str()),
            "the guard's events: {imds:?}"
        );
        println!(
            "   (pod log directories read from {})",
            self.logs.path().display()
        );
        check(interrupted)?;

        step(
            8,
            "The audit trail",
            "One event per request, naming the pod from the kernel's point of view (never the token).",
        );
        let trail = self.audit_trail()?;
        let events: Vec<Value> = trail
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"].is_null())
            .collect();
        for e in &events {
            println!(
                "   {:<10} {:<13} pod {} ({}/{})  pid {} {}  cgroup {}  status {}",
                text(e, "decision"),
                text(e, "reason"),
                text(e, "pod_uid"),
                text(e, "namespace"),
                text(e, "service_account"),
                e["pid"],
                text(e, "process"),
                e["cgroup_id"],
                e["status"],
            );
        }
        ensure!(
            events
                .iter()
                .any(|e| e["decision"] == "allow" && e["pod_uid"] == self.pod_a.uid.as_str()),
            "no allow event for pod A"
        );
        ensure!(
            events.iter().any(|e| e["decision"] == "deny"
                && e["reason"] == "pod-mismatch"
                && e["pod_uid"] == self.pod_b.uid.as_str()),
            "no pod-mismatch event naming pod B"
        );
        ensure!(
            !trail.contains("eyJ"),
            "a token leaked into the audit trail"
        );

        step(
            9,
            "Metrics",
            "Prometheus on :2705 (inside the node namespace).",
        );
        let metrics = scrape_metrics(&self.node.netns)?;
        let shown: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("pod_identity_http_response")
                        || l.starts_with("pod_identity_caller_decisions")
                        || l.starts_with("pod_identity_cache_state")
                        || l.starts_with("pod_identity_attribution_mode")
                        || l.starts_with("pod_identity_imds_connects"))
            })
            .collect();
        for line in &shown {
            println!("   {line}");
        }
        ensure!(
            metrics.contains(
                r#"pod_identity_caller_decisions_total{reason="pod-mismatch",result="deny"}"#
            ),
            "the refusal is not counted"
        );
        Ok(())
    }

    /// Writes the webhook-style environment of a pod and its token file.
    fn write_pod_env(&self, name: &str, token: &str) -> Result<PathBuf> {
        let pod_dir = self.dir.path().join(name);
        std::fs::create_dir_all(&pod_dir)?;
        let token_file = pod_dir.join("eks-pod-identity-token");
        std::fs::write(&token_file, token)?;
        let env_file = pod_dir.join("env");
        std::fs::write(
            &env_file,
            format!(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI={V4_URI}\nAWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={}\nAWS_REGION=us-west-2\n",
                token_file.display()
            ),
        )?;
        Ok(env_file)
    }

    /// The real SDK provider in a process placed in the pod.
    fn sdk(&self, cgroup: &Path, netns: &Netns, env_file: &Path) -> Result<Output> {
        let mut cmd = pod_command(&built_binary("pod-client")?, cgroup, netns)?;
        cmd.arg("sdk-credentials")
            .env_clear()
            .env("AWS_EC2_METADATA_DISABLED", "true");
        for line in std::fs::read_to_string(env_file)?.lines() {
            if let Some((k, v)) = line.split_once('=') {
                cmd.env(k, v);
            }
        }
        cmd.output().context("run the pod's SDK client")
    }

    fn print_keep_instructions(&self) {
        let agent = agent_binary()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        println!("\n── Left running (--keep). Ctrl-C here removes everything.");
        println!(
            "   A shell inside pod A (its cgroup and network namespace, the webhook's environment):"
        );
        println!(
            "     sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} env $(cat {}) bash'",
            self.cg_a.display(),
            self.net_a.netns.name(),
            self.dir.path().join("pod-a/env").display()
        );
        println!(
            "   then: curl -s -H \"Authorization: $(cat $AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)\" $AWS_CONTAINER_CREDENTIALS_FULL_URI"
        );
        println!("   A shell in pod B (hostNetwork):");
        println!(
            "     sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net=/run/netns/{} env $(cat {}) bash'",
            self.cg_b.display(),
            self.node.netns.name(),
            self.dir.path().join("pod-b/env").display()
        );
        println!(
            "   Metrics:   nsenter --net=/run/netns/{} curl -s localhost:2705/metrics",
            self.node.netns.name()
        );
        println!(
            "   Readiness: nsenter --net=/run/netns/{} curl -s localhost:2703/readyz",
            self.node.netns.name()
        );
        println!("   Audit log: {}", self.audit_log().display());
        println!(
            "   Agent:     pid {} ({agent}); its namespace {}",
            self.agent.pid(),
            self.agent.netns_path()
        );
        println!(
            "   EKS Auth (fake): {} inside the node namespace",
            self.fake.endpoint()
        );
        println!("   Pod cgroups under {}", self.tree.root().display());
    }
}

fn show_link(netns: &Netns) -> Result<()> {
    let (link, addrs) = netns.run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let nl = agent::link::Netlink::connect()?;
            let link = nl
                .link_by_name("pod-id-link0")
                .await?
                .context("pod-id-link0 missing")?;
            let kind = agent::link::link_kind(&link)
                .map(|k| k.to_string())
                .unwrap_or_default();
            let addrs: Vec<String> = nl
                .addresses(None)
                .await?
                .iter()
                .filter(|a| a.header.index == link.header.index)
                .filter_map(agent::link::address_of)
                .filter(|a| !matches!(a, std::net::IpAddr::V6(v6) if v6.segments()[0] == 0xfe80))
                .map(|a| a.to_string())
                .collect();
            Ok::<_, anyhow::Error>((kind, addrs))
        })
    })?;
    println!("   pod-id-link0 ({link}) up with {}", addrs.join(", "));
    ensure!(addrs.len() == 2, "expected both addresses, got {addrs:?}");
    Ok(())
}

/// `ASIAFAKE00000001` → `ASIA…0001`.
/// An audit event's string field, or `-`.
fn text<'a>(event: &'a Value, field: &str) -> &'a str {
    event[field].as_str().unwrap_or("-")
}

fn mask(secret: &str) -> String {
    if secret.len() <= 8 {
        return "…".into();
    }
    format!("{}…{}", &secret[..4], &secret[secret.len() - 4..])
}
