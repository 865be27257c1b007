//! The kernel half on the real kernel: eBPF loaded and attached to a test's
//! own cgroup subtree, pods in kubelet-shaped cgroups and their own network
//! namespaces, a server that asks the kernel who opened each connection.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Stdio},
    sync::Arc,
    time::Duration,
};

use agent::{
    caller::attribution::{AttachOptions, Attribution},
    caller::cgroup::CgroupResolver,
};
use anyhow::{Context as _, Result, ensure};
use harness::{
    cgroups::{CgroupTree, Driver, PodSpec},
    netns::Netns,
    pod::pod_command,
    probe_server::{Observation, ProbeServer},
    topology::{AGENT_V4, AGENT_V6, Node, PodNet},
    wait::wait_for,
};

const POD_CLIENT: &str = env!("CARGO_BIN_EXE_pod-client");

/// Declared in drop order: server threads stop, programs detach, then the
/// namespaces and cgroups go.
struct Fixture {
    server: ProbeServer,
    attribution: Arc<Attribution>,
    resolver: CgroupResolver,
    node: Node,
    tree: CgroupTree,
}

fn fixture(extra_listeners: &[SocketAddr]) -> Result<Fixture> {
    let tree = CgroupTree::new()?;
    let node = Node::with_agent_addresses()?;
    let attribution = Arc::new(
        Attribution::attach(&AttachOptions {
            cgroup: tree.root().to_owned(),
            addresses: vec![AGENT_V4.into(), AGENT_V6.into()],
            port: 80,
            probe_port: 0,
            pin_dir: None,
            imds: None,
        })?
        .0,
    );
    let mut listen: Vec<SocketAddr> = vec![(AGENT_V4, 80).into(), (AGENT_V6, 80).into()];
    listen.extend_from_slice(extra_listeners);
    let server = ProbeServer::start(&node.netns, &listen, attribution.clone())?;
    let resolver = CgroupResolver::new(tree.mount())?;
    Ok(Fixture {
        server,
        attribution,
        resolver,
        node,
        tree,
    })
}

/// A running pod client and the pid it reported.
struct Client {
    child: Child,
    pid: u32,
}

/// Spawns a pod client in `cgroup` and `netns` (a pod's own namespace, or the
/// node's for a hostNetwork pod).
fn spawn_client(
    cgroup: &std::path::Path,
    netns: &Netns,
    target: SocketAddr,
    count: u32,
) -> Result<Client> {
    let mut cmd = pod_command(POD_CLIENT.as_ref(), cgroup, netns)?;
    let mut child = cmd
        .args(["connect", &target.to_string(), &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn pod-client")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let pid = line
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("pod-client printed {line:?}"))?;
    Ok(Client { child, pid })
}

impl Client {
    fn finish(mut self) -> Result<()> {
        let status = self.child.wait()?;
        ensure!(status.success(), "pod-client {} failed: {status}", self.pid);
        Ok(())
    }
}

fn next_observation(fx: &Fixture) -> Result<Observation> {
    fx.server
        .observations
        .recv_timeout(Duration::from_secs(60))
        .context("no connection reached the server")
}

/// Waits (generously) until the kernel tracks no connection any more.
fn wait_until_no_tracked_connections(fx: &Fixture) -> Result<()> {
    wait_for("the kernel map to empty", Duration::from_secs(60), || {
        Ok(fx.attribution.tracked_connections() == 0)
    })
}

#[test]
fn each_address_family_names_the_calling_pod() -> Result<()> {
    harness::require_privilege!();
    let fx = fixture(&[])?;
    let pod_a = PodSpec::new(Driver::Systemd);
    let pod_b = PodSpec::new(Driver::Cgroupfs);
    let cg_a = fx.tree.pod(&pod_a)?;
    let cg_b = fx.tree.pod(&pod_b)?;
    let net_a = PodNet::attach(&fx.node)?;

    // (what, pod, cgroup, network namespace, destination)
    let v4: SocketAddr = (AGENT_V4, 80).into();
    let v6: SocketAddr = (AGENT_V6, 80).into();
    let mapped: SocketAddr = "[::ffff:169.254.170.23]:80".parse()?;
    let cases = [
        ("pod netns, IPv4", &pod_a, &cg_a, &net_a.netns, v4),
        ("pod netns, IPv6", &pod_a, &cg_a, &net_a.netns, v6),
        (
            "pod netns, dual-stack socket to IPv4-mapped",
            &pod_a,
            &cg_a,
            &net_a.netns,
            mapped,
        ),
        ("hostNetwork pod, IPv4", &pod_b, &cg_b, &fx.node.netns, v4),
        ("hostNetwork pod, IPv6", &pod_b, &cg_b, &fx.node.netns, v6),
        (
            "hostNetwork pod, IPv4-mapped",
            &pod_b,
            &cg_b,
            &fx.node.netns,
            mapped,
        ),
    ];
    for (what, pod, cgroup, net, target) in cases {
        let client = spawn_client(cgroup, net, target, 1)?;
        let pid = client.pid;
        let seen = next_observation(&fx).context(what)?;
        client.finish()?;
        let caller = seen
            .caller
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("{what}: connection from {} not attributed", seen.peer))?;
        assert_eq!(
            caller.cgroup_id,
            CgroupResolver::id_of(cgroup)?,
            "{what}: cgroup id"
        );
        assert_eq!(caller.pid, pid, "{what}: pid");
        let path = fx
            .resolver
            .path_of(caller.cgroup_id)?
            .context("cgroup vanished")?;
        let resolved = fx
            .tree
            .layout()
            .pod_of_path(&path)?
            .with_context(|| format!("{what}: {path} is not a pod"))?;
        assert_eq!(&*resolved.pod_uid, pod.uid, "{what}: pod UID");
        assert_eq!(
            resolved.container_id.as_deref(),
            Some(pod.container_id.as_str()),
            "{what}"
        );
    }
    wait_until_no_tracked_connections(&fx)
}

