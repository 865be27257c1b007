//! A pod's process for the integration tests. The harness spawns it inside a
//! pod cgroup and network namespace (see `harness::pod`).
//!
//! * `pod-client connect ADDR COUNT`: COUNT times, connect to ADDR, read to
//!   EOF, close. Prints `pid PID` first so the test can match the kernel.
//! * `pod-client sdk-credentials`: what an AWS SDK in a pod does — the Rust
//!   SDK's container credentials provider, configured by the webhook's
//!   environment (`AWS_CONTAINER_CREDENTIALS_FULL_URI`,
//!   `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`). Prints one JSON line.
//! * `pod-client http-get ADDR TOKEN_FILE COUNT`: COUNT raw credential
//!   requests, each a new connection, taking the file's tokens (one per
//!   line) in turn; prints how many got each status.
//! * `pod-client connect-bench ADDR COUNT`: COUNT connect/close; prints ns.
//! * `pod-client imds-connect ADDR COUNT`: COUNT connects; prints how many
//!   connected and how many the IMDS guard refused (EPERM).
//! * `pod-client http-load ADDR PATH TOKEN_FILE SECONDS`,
//!   `pod-client keepalive ADDR TOKEN_FILE COUNT PAUSE_MS`,
//!   `pod-client outage ADDR TOKEN_FILE SECONDS`,
//!   `pod-client sdk-load SECONDS fresh|shared` (the SDK's provider, with the
//!   environment of `sdk-credentials`): see `load`.
//! * `pod-client as-uid UID SUBCOMMAND…`: SUBCOMMAND as a non-root process
//!   of the pod it was placed in.
//! * `pod-client as-user UID CGROUP SUBCOMMAND…`, `userns-spray …`,
//!   `userns-hold …`, `hold …`, `socket-get …`, `squat …`, `impostor …`: what a hostile process
//!   does; see `hostile`.

mod hostile;
mod load;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    time::{Duration, UNIX_EPOCH},
};

use aws_credential_types::provider::ProvideCredentials as _;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pod-client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, addr, count] if cmd == "connect" => connect(addr, count),
        [cmd] if cmd == "sdk-credentials" => sdk_credentials(),
        [cmd, addr, token_file, count] if cmd == "http-get" => http_get(addr, token_file, count),
        [cmd, addr, count] if cmd == "connect-bench" => connect_bench(addr, count),
        [cmd, addr, count] if cmd == "imds-connect" => imds_connect(addr, count),
        [cmd, addr, path, token_file, seconds] if cmd == "http-load" => {
            load::http_load(addr, path, token_file, seconds)
        }
        [cmd, seconds, mode] if cmd == "sdk-load" => load::sdk_load(seconds, mode),
        [cmd, addr] if cmd == "squat" => hostile::squat(addr),
        [cmd, role, socket, generation @ ..] if cmd == "impostor" => {
            hostile::impostor(role, socket, generation.first().map(String::as_str))
        }
        [cmd, addr, token_file, seconds] if cmd == "outage" => {
            load::outage(addr, token_file, seconds)
        }
        [cmd, addr, token_file, count, pause] if cmd == "keepalive" => {
            load::keepalive(addr, token_file, count, pause)
        }
        [cmd, uid, rest @ ..] if cmd == "as-uid" => {
            hostile::drop_to(uid)?;
            run(rest)
        }
        [cmd, uid, cgroup, rest @ ..] if cmd == "as-user" => {
            hostile::become_user(uid, cgroup)?;
            run(rest)
        }
        [cmd, target, sources, lo, hi, rounds] if cmd == "userns-spray" => {
            hostile::userns_spray(target, sources, lo, hi, rounds)
        }
        [cmd, addr, count, seconds] if cmd == "hold" => hostile::hold(addr, count, seconds),
        [cmd, addr, token_file, kind] if cmd == "socket-get" => {
            hostile::socket_get(addr, token_file, kind)
        }
        [cmd, target, count, seconds] if cmd == "userns-hold" => {
            hostile::userns_hold(target, count, seconds)
        }
        _ => Err(format!(
            "unknown or incomplete command {args:?} (see the module doc)"
        )),
    }
}

fn connect(addr: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    println!("pid {}", std::process::id());
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut sink = Vec::new();
        stream
            .read_to_end(&mut sink)
            .map_err(|e| format!("read {addr} (#{i}): {e}"))?;
    }
    Ok(())
}

/// COUNT connect()+close() to ADDR (the instance metadata service), each on
/// a new socket, as fast as possible; prints how many connected, how many
/// were refused with EPERM (the IMDS guard) and how many failed otherwise.
fn imds_connect(addr: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let (mut connected, mut eperm, mut failed) = (0u32, 0u32, 0u32);
    let mut last_error = String::new();
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(_) => connected += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(e) => {
                failed += 1;
                last_error = e.to_string();
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "pid": std::process::id(),
            "connected": connected,
            "eperm": eperm,
            "failed": failed,
            "last_error": last_error,
        })
    );
    Ok(())
}

/// COUNT connect()+close() to ADDR as fast as possible; prints the elapsed
/// nanoseconds (what every connect() on the node pays for the programs).
fn connect_bench(addr: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let started = std::time::Instant::now();
    for i in 0..count {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr} (#{i}): {e}"))?;
        // Closed with a reset: no TIME_WAIT, so a measurement leaves the
        // port range as it found it (tens of thousands of connects to one
        // destination within a minute otherwise exhaust it, and the next
        // measurements' connects crawl through a full range).
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .map_err(|e| format!("SO_LINGER: {e}"))?;
    }
    println!("{}", started.elapsed().as_nanos());
    Ok(())
}

/// COUNT credential requests (a new connection each), as fast as it can;
/// prints `{"status": count, …}`.
fn http_get(addr: &str, token_file: &str, count: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let tokens = std::fs::read_to_string(token_file).map_err(|e| format!("{token_file}: {e}"))?;
    // One token per line; requests take them in turn.
    let tokens: Vec<&str> = tokens
        .lines()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    if tokens.is_empty() {
        return Err(format!("{token_file}: no token"));
    }
    let host = harness::http::host_header(addr);
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for token in tokens.iter().cycle().take(count as usize) {
        let reply = harness::http::request(
            addr,
            "GET",
            "/v1/credentials",
            &[("Host", &host), ("Authorization", token)],
        )
        .map_err(|e| format!("{e:#}"))?;
        *statuses.entry(reply.status).or_default() += 1;
    }
    let json: serde_json::Map<String, serde_json::Value> = statuses
        .into_iter()
        .map(|(s, n)| (s.to_string(), n.into()))
        .collect();
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

fn sdk_credentials() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
        let creds = provider.provide_credentials().await.map_err(|e| {
            format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            )
        })?;
        let expiry = creds
            .expiry()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        let line = serde_json::json!({
            "access_key_id": creds.access_key_id(),
            "secret_access_key": creds.secret_access_key(),
            "session_token": creds.session_token(),
            "account_id": creds.account_id().map(|a| a.as_str().to_owned()),
            "expiry": expiry,
            "pid": std::process::id(),
        });
        println!("{line}");
        Ok(())
    })
}
