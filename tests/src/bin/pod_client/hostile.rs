//! What a hostile process on the node does to the agent: shed root and
//! place itself in a cgroup subtree it owns, spray connections from its own
//! user+network namespace under a victim's source address, or hold
//! thousands of idle connections.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

fn parse<T: std::str::FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    raw.parse().map_err(|e| format!("{raw}: {e}"))
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `as-user UID CGROUP …`: drops to UID (uid and gid, no supplementary
/// groups), then — as that user, with no privilege left — creates CGROUP
/// (a path in a subtree delegated to it) and moves itself in.
pub fn become_user(uid: &str, cgroup: &str) -> Result<(), String> {
    let uid = drop_to(uid)?;
    let dir = Path::new(cgroup);
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir -p {cgroup}: {e}"))?;
    std::fs::write(dir.join("cgroup.procs"), "0")
        .map_err(|e| format!("join {cgroup} as uid {uid}: {e}"))
}

/// `as-uid UID …`: drops to UID (uid and gid, no supplementary groups)
/// where the process already is, as a pod's non-root process runs.
pub fn drop_to(uid: &str) -> Result<u32, String> {
    let uid: u32 = parse(uid)?;
    // SAFETY: plain credential syscalls on this process, single-threaded here.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_error("setgroups"));
        }
        if libc::setgid(uid) != 0 {
            return Err(os_error("setgid"));
        }
        if libc::setuid(uid) != 0 {
            return Err(os_error("setuid"));
        }
        // Changing uid made the process non-dumpable, which leaves its
        // /proc files root's; a user's own process has them.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            return Err(os_error("prctl(PR_SET_DUMPABLE)"));
        }
    }
    Ok(uid)
}