#[test]
fn other_destinations_are_not_recorded() -> Result<()> {
    harness::require_privilege!();
    // Same address, other port; and the node's own veth address on port 80.
    let other_port: SocketAddr = (AGENT_V4, 8080).into();
    let tree_pod = PodSpec::new(Driver::Systemd);
    let fx = fixture(&[other_port])?;
    let cgroup = fx.tree.pod(&tree_pod)?;
    let net = PodNet::attach(&fx.node)?;
    let node_side: SocketAddr = (net.node_ipv4, 80).into();
    let node_side_server =
        ProbeServer::start(&fx.node.netns, &[node_side], fx.attribution.clone())?;

    for target in [other_port, node_side] {
        let client = spawn_client(&cgroup, &net.netns, target, 1)?;
        let seen = if target == node_side {
            node_side_server
                .observations
                .recv_timeout(Duration::from_secs(60))?
        } else {
            next_observation(&fx)?
        };
        // While the connection is still open on the client side.
        assert_eq!(
            fx.attribution.tracked_connections(),
            0,
            "{target}: recorded"
        );
        client.finish()?;
        assert_eq!(
            seen.caller.map_err(anyhow::Error::msg)?,
            None,
            "{target}: attributed"
        );
    }
    Ok(())
}

#[test]
fn ten_thousand_cycles_from_two_pods_leave_nothing_and_never_confuse() -> Result<()> {
    harness::require_privilege!();
    const PER_CLIENT: u32 = 2_500;
    let fx = fixture(&[])?;
    let pods = [
        PodSpec::new(Driver::Systemd),
        PodSpec::new(Driver::Cgroupfs),
    ];
    let mut expected_cgroup: HashMap<std::net::IpAddr, u64> = HashMap::new();
    let mut nets = Vec::new();
    let mut clients = Vec::new();
    for pod in &pods {
        let cgroup = fx.tree.pod(pod)?;
        let net = PodNet::attach(&fx.node)?;
        let id = CgroupResolver::id_of(&cgroup)?;
        expected_cgroup.insert(net.ipv4.into(), id);
        expected_cgroup.insert(net.ipv6.into(), id);
        // Two processes per pod, one per family, all four at once.
        clients.push(spawn_client(
            &cgroup,
            &net.netns,
            (AGENT_V4, 80).into(),
            PER_CLIENT,
        )?);
        clients.push(spawn_client(
            &cgroup,
            &net.netns,
            (AGENT_V6, 80).into(),
            PER_CLIENT,
        )?);
        nets.push(net);
    }
    let pids: Vec<u32> = clients.iter().map(|c| c.pid).collect();
    let total = PER_CLIENT as usize * clients.len();
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    for i in 0..total {
        let seen = next_observation(&fx).with_context(|| format!("after {i} connections"))?;
        let caller = seen
            .caller
            .map_err(anyhow::Error::msg)?
            .with_context(|| format!("connection {i} from {} not attributed", seen.peer))?;
        let peer_ip = match seen.peer.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.into(), Into::into),
            v4 => v4,
        };
        assert_eq!(
            Some(&caller.cgroup_id),
            expected_cgroup.get(&peer_ip),
            "connection {i} from {peer_ip} attributed to the wrong cgroup"
        );
        assert!(
            pids.contains(&caller.pid),
            "connection {i}: unknown pid {}",
            caller.pid
        );
        *per_pid.entry(caller.pid).or_default() += 1;
    }
    for client in clients {
        client.finish()?;
    }
    assert!(
        per_pid.values().all(|&n| n == PER_CLIENT as usize),
        "per-process counts {per_pid:?}"
    );
    wait_until_no_tracked_connections(&fx)
}

/// The port the foreign `connect4` program refuses (so its running shows).
const FOREIGN_REFUSED_PORT: u16 = 9;

