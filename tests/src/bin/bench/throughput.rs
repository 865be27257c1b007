//! Section 5: the cached credential path against a static file server. The
//! agent and nginx (serving the agent's own answer, byte for byte, from a
//! file) both listen in the node's network namespace; wrk runs as pod A
//! (its cgroup and network namespace, so the agent attributes every
//! connection), keep-alive and with a new connection per request, for
//! attribution off, audit and enforce. Rounds interleave agent and nginx so
//! both see the same machine; each cell is the median of its rounds.
//!
//! Beside requests per second, each server's own CPU time per request
//! (its processes' user and system time over the run, divided by the
//! requests wrk counted): on two cores shared with wrk,
//! requests per second also depend on how the scheduler splits them,
//! while CPU per request is what a node pays for each answer.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::goals::{Goals, Want};
use harness::{
    agent_proc::AgentProcess,
    cluster::{Cluster, UNLIMITED},
    http,
    pod::pod_command,
    tempdir::TempDir,
    topology::AGENT_V4,
    wait::wait_for,
};

const ROUNDS: usize = 5;
const SECONDS: &str = "3";
const CONNECTIONS: &str = "64";
/// Where nginx listens, beside the agent.
const NGINX_PORT: u16 = 8080;

/// One wrk run: requests per second, latency percentiles (ms) and the
/// server's CPU time per request (µs).
#[derive(Clone, Copy, Default)]
struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
    cpu_us: f64,
}

/// What the two servers are compared under.
#[derive(Clone, Copy)]
enum Connections {
    KeepAlive,
    NewPerRequest,
}

impl Connections {
    fn label(self) -> &'static str {
        match self {
            Connections::KeepAlive => "keep-alive",
            Connections::NewPerRequest => "new connection",
        }
    }
}

