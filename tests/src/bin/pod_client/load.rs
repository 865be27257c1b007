//! Load a pod puts on the agent: timed request loops and a keep-alive
//! connection, with what every request got.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// What a loop of requests saw.
#[derive(Default)]
pub struct Tally {
    statuses: BTreeMap<u16, u32>,
    errors: BTreeMap<String, u32>,
    latencies: Vec<Duration>,
}

impl Tally {
    pub fn record(&mut self, took: Duration, outcome: Result<u16, String>) {
        match outcome {
            Ok(status) => {
                *self.statuses.entry(status).or_default() += 1;
                self.latencies.push(took);
            }
            Err(e) => *self.errors.entry(e).or_default() += 1,
        }
    }

    /// `{"statuses": {...}, "errors": {...}, "p50_ms", "p99_ms", "max_ms"}`.
    pub fn into_json(mut self) -> Value {
        self.latencies.sort();
        let pct = |p: f64| -> f64 {
            if self.latencies.is_empty() {
                return 0.0;
            }
            let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1000.0
        };
        let statuses: serde_json::Map<String, Value> = self
            .statuses
            .iter()
            .map(|(s, n)| (s.to_string(), (*n).into()))
            .collect();
        json!({
            "statuses": statuses,
            "errors": self.errors,
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    }
}

fn parse<T: std::str::FromStr>(raw: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    raw.parse().map_err(|e| format!("{raw}: {e}"))
}

fn token(file: &str) -> Result<String, String> {
    std::fs::read_to_string(file)
        .map(|t| t.trim().to_owned())
        .map_err(|e| format!("{file}: {e}"))
}

/// `http-load ADDR PATH TOKEN_FILE SECONDS`: one request per new
/// connection, back to back, for SECONDS. Connection failures (refused
/// while no agent listens, resets) are counted by kind, not fatal.
pub fn http_load(addr: &str, path: &str, token_file: &str, seconds: &str) -> Result<(), String> {
    let addr: SocketAddr = parse(addr)?;
    let seconds: f64 = parse(seconds)?;
    let token = token(token_file)?;
    let host = harness::http::host_header(addr);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tally = Tally::default();
    while Instant::now() < until {
        let started = Instant::now();
        let outcome = harness::http::request(
            addr,
            "GET",
            path,
            &[("Host", &host), ("Authorization", &token)],
        )
        .map(|r| r.status)
        .map_err(|e| {
            let kind = e
                .chain()
                .find_map(|c| c.downcast_ref::<std::io::Error>())
                .map(|io| format!("{:?}", io.kind()))
                .unwrap_or_else(|| "other".into());
            // A refused connect while the agent restarts: try again soon.
            std::thread::sleep(Duration::from_millis(5));
            kind
        });
        tally.record(started.elapsed(), outcome);
    }
    println!("{}", tally.into_json());
    Ok(())
}

/// `keepalive ADDR TOKEN_FILE COUNT PAUSE_MS`: COUNT credential requests on
/// one connection, PAUSE_MS apart, as an SDK's pooled connection would.
/// Prints `local LOCAL_ADDR` once connected, then the tally.
pub fn keepalive(addr: &str, token_file: &str, count: &str, pause_ms: &str) -> Result<(), String> {
    let addr: SocketAddr = parse(addr)?;
    let count: u32 = parse(count)?;
    let pause = Duration::from_millis(parse(pause_ms)?);
    let token = token(token_file)?;
    let host = harness::http::host_header(addr);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    println!("local {local}");
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut tally = Tally::default();
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(pause);
        }
        let started = Instant::now();
        let request = format!(
            "GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n\r\n"
        );
        writer
            .write_all(request.as_bytes())
            .map_err(|e| format!("request #{i}: {e}"))?;
        let status = read_response(&mut reader).map_err(|e| format!("response #{i}: {e}"))?;
        tally.record(started.elapsed(), Ok(status));
    }
    println!("{}", tally.into_json());
    Ok(())
}

/// Reads one response (status line, headers, `Content-Length` body).
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<u16, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length = 0usize;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| format!("bad {header:?}"))?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status)
}

/// `sdk-load SECONDS fresh|shared`: the real SDK's container credentials
/// provider, configured by the webhook's environment, fetching credentials
/// back to back for SECONDS — `fresh`: a new provider (so a new connection)
/// per fetch; `shared`: one provider, whose HTTP client keeps its
/// connection alive between fetches. Every failed fetch is counted by its
/// error (what a pod's first AWS call would have failed with).
pub fn sdk_load(seconds: &str, mode: &str) -> Result<(), String> {
    use aws_config::ecs::EcsCredentialsProvider;
    use aws_credential_types::provider::ProvideCredentials as _;

    let seconds: f64 = parse(seconds)?;
    let fresh = match mode {
        "fresh" => true,
        "shared" => false,
        other => {
            return Err(format!(
                "sdk-load: mode {other:?} is neither fresh nor shared"
            ));
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        let mut shared = EcsCredentialsProvider::builder().build();
        let mut tally = Tally::default();
        while Instant::now() < until {
            if fresh {
                shared = EcsCredentialsProvider::builder().build();
            }
            let started = Instant::now();
            let outcome = shared
                .provide_credentials()
                .await
                .map(|_| 200)
                .map_err(|e| {
                    let text =
                        aws_smithy_types::error::display::DisplayErrorContext(&e).to_string();
                    text.chars().take(160).collect::<String>()
                });
            tally.record(started.elapsed(), outcome);
        }
        println!("{}", tally.into_json());
        Ok(())
    })
}

/// `outage ADDR TOKEN_FILE SECONDS`: credential requests back to back (a
/// new connection each) until one fails and a later one is served again,
/// for at most SECONDS. Prints `served` after its first 200 (so the caller
/// knows it runs), then `{"outage_ms": …}`: from the first failed request to
/// the next one served — what a pod sees of an agent restart.
pub fn outage(addr: &str, token_file: &str, seconds: &str) -> Result<(), String> {
    let addr: SocketAddr = parse(addr)?;
    let seconds: f64 = parse(seconds)?;
    let token = token(token_file)?;
    let host = harness::http::host_header(addr);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut said_served = false;
    let mut first_failure = None;
    while Instant::now() < until {
        let served = harness::http::request(
            addr,
            "GET",
            "/v1/credentials",
            &[("Host", &host), ("Authorization", &token)],
        )
        .is_ok_and(|r| r.status == 200);
        match (served, first_failure) {
            (true, None) if !said_served => {
                println!("served");
                said_served = true;
            }
            (true, Some(failed)) => {
                let outage: Duration = Instant::now() - failed;
                println!(
                    "{}",
                    serde_json::json!({ "outage_ms": outage.as_secs_f64() * 1000.0 })
                );
                return Ok(());
            }
            (false, None) if said_served => first_failure = Some(Instant::now()),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    println!("{}", serde_json::json!({ "outage_ms": null }));
    Ok(())
}