/// A pod-client connect that must fail because the foreign program refused
/// it (EPERM), not because nothing listens (ECONNREFUSED).
fn refused_by_foreign_program(cgroup: &std::path::Path, net: &PodNet) -> Result<bool> {
    let target: SocketAddr = (net.node_ipv4, FOREIGN_REFUSED_PORT).into();
    let out = pod_command(POD_CLIENT.as_ref(), cgroup, &net.netns)?
        .args(["connect", &target.to_string(), "1"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    Ok(!out.status.success() && stderr.contains("Operation not permitted"))
}

#[test]
fn the_programs_coexist_with_a_cnis_in_either_order_and_either_attach_api() -> Result<()> {
    harness::require_privilege!();
    use harness::foreign_bpf::{AttachApi, ForeignPrograms, attached_counts};
    for api in [AttachApi::LegacyMulti, AttachApi::Link] {
        for ours_first in [true, false] {
            let what = format!("{api:?}, ours first: {ours_first}");
            let tree = CgroupTree::new()?;
            let node = Node::with_agent_addresses()?;
            let pod = PodSpec::new(Driver::Systemd);
            let cgroup = tree.pod(&pod)?;
            let net = PodNet::attach(&node)?;
            let attach_ours = || {
                Attribution::attach(&AttachOptions {
                    cgroup: tree.root().to_owned(),
                    addresses: vec![AGENT_V4.into()],
                    port: 80,
                    probe_port: 0,
                    pin_dir: None,
                    imds: None,
                })
                .map(|(attribution, _)| attribution)
                .with_context(|| format!("{what}: attaching ours"))
            };
            let attach_theirs = || {
                ForeignPrograms::attach(tree.root(), api, FOREIGN_REFUSED_PORT)
                    .with_context(|| format!("{what}: attaching theirs"))
            };
            let (ours, theirs) = if ours_first {
                let ours = attach_ours()?;
                (ours, attach_theirs()?)
            } else {
                let theirs = attach_theirs()?;
                (attach_ours()?, theirs)
            };
            assert_eq!(attached_counts(tree.root())?, (2, 2), "{what}");
            // Both run: ours attributes, theirs refuses its port.
            let ours = Arc::new(ours);
            let server = ProbeServer::start(&node.netns, &[(AGENT_V4, 80).into()], ours.clone())?;
            let client = spawn_client(&cgroup, &net.netns, (AGENT_V4, 80).into(), 1)?;
            let seen = server
                .observations
                .recv_timeout(Duration::from_secs(60))
                .context("no connection reached the server")?;
            client.finish()?;
            let caller = seen
                .caller
                .map_err(anyhow::Error::msg)?
                .with_context(|| format!("{what}: not attributed"))?;
            assert_eq!(caller.cgroup_id, CgroupResolver::id_of(&cgroup)?, "{what}");
            ensure!(
                refused_by_foreign_program(&cgroup, &net)?,
                "{what}: theirs did not run"
            );
            // Detaching ours leaves theirs attached and working.
            drop(server);
            drop(ours);
            assert_eq!(
                attached_counts(tree.root())?,
                (1, 1),
                "{what}: after ours left"
            );
            ensure!(
                refused_by_foreign_program(&cgroup, &net)?,
                "{what}: theirs stopped with ours"
            );
            drop(theirs);
            assert_eq!(attached_counts(tree.root())?, (0, 0), "{what}: cleanup");
        }
    }
    Ok(())
}

#[test]
fn one_user_cannot_hold_more_than_its_quota_of_records() -> Result<()> {
    harness::require_privilege!();
    use harness::privilege::NOBODY;
    use std::os::unix::fs::chown;
    let quota = agent_ebpf::MAX_RECORDS_PER_OWNER;
    let fx = fixture(&[])?;
    // An unprivileged user in a cgroup delegated to it, opening more
    // connections than its quota in namespaces of its own: records the
    // agent never reads.
    let attacker = fx.tree.create("user.slice/attacker")?;
    for path in [attacker.clone(), attacker.join("cgroup.procs")] {
        chown(&path, Some(NOBODY), Some(NOBODY))?;
    }
    let wanted = quota + 200;
    let mut hold = pod_command(POD_CLIENT.as_ref(), &attacker, &fx.node.netns)?
        .args([
            "as-user",
            &NOBODY.to_string(),
            &attacker.to_string_lossy(),
            "userns-hold",
            &SocketAddr::from((AGENT_V4, 80)).to_string(),
            &wanted.to_string(),
            "600",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(hold.stdout.take().context("stdout")?).read_line(&mut line)?;
    let result = (|| -> Result<()> {
        ensure!(
            line.trim() == format!("held {wanted}"),
            "attacker: {line:?}"
        );
        let tracked = fx.attribution.tracked_connections();
        ensure!(
            tracked == quota as usize,
            "{tracked} records for one user holding {wanted} connections (quota {quota})"
        );
        // Everyone else is still attributed.
        let pod = PodSpec::new(Driver::Cgroupfs);
        let cgroup = fx.tree.pod(&pod)?;
        let net = PodNet::attach(&fx.node)?;
        let client = spawn_client(&cgroup, &net.netns, (AGENT_V4, 80).into(), 1)?;
        let seen = next_observation(&fx)?;
        client.finish()?;
        ensure!(
            seen.caller.map_err(anyhow::Error::msg)?.is_some(),
            "a pod went unattributed while a user held its quota"
        );
        Ok(())
    })();
    let _ = hold.kill();
    let _ = hold.wait();
    result?;
    // The user's records go with its sockets.
    wait_until_no_tracked_connections(&fx)
}
