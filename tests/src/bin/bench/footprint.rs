//! Section 6: what the agent costs a node besides CPU per request — how
//! long from start to ready, and resident memory idle and with 10 000
//! cached identities.
//!
//! Start → ready is the process's spawn until `/readyz` first answers 200
//! (polled every millisecond from inside the node's namespace), in
//! enforce mode with the link present: it includes loading and attaching
//! the kernel programs, binding the listeners and building the SDK client.
//! The pin directory is emptied before each start, so every start loads
//! the programs rather than adopting a predecessor's.
//!
//! The 10 000 identities are 10 000 distinct tokens of pod A, each
//! exchanged with the fake EKS Auth, in audit mode: there each token is
//! its own cache entry (enforce keys entries by pod and would fold them
//! into one), with the pod registered for each, as in enforce.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::goals::{Goals, Want};
use harness::{
    agent_bin::built_binary,
    agent_proc::AgentProcess,
    cluster::{Cluster, UNLIMITED, Who},
    http,
    pod::pod_command,
    topology::AGENT_V4,
};

const STARTS: usize = 7;
const IDENTITIES: usize = 10_000;
/// The probe port the harness's agents listen on.
const PROBE: u16 = 2703;

pub fn run(cluster: &Cluster, goals: &mut Goals) -> Result<()> {
    let mut starts = Vec::new();
    for _ in 0..STARTS {
        let pins = cluster.node.netns.pin_dir();
        if pins.exists() {
            std::fs::remove_dir_all(&pins).with_context(|| format!("{}", pins.display()))?;
        }
        let args = cluster.agent_args("enforce", &UNLIMITED);
        let started = Instant::now();
        let agent = AgentProcess::spawn(&cluster.node.netns, &args, None)?;
        let ready = cluster.node.netns.run_in(|| ready_after(started))?;
        starts.push(ready.as_secs_f64() * 1e3);
        drop(agent);
    }
    let cache_size = IDENTITIES.to_string();
    let mut args = cluster.agent_args("audit", &UNLIMITED);
    args.extend(["--max-cache-size".to_owned(), cache_size]);
    let agent = AgentProcess::start(&cluster.node.netns, &args)?;
    let idle = resident_mib(agent.pid())?;
    let mut tokens = String::new();
    for _ in 0..IDENTITIES {
        writeln!(tokens, "{}", cluster.own_token(Who::A)?)?;
    }
    let token_file = cluster.dir.file("tokens-", &tokens)?;
    let issued_before = cluster.fake.issued();
    let out = pod_command(
        &built_binary("pod-client")?,
        &cluster.cg_a,
        &cluster.net_a.netns,
    )?
    .args([
        "http-get",
        &SocketAddr::from((AGENT_V4, 80)).to_string(),
        &token_file.to_string_lossy(),
        &IDENTITIES.to_string(),
    ])
    .output()?;
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
    ensure!(
        counts["200"].as_u64() == Some(IDENTITIES as u64),
        "not all served: {counts}"
    );
    let exchanged = cluster.fake.issued() - issued_before;
    ensure!(
        exchanged == IDENTITIES,
        "{exchanged} exchanges with EKS Auth for {IDENTITIES} distinct tokens"
    );
    let full = resident_mib(agent.pid())?;
    drop(agent);
    starts.sort_by(f64::total_cmp);
    println!("\nfootprint (absolute; this machine)");
    println!(
        "{:<48} {:>8.1} ms   (median of {STARTS}; min {:.1}, max {:.1})",
        "start → ready, enforce (load + attach + listen)",
        starts[STARTS / 2],
        starts[0],
        starts[STARTS - 1]
    );
    println!("{:<48} {:>8.1} MiB", "resident memory, idle", idle);
    goals.record(
        "start → ready, enforce (median)",
        starts[STARTS / 2],
        "ms",
        Want::AtMost(25.0),
    );
    goals.record("resident memory, idle", idle, "MiB", Want::AtMost(10.0));
    goals.record(
        "resident memory, 10 000 cached identities",
        full,
        "MiB",
        Want::AtMost(24.0),
    );
    println!(
        "{:<48} {:>8.1} MiB   ({:.2} KiB per identity)",
        format!("resident memory, {IDENTITIES} cached identities"),
        full,
        (full - idle) * 1024.0 / IDENTITIES as f64
    );
    Ok(())
}

/// Polls the probe's `/readyz` every millisecond until it says 200; the
/// time since `started`.
fn ready_after(started: Instant) -> Result<Duration> {
    let probe = SocketAddr::from(([127, 0, 0, 1], PROBE));
    let deadline = started + Duration::from_secs(60);
    loop {
        if http::request(probe, "GET", "/readyz", &[("Host", "localhost")])
            .is_ok_and(|r| r.status == 200)
        {
            return Ok(started.elapsed());
        }
        ensure!(Instant::now() < deadline, "the agent was not ready in 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `VmRSS` of `pid`, in MiB.
fn resident_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}