/// `userns-spray TARGET SOURCES PORT_LO PORT_HI ROUNDS`: an unprivileged
/// user's own user+network namespace where it holds the victims' source
/// addresses (comma-separated) and TARGET itself; each round opens a
/// connection to TARGET from every source address and port in the range,
/// holds them all, then closes them all. Every one of those connect()s
/// runs the agent's kernel programs with a 4-tuple a victim may be using
/// right now in the node's namespace.
pub fn userns_spray(
    target: &str,
    sources: &str,
    port_lo: &str,
    port_hi: &str,
    rounds: &str,
) -> Result<(), String> {
    let target: SocketAddr = parse(target)?;
    let sources: Vec<IpAddr> = sources.split(',').map(parse).collect::<Result<_, _>>()?;
    let (lo, hi): (u16, u16) = (parse(port_lo)?, parse(port_hi)?);
    let rounds: u32 = parse(rounds)?;
    enter_own_namespaces()?;
    let mut addrs: Vec<IpAddr> = sources.clone();
    if !addrs.contains(&target.ip()) {
        addrs.push(target.ip());
    }
    ip(&["link", "set", "lo", "up"])?;
    for addr in &addrs {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        ip(&["addr", "add", &format!("{addr}/{prefix}"), "dev", "lo"])?;
    }
    let listener = TcpListener::bind(target).map_err(|e| format!("bind {target}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut connected = 0u64;
    for _ in 0..rounds {
        let mut held = Vec::new();
        for source in &sources {
            for port in lo..=hi {
                match connect_from(SocketAddr::new(*source, port), target) {
                    Ok(stream) => {
                        held.push(stream);
                        connected += 1;
                    }
                    Err(e) => return Err(format!("connect from {source}:{port}: {e}")),
                }
            }
        }
        // Drain the accept queue so the next round's SYNs are not dropped.
        while listener.accept().is_ok() {}
        drop(held);
    }
    println!("{}", json!({ "connected": connected, "rounds": rounds }));
    Ok(())
}

/// `userns-hold TARGET COUNT SECONDS`: in an unprivileged user's own
/// user+network namespace, COUNT connections to TARGET (its own listener
/// there, never the agent's), all held for SECONDS. Each is a record in the
/// agent's kernel table that the agent never reads. Prints `held N` once
/// they are all open, then sleeps.
pub fn userns_hold(target: &str, count: &str, seconds: &str) -> Result<(), String> {
    let target: SocketAddr = parse(target)?;
    let count: usize = parse(count)?;
    let seconds: f64 = parse(seconds)?;
    raise_fd_limit(2 * count + 64)?;
    enter_own_namespaces()?;
    ip(&["link", "set", "lo", "up"])?;
    let prefix = if target.is_ipv4() { 32 } else { 128 };
    ip(&[
        "addr",
        "add",
        &format!("{}/{prefix}", target.ip()),
        "dev",
        "lo",
    ])?;
    let listener = TcpListener::bind(target).map_err(|e| format!("bind {target}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut held = Vec::with_capacity(2 * count);
    for i in 0..count {
        let stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .map_err(|e| format!("connect #{i}: {e}"))?;
        held.push(stream);
        // Keep the accept queue short: take what has arrived.
        while let Ok((accepted, _)) = listener.accept() {
            held.push(accepted);
        }
    }
    println!("held {count}");
    std::thread::sleep(Duration::from_secs_f64(seconds));
    drop(held);
    Ok(())
}

/// unshare(CLONE_NEWUSER | CLONE_NEWNET) and map this user to root inside:
/// what any unprivileged user may do, and what grants CAP_NET_ADMIN over
/// the new network namespace.
fn enter_own_namespaces() -> Result<(), String> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: unshare of this (single-threaded) process.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        return Err(os_error("unshare(user+net)"));
    }
    let write = |file: &str, text: String| {
        std::fs::write(format!("/proc/self/{file}"), text).map_err(|e| format!("{file}: {e}"))
    };
    write("setgroups", "deny".into())?;
    write("uid_map", format!("0 {uid} 1"))?;
    write("gid_map", format!("0 {gid} 1"))
}

/// Listens at `path` for one successor and relays its handover to the
/// serving agent at `real`: hello, challenge, proof, listeners (kept: their
/// number), and what the successor says then.
fn relay(
    path: &std::path::Path,
    real: &std::path::Path,
    wait: Option<Duration>,
) -> Result<(usize, String), String> {
    use agent::handover::wire::{Channel, Listener};
    use std::os::fd::AsRawFd as _;

    let listener = Listener::bind(path).map_err(|e| format!("bind: {e}"))?;
    // The test waits on this process: never longer than a minute.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        eprintln!("relay: no handover within 60 s");
        std::process::exit(3);
    });
    let taker = listener.accept().map_err(|e| e.to_string())?;
    let giver = Channel::connect(real).map_err(|e| format!("connect: {e}"))?;
    let pass = |from: &Channel, to: &Channel| -> Result<_, String> {
        let (message, fds) = from.receive(wait).map_err(|e| e.to_string())?;
        let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        to.send(&message, &raw).map_err(|e| e.to_string())?;
        Ok((message, fds))
    };
    pass(&taker, &giver)?; // hello
    pass(&giver, &taker)?; // challenge
    pass(&taker, &giver)?; // proof
    let (_, kept) = pass(&giver, &taker)?; // the listeners, kept here too
    let said = match pass(&taker, &giver) {
        Ok((message, _)) => format!("{message:?}"),
        Err(e) => e,
    };
    Ok((kept.len(), said))
}

fn ip(args: &[&str]) -> Result<(), String> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("ip {args:?}: {status}"))
}

/// A connection from exactly `source` (address and port) to `target`.
fn connect_from(source: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

/// `hold ADDR COUNT SECONDS`: keeps COUNT idle connections to ADDR open
/// for SECONDS, opening a new one whenever the server closes one.
pub fn hold(addr: &str, count: &str, seconds: &str) -> Result<(), String> {
    let addr: SocketAddr = parse(addr)?;
    let count: usize = parse(count)?;
    let seconds: f64 = parse(seconds)?;
    raise_fd_limit(count + 64)?;
    let (mut opened, mut closed_by_server, mut failed) = (0u64, 0u64, 0u64);
    let mut open = |failed: &mut u64| -> Option<TcpStream> {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                opened += 1;
                Some(s)
            }
            Err(_) => {
                *failed += 1;
                None
            }
        }
    };
    let filling = Instant::now();
    let mut streams: Vec<TcpStream> = (0..count).filter_map(|_| open(&mut failed)).collect();
    let mut most_open = streams.len();
    // The first line says the first fill is done (see the tests' `filled`);
    // the hold's time counts from here, however long the fill took.
    let fill_ms = filling.elapsed().as_millis() as u64;
    println!("{}", json!({ "filled": streams.len(), "fill_ms": fill_ms }));
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        let mut fds: Vec<libc::pollfd> = streams
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid pollfd array of its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        let mut kept = Vec::with_capacity(streams.len());
        for (mut stream, fd) in streams.into_iter().zip(&fds) {
            if fd.revents == 0 {
                kept.push(stream);
                continue;
            }
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(n) if n > 0 => kept.push(stream),
                _ => closed_by_server += 1,
            }
        }
        streams = kept;
        while streams.len() < count && Instant::now() < until {
            match open(&mut failed) {
                Some(s) => streams.push(s),
                None => break,
            }
        }
        most_open = most_open.max(streams.len());
    }
    println!(
        "{}",
        json!({
            "opened": opened,
            "closed_by_server": closed_by_server,
            "connect_failures": failed,
            "most_open": most_open,
        })
    );
    Ok(())
}