pub fn run(cluster: &Cluster, token_file: &Path, goals: &mut Goals) -> Result<()> {
    let token = std::fs::read_to_string(token_file)?;
    let token = token.trim();
    let www = TempDir::new("epia-bench-nginx-")?;
    let mut nginx: Option<Nginx> = None;
    const MODES: [&str; 3] = ["off", "audit", "enforce"];
    const KINDS: [Connections; 2] = [Connections::KeepAlive, Connections::NewPerRequest];
    // (mode, kind) → (agent runs, nginx runs). Each round runs every mode,
    // in a rotated order (an agent of its own, started for the round), so
    // drift over the run — a neighbour's load, the machine warming — weighs
    // on every mode alike and the modes compare with each other.
    let mut runs: [[(Vec<Run>, Vec<Run>); 2]; 3] = Default::default();
    let agent_url = format!("http://{AGENT_V4}/v1/credentials");
    let nginx_url = format!("http://{AGENT_V4}:{NGINX_PORT}/credentials");
    for round in 0..ROUNDS {
        for turn in 0..MODES.len() {
            let m = (round + turn) % MODES.len();
            let args = cluster.agent_args(MODES[m], &UNLIMITED);
            let agent = AgentProcess::start(&cluster.node.netns, &args)?;
            // The first request fills the cache (and, with attribution
            // off in the first round, gives nginx the exact bytes to serve).
            let answer = first_answer(cluster, token)?;
            if nginx.is_none() {
                std::fs::write(www.path().join("credentials"), &answer)?;
                nginx = Some(Nginx::start(cluster, www.path())?);
            }
            let nginx_pids = nginx.as_ref().map(Nginx::pids).transpose()?;
            for (k, connections) in KINDS.into_iter().enumerate() {
                let ours = wrk(cluster, &agent_url, token, connections, &[agent.pid()])?;
                let theirs = wrk(
                    cluster,
                    &nginx_url,
                    token,
                    connections,
                    nginx_pids.as_deref().unwrap_or_default(),
                )?;
                runs[m][k].0.push(ours);
                runs[m][k].1.push(theirs);
            }
            drop(agent);
        }
    }
    let mut table = Vec::new();
    for (m, mode) in MODES.into_iter().enumerate() {
        for (k, connections) in KINDS.into_iter().enumerate() {
            let (ours, theirs) = &mut runs[m][k];
            table.push((mode, connections, median(ours), median(theirs)));
        }
    }
    println!(
        "\ncached credential request vs nginx serving the same {} bytes (wrk -c{CONNECTIONS}, {SECONDS} s, median of {ROUNDS} rounds, each running every mode in a rotated order with agent and nginx interleaved; ratio = agent ÷ nginx)",
        std::fs::metadata(www.path().join("credentials"))?.len()
    );
    println!(
        "{:<8} {:<15} {:>11} {:>11} {:>6}   {:>15} {:>15} {:>9}   {:>17}",
        "mode",
        "connections",
        "agent rps",
        "nginx rps",
        "ratio",
        "agent p50/p99",
        "nginx p50/p99",
        "p99 ratio",
        "CPU µs/req a / n"
    );
    for (mode, connections, ours, theirs) in &table {
        println!(
            "{:<8} {:<15} {:>11.0} {:>11.0} {:>6.2}   {:>6.2}/{:<6.2}ms {:>6.2}/{:<6.2}ms {:>9.2}   {:>7.2} / {:<7.2}",
            mode,
            connections.label(),
            ours.rps,
            theirs.rps,
            ours.rps / theirs.rps,
            ours.p50,
            ours.p99,
            theirs.p50,
            theirs.p99,
            ours.p99 / theirs.p99,
            ours.cpu_us,
            theirs.cpu_us
        );
    }
    for connections in [Connections::KeepAlive, Connections::NewPerRequest] {
        let cell = |mode: &str| {
            table
                .iter()
                .find(|(m, c, _, _)| *m == mode && c.label() == connections.label())
                .map_or((Run::default(), Run::default()), |(_, _, ours, theirs)| {
                    (*ours, *theirs)
                })
        };
        let ((off, _), (enforce, nginx)) = (cell("off"), cell("enforce"));
        println!(
            "enforce ÷ off, {:<15} {:.2}",
            connections.label(),
            enforce.rps / off.rps
        );
        let (vs_nginx, vs_off, p99) = match connections {
            Connections::KeepAlive => (
                "cached request rps, keep-alive, enforce ÷ nginx",
                "enforce ÷ off rps, keep-alive",
                Some("cached request p99, keep-alive, enforce ÷ nginx"),
            ),
            Connections::NewPerRequest => (
                "cached request rps, new connection, enforce ÷ nginx",
                "enforce ÷ off rps, new connection",
                None,
            ),
        };
        goals.record(vs_nginx, enforce.rps / nginx.rps, "", Want::AtLeast(1.0));
        goals.record(vs_off, enforce.rps / off.rps, "", Want::AtLeast(0.97));
        if let Some(p99) = p99 {
            goals.record(p99, enforce.p99 / nginx.p99, "", Want::AtMost(1.0));
        }
    }
    Ok(())
}

/// The agent's answer to pod A, fetched once (from the node's namespace:
/// with attribution on, a node process is refused, so this also proves
/// the cache is warm only for pod A's runs below).
fn first_answer(cluster: &Cluster, token: &str) -> Result<String> {
    let target = SocketAddr::from((AGENT_V4, 80));
    let host = http::host_header(target);
    // From pod A itself, through the harness's client, in its namespaces.
    let reply = cluster.net_a.netns.run_in(|| {
        http::request(
            target,
            "GET",
            "/v1/credentials",
            &[("Host", &host), ("Authorization", token)],
        )
    })?;
    match reply.status {
        200 => Ok(reply.body),
        // Attribution on: the test process is no pod; the pod's own first
        // request (wrk's) fills the cache. The bytes are the same either way.
        403 => Ok(String::new()),
        other => bail!("agent answered {other}: {}", reply.body),
    }
}

