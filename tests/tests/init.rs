//! `init` on the real kernel, each case in a fresh network namespace; the
//! result is read back through netlink, never by parsing `ip` output.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Output,
    time::Duration,
};

use agent::link::{Netlink, link_kind, route_oif};
use anyhow::{Context as _, Result, ensure};
use harness::{
    agent_bin::agent_binary,
    netns::Netns,
    topology::{AGENT_V4, AGENT_V6, Node, PodNet},
};

const LINK: &str = "pod-id-link0";

/// What netlink says about the served addresses in a namespace.
#[derive(Debug, PartialEq, Eq)]
struct State {
    /// (index, up, kind) of pod-id-link0.
    link: Option<(u32, bool, String)>,
    /// (address, link index) for the served addresses that are assigned.
    addresses: Vec<(IpAddr, u32)>,
    /// (address, output link index) of main-table host routes to them.
    routes: Vec<(IpAddr, u32)>,
}

fn state(ns: &Netns) -> Result<State> {
    ns.run_in(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let nl = Netlink::connect()?;
            let link = nl.link_by_name(LINK).await?.map(|l| {
                let up = l
                    .header
                    .flags
                    .contains(rtnetlink::packet_route::link::LinkFlags::Up);
                let kind = link_kind(&l).map(|k| k.to_string()).unwrap_or_default();
                (l.header.index, up, kind)
            });
            let mut addresses = Vec::new();
            let mut routes = Vec::new();
            for served in [IpAddr::from(AGENT_V4), IpAddr::from(AGENT_V6)] {
                for a in nl.addresses(Some(served)).await? {
                    addresses.push((served, a.header.index));
                }
                for r in nl.host_routes(served).await? {
                    routes.push((served, route_oif(&r).unwrap_or(0)));
                }
            }
            Ok(State {
                link,
                addresses,
                routes,
            })
        })
    })
}

fn run_init(ns: &Netns, extra: &[&str]) -> Result<Output> {
    ns.command(agent_binary()?)?
        .arg("init")
        .args(extra)
        .output()
        .context("run agent init")
}

/// What `init` wrote: its logs (stdout, as the reference's) and any error
/// (stderr).
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_complete(state: &State) -> Result<u32> {
    let (index, up, _) = state.link.clone().context("no pod-id-link0")?;
    ensure!(up, "link is down: {state:?}");
    for served in [IpAddr::from(AGENT_V4), IpAddr::from(AGENT_V6)] {
        ensure!(
            state.addresses.contains(&(served, index)),
            "{served} not on the link: {state:?}"
        );
        ensure!(
            state.routes.contains(&(served, index)),
            "no route to {served} on the link: {state:?}"
        );
    }
    Ok(index)
}

#[test]
fn fresh_namespace_gets_link_addresses_and_routes_and_a_second_run_changes_nothing() -> Result<()> {
    harness::require_privilege!();
    let ns = Netns::new("epi")?;
    let first = run_init(&ns, &[])?;
    ensure!(first.status.success(), "init failed: {}", printed(&first));
    let after_first = state(&ns)?;
    assert_complete(&after_first)?;

    let second = run_init(&ns, &[])?;
    ensure!(
        second.status.success(),
        "second init failed: {}",
        printed(&second)
    );
    ensure!(
        printed(&second).contains(r#""changed":false"#),
        "second run reported changes: {}",
        printed(&second)
    );
    assert_eq!(state(&ns)?, after_first, "second run changed the namespace");
    Ok(())
}

#[test]
fn route_on_another_link_is_refused_naming_it_and_nothing_changes() -> Result<()> {
    harness::require_privilege!();
    let ns = Netns::new("epi")?;
    ns.ip(&["link", "add", "other0", "type", "bridge"])?;
    ns.ip(&["link", "set", "other0", "up"])?;
    ns.ip(&["route", "add", "169.254.170.23/32", "dev", "other0"])?;
    let before = state(&ns)?;

    let out = run_init(&ns, &[])?;
    ensure!(!out.status.success(), "init accepted a conflicting route");
    let err = printed(&out);
    ensure!(
        err.contains("other0") && err.contains("169.254.170.23"),
        "error does not name the link: {err}"
    );
    assert_eq!(state(&ns)?, before, "a refused init changed something");
    assert!(before.link.is_none());
    Ok(())
}

#[test]
fn ipv6_disabled_sets_up_ipv4_with_a_warning() -> Result<()> {
    harness::require_privilege!();
    let ns = Netns::new("epi")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    let out = run_init(&ns, &[])?;
    let err = printed(&out);
    ensure!(out.status.success(), "init failed without IPv6: {err}");
    ensure!(
        err.contains(r#""level":"warning""#) && err.contains("fd00:ec2::23"),
        "no IPv6 warning: {err}"
    );
    let st = state(&ns)?;
    let (index, up, _) = st.link.clone().context("no link")?;
    ensure!(up);
    ensure!(
        st.addresses == vec![(IpAddr::from(AGENT_V4), index)],
        "{st:?}"
    );
    ensure!(st.routes == vec![(IpAddr::from(AGENT_V4), index)], "{st:?}");
    Ok(())
}

#[test]
fn remove_undoes_exactly_what_init_made() -> Result<()> {
    harness::require_privilege!();
    let ns = Netns::new("epi")?;
    let empty = state(&ns)?;
    let out = run_init(&ns, &[])?;
    ensure!(out.status.success(), "{}", printed(&out));
    for round in ["first", "second (nothing left)"] {
        let out = run_init(&ns, &["--remove"])?;
        ensure!(
            out.status.success(),
            "{round} remove failed: {}",
            printed(&out)
        );
        assert_eq!(state(&ns)?, empty, "{round} remove left something");
    }
    Ok(())
}

#[test]
fn a_pod_namespace_reaches_a_listener_on_the_agent_addresses_over_veth() -> Result<()> {
    harness::require_privilege!();
    let node = Node::bare()?;
    let out = run_init(&node.netns, &[])?;
    ensure!(out.status.success(), "{}", printed(&out));
    let pod = PodNet::attach(&node)?;
    for served in [
        SocketAddr::from((AGENT_V4, 80)),
        SocketAddr::from((AGENT_V6, 80)),
    ] {
        let listener = node
            .netns
            .run_in(|| TcpListener::bind(served).context("bind"))?;
        let accepted = std::thread::spawn(move || -> Result<SocketAddr> {
            let (mut conn, peer) = listener.accept()?;
            conn.write_all(b"hi")?;
            Ok(peer)
        });
        let greeting = pod.netns.run_in(|| {
            let mut conn = TcpStream::connect_timeout(&served, Duration::from_secs(10))
                .with_context(|| format!("connect {served} from the pod"))?;
            let mut buf = String::new();
            conn.read_to_string(&mut buf)?;
            Ok(buf)
        })?;
        let peer = accepted
            .join()
            .map_err(|_| anyhow::anyhow!("accept thread panicked"))??;
        assert_eq!(greeting, "hi");
        let expected: IpAddr = if served.is_ipv4() {
            pod.ipv4.into()
        } else {
            pod.ipv6.into()
        };
        assert_eq!(peer.ip(), expected, "the agent sees the pod's own address");
    }
    Ok(())
}