fn raise_fd_limit(want: usize) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(os_error("getrlimit"));
        }
        limit.rlim_cur = limit.rlim_max.min(want as libc::rlim_t).max(limit.rlim_cur);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(os_error("setrlimit"));
        }
    }
    if (limit.rlim_cur as usize) < want {
        return Err(format!(
            "RLIMIT_NOFILE hard limit {} is below the {want} descriptors needed",
            limit.rlim_max
        ));
    }
    Ok(())
}

/// `socket-get ADDR TOKEN_FILE KIND`: one credential request over a socket
/// of KIND — `plain` TCP, `fastopen` (the request in the SYN, whose cookie
/// request option leaves no room for the agent's stamp) or `mptcp` — as a
/// process may choose its socket options. Prints the HTTP status.
pub fn socket_get(addr: &str, token_file: &str, kind: &str) -> Result<(), String> {
    let addr: SocketAddr = parse(addr)?;
    let token = std::fs::read_to_string(token_file).map_err(|e| format!("{token_file}: {e}"))?;
    let request = format!(
        "GET /v1/credentials HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
        harness::http::host_header(addr),
        token.trim()
    );
    let protocol = match kind {
        "plain" | "fastopen" => None,
        "mptcp" => Some(Protocol::MPTCP),
        other => return Err(format!("unknown socket kind {other}")),
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, protocol)
        .map_err(|e| format!("socket({kind}): {e}"))?;
    let mut rest = request.as_bytes();
    if kind == "fastopen" {
        let sent = socket
            .send_to_with_flags(rest, &addr.into(), libc::MSG_FASTOPEN)
            .map_err(|e| format!("sendto(MSG_FASTOPEN): {e}"))?;
        rest = &rest[sent..];
    } else {
        socket
            .connect(&addr.into())
            .map_err(|e| format!("connect: {e}"))?;
    }
    let mut stream = TcpStream::from(socket);
    std::io::Write::write_all(&mut stream, rest).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| format!("no status in {answer:?}"))?;
    println!("{status}");
    Ok(())
}

/// `squat ADDR`: what a root process on the node tries to receive the
/// agent's connections — bind ADDR's port on ADDR itself and on the
/// wildcard address, plainly, with `SO_REUSEADDR` and with `SO_REUSEPORT`
/// (joining a reuseport group) — and listen. Prints, per attempt, `"bound"`
/// or the error kind it got.
pub fn squat(addr: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let wildcard = SocketAddr::new(
        match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        },
        addr.port(),
    );
    let mut outcomes = serde_json::Map::new();
    for (name, target, reuseaddr, reuseport) in [
        ("plain", addr, false, false),
        ("reuseaddr", addr, true, false),
        ("reuseport", addr, false, true),
        ("reuseaddr+reuseport", addr, true, true),
        ("wildcard-reuseaddr", wildcard, true, false),
        ("wildcard-reuseport", wildcard, false, true),
    ] {
        let attempt = (|| -> std::io::Result<Socket> {
            let socket = Socket::new(
                Domain::for_address(target),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_reuse_address(reuseaddr)?;
            socket.set_reuse_port(reuseport)?;
            socket.bind(&target.into())?;
            socket.listen(16)?;
            Ok(socket)
        })();
        let outcome = match attempt {
            Ok(_) => "bound".to_owned(),
            Err(e) => format!("{:?}", e.kind()),
        };
        outcomes.insert(name.to_owned(), outcome.into());
    }
    println!("{}", serde_json::Value::Object(outcomes));
    Ok(())
}