/// wrk as pod A against `url`, served by the processes `server`.
fn wrk(
    cluster: &Cluster,
    url: &str,
    token: &str,
    connections: Connections,
    server: &[u32],
) -> Result<Run> {
    let mut cmd = pod_command(
        Path::new("/usr/bin/wrk"),
        &cluster.cg_a,
        &cluster.net_a.netns,
    )?;
    cmd.args(["-t2", "-c", CONNECTIONS, "-d", SECONDS, "--latency"])
        .args(["-H", &format!("Host: {AGENT_V4}")])
        .args(["-H", &format!("Authorization: {token}")]);
    if let Connections::NewPerRequest = connections {
        cmd.args(["-H", "Connection: close"]);
    }
    let cpu_before = on_cpu_ns(server)?;
    let out = cmd
        .arg(url)
        .output()
        .context("run wrk (cargo xtask setup installs it)")?;
    let cpu = on_cpu_ns(server)?.saturating_sub(cpu_before);
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !text.contains("Non-2xx or 3xx responses"),
        "wrk against {url} got errors:\n{text}"
    );
    let field = |prefix: &str| -> Option<&str> {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
    };
    let rps = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    // "  123456 requests in 3.00s, 45.6MB read"
    let requests: f64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{text}"))?;
    Ok(Run {
        rps,
        p50: field("50%").and_then(millis).unwrap_or(f64::NAN),
        p99: field("99%").and_then(millis).unwrap_or(f64::NAN),
        cpu_us: cpu as f64 / 1e3 / requests.max(1.0),
    })
}

/// Nanoseconds `pids` have run on a CPU so far, user and system time
/// together (`/proc/<pid>/stat`: it keeps the time of threads that have
/// ended, which per-thread counters lose; in clock ticks, 10 ms here —
/// fine against the seconds a run takes).
fn on_cpu_ns(pids: &[u32]) -> Result<u64> {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ns_per_tick = 1_000_000_000 / u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100);
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
        // The fields after the command name (which may hold spaces and
        // parentheses): state is the 3rd field, utime the 14th, stime the 15th.
        let after_name = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest)
            .unwrap_or_default();
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{path}: field {n} in {stat:?}"))
        };
        total += (ticks(14)? + ticks(15)?) * ns_per_tick;
    }
    Ok(total)
}

/// wrk's `412.00us` / `2.10ms` / `1.02s` in milliseconds.
fn millis(value: &str) -> Option<f64> {
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => return None,
    })
}

fn median(runs: &mut [Run]) -> Run {
    runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// nginx serving `www` on the agent's address, port [`NGINX_PORT`], in the
/// node's network namespace: two workers (one per core here, as the agent's
/// runtime), no access log, keep-alive without a request cap.
struct Nginx {
    child: Child,
}

impl Nginx {
    /// The master and its workers.
    fn pids(&self) -> Result<Vec<u32>> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
            .context("nginx's workers")?;
        let mut pids = vec![master];
        pids.extend(
            children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
        Ok(pids)
    }

    fn start(cluster: &Cluster, www: &Path) -> Result<Nginx> {
        let conf = www.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root root;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  server {{\n    listen {AGENT_V4}:{NGINX_PORT};\n    root {dir};\n    location / {{ default_type application/json; }}\n  }}\n}}\n",
                dir = www.display()
            ),
        )?;
        let mut cmd: Command = cluster.node.netns.command("/usr/sbin/nginx")?;
        let child = cmd
            .args(["-c", &conf.to_string_lossy(), "-p", &www.to_string_lossy()])
            .spawn()
            .context("start nginx (cargo xtask setup installs nginx-light)")?;
        let nginx = Nginx { child };
        let target = SocketAddr::from((AGENT_V4, NGINX_PORT));
        wait_for("nginx to listen", Duration::from_secs(30), || {
            Ok(cluster
                .node
                .netns
                .run_in(|| http::request(target, "GET", "/credentials", &[("Host", "x")]))
                .is_ok_and(|r| r.status == 200))
        })?;
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too (SIGKILL would leave
        // them running, holding the namespace).
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