/// `impostor take SOCKET`: a root process that knows the handover
/// protocol but not the agent's key asks the serving agent for its
/// listeners. Prints `{"descriptors": N, "outcome": "…"}`.
///
/// `impostor relay SOCKET`: the same process moves the serving agent's
/// socket aside (root owns the directory), takes its place, and relays one
/// successor's handover to it message by message, keeping a copy of any
/// listeners that pass; then puts the socket back. Prints
/// `{"descriptors": N, "outcome": "…"}` (N: listeners it kept).
///
/// `impostor give SOCKET [GENERATION]`: the same process poses as the
/// serving agent at SOCKET for one successor, naming the real GENERATION of
/// pinned programs (so the successor checks the proof against their real
/// key) or none (a serving agent without attribution), hands it a listener
/// of its own with a proof it cannot make, and prints whether the
/// successor said it serves.
pub fn impostor(role: &str, socket: &str, generation: Option<&str>) -> Result<(), String> {
    use agent::handover::wire::{Channel, Listener, Message, VERSION};

    let path = std::path::Path::new(socket);
    let wait = Some(Duration::from_secs(10));
    let outcome = match role {
        "take" => {
            let step = || -> Result<usize, String> {
                let channel =
                    Channel::connect(path).map_err(|e| format!("connect {socket}: {e}"))?;
                let hello = Message::Hello {
                    version: VERSION,
                    generation: None,
                };
                channel.send(&hello, &[]).map_err(|e| e.to_string())?;
                let nonce = match channel.receive(wait).map_err(|e| e.to_string())? {
                    (Message::Challenge { nonce, .. }, _) => nonce,
                    (other, _) => return Err(format!("{other:?}")),
                };
                // Any MAC: without the key every one is a guess.
                let proof = Message::Proof {
                    mac: nonce.rotate_left(7) ^ 0x5a5a,
                    nonce: 1,
                };
                channel.send(&proof, &[]).map_err(|e| e.to_string())?;
                let (_, fds) = channel.receive(wait).map_err(|e| e.to_string())?;
                Ok(fds.len())
            };
            match step() {
                Ok(fds) => json!({ "descriptors": fds, "outcome": "listeners" }),
                Err(e) => json!({ "descriptors": 0, "outcome": e }),
            }
        }
        "relay" => {
            let real = path.with_extension("real");
            std::fs::rename(path, &real).map_err(|e| format!("rename {socket}: {e}"))?;
            let relayed = relay(path, &real, wait);
            let _ = std::fs::remove_file(path);
            std::fs::rename(&real, path).map_err(|e| format!("put {socket} back: {e}"))?;
            match relayed {
                Ok((kept, said)) => json!({ "descriptors": kept, "outcome": said }),
                Err(e) => json!({ "descriptors": 0, "outcome": e }),
            }
        }
        "give" => {
            let _ = std::fs::remove_file(path);
            let listener = Listener::bind(path).map_err(|e| format!("bind {socket}: {e}"))?;
            let channel = listener.accept().map_err(|e| e.to_string())?;
            let decoy = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            let step = || -> Result<String, String> {
                channel.receive(wait).map_err(|e| e.to_string())?;
                let challenge = Message::Challenge {
                    nonce: 7,
                    generation: generation.map(str::to_owned),
                };
                channel.send(&challenge, &[]).map_err(|e| e.to_string())?;
                channel.receive(wait).map_err(|e| e.to_string())?;
                let listeners = Message::Listeners {
                    addresses: vec![decoy.local_addr().map_err(|e| e.to_string())?.to_string()],
                    proof: Some(42),
                };
                use std::os::fd::AsRawFd as _;
                channel
                    .send(&listeners, &[decoy.as_raw_fd()])
                    .map_err(|e| e.to_string())?;
                match channel.receive(wait) {
                    Ok((message, _)) => Ok(format!("{message:?}")),
                    Err(e) => Err(e.to_string()),
                }
            };
            match step() {
                Ok(said) => json!({ "outcome": said }),
                Err(e) => json!({ "outcome": e }),
            }
        }
        other => {
            return Err(format!(
                "impostor: role {other:?} is not take, relay or give"
            ));
        }
    };
    println!("{outcome}");
    Ok(())
}
