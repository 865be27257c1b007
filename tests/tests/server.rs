//! The agent binary's `server` against the fake EKS Auth, every client in a
//! pod network namespace reaching 169.254.170.23 / fd00:ec2::23 over veth.

use std::{
    net::SocketAddr,
    sync::{Arc, Barrier},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use harness::{
    agent_proc::{AgentProcess, get_local, init_node, scrape_metrics},
    fake_eks_auth::{ACCOUNT, FakeEksAuth, Fault},
    http::{self, Reply},
    pod::sdk_credentials,
    tempdir::TempDir,
    tokens::{Issuer, TokenSpec},
    topology::{AGENT_V4, Node, PodNet},
    wait::{args, wait_for},
};
use serde_json::Value;

const POD_CLIENT: &str = env!("CARGO_BIN_EXE_pod-client");

/// Declared in drop order.
struct Env {
    agent: AgentProcess,
    fake: FakeEksAuth,
    issuer: Issuer,
    pod: PodNet,
    node: Node,
    dir: TempDir,
}

fn env(extra: &[&str]) -> Result<Env> {
    let node = Node::bare()?;
    init_node(&node.netns)?;
    let issuer = Issuer::generate()?;
    let fake = FakeEksAuth::start(Some(&node.netns), issuer.decoding_key())?;
    fake.associate("default", "app", "app-role");
    let pod = PodNet::attach(&node)?;
    // Caller verification has its own tests; these are about serving.
    let mut args = args(&[
        "-c",
        "test-cluster",
        "--attribution",
        "off",
        "--endpoint",
        &fake.endpoint(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let agent = AgentProcess::start(&node.netns, &args)?;
    let dir = TempDir::new("epia-server-")?;
    Ok(Env {
        agent,
        fake,
        issuer,
        pod,
        node,
        dir,
    })
}

fn v4() -> SocketAddr {
    (AGENT_V4, 80).into()
}

impl Env {
    fn token(&self, spec: &TokenSpec) -> Result<String> {
        self.issuer.mint(spec)
    }

    /// A fresh token of the associated service account (its own cache entry).
    fn app_token(&self) -> Result<String> {
        self.token(
            &TokenSpec::new("default", "app")
                .pod("app-pod", "0cc175b9-c0f1-b6a8-31c3-99e269772661"),
        )
    }

    /// A raw request from the pod to the agent.
    fn get(&self, addr: SocketAddr, headers: &[(&str, &str)]) -> Result<Reply> {
        self.request(addr, "GET", "/v1/credentials", headers)
    }

    fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        self.pod
            .netns
            .run_in(|| http::request(addr, method, path, headers))
    }

    fn get_with_token(&self, addr: SocketAddr, token: &str) -> Result<Reply> {
        let host = http::host_header(addr);
        self.get(addr, &[("Host", &host), ("Authorization", token)])
    }

    /// The real Rust SDK container provider in the pod, as the webhook
    /// configures it.
    fn sdk(&self, full_uri: &str, token: &str) -> Result<Value> {
        let file = self.dir.file("token-", token)?;
        let out = sdk_credentials(&mut self.pod.netns.command(POD_CLIENT)?, full_uri, &file)
            .output()
            .context("run pod-client")?;
        ensure!(
            out.status.success(),
            "SDK failed: {}\nagent logs:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.agent.logs()
        );
        serde_json::from_slice(&out.stdout).context("pod-client output")
    }

    fn metrics(&self) -> Result<String> {
        scrape_metrics(&self.node.netns)
    }
}

#[test]
fn every_status_row_of_the_reference_in_order() -> Result<()> {
    harness::require_privilege!();
    // Short attempt timeout so the "no answer" row stays quick.
    let env = env(&["--upstream-attempt-timeout", "300ms"])?;
    let host = http::host_header(v4());
    let expired = env.token(&TokenSpec::new("default", "app").expired())?;
    let unassociated = env.token(&TokenSpec::new("default", "nobody"))?;

    struct Row<'a> {
        what: &'a str,
        fault: Option<Fault>,
        latency_ms: u64,
        host: Option<&'a str>,
        token: Option<String>,
        status: u16,
        body_starts: &'a str,
        /// Upstream requests this row causes (retries included).
        calls: usize,
    }
    let error = |status, name: &str| {
        Some(Fault::Error {
            status,
            name: name.into(),
        })
    };
    let fresh = || env.app_token().ok();
    let rows = [
        Row {
            what: "wrong Host",
            fault: None,
            latency_ms: 0,
            host: Some("example.com"),
            token: fresh(),
            status: 403,
            body_starts: "Access Denied. Called agent through invalid address, please use either [169.254.170.23 fd00:ec2::23] address not example.com",
            calls: 0,
        },
        Row {
            what: "no token",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: None,
            status: 400,
            body_starts: "Service account token cannot be empty",
            calls: 0,
        },
        Row {
            what: "empty token",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: Some(String::new()),
            status: 400,
            body_starts: "Service account token cannot be empty",
            calls: 0,
        },
        Row {
            what: "garbage token",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: Some("garbage".into()),
            status: 400,
            body_starts: "Service account token cannot be parsed: token is malformed: token contains an invalid number of segments\n",
            calls: 0,
        },
        Row {
            what: "expired token",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: Some(expired),
            status: 400,
            body_starts: "Service account token failed basic claim validations: token is expired\n",
            calls: 0,
        },
        Row {
            what: "AccessDenied",
            fault: error(400, "AccessDenied"),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 400,
            body_starts: "[req-",
            calls: 1,
        },
        Row {
            what: "InvalidToken",
            fault: error(400, "InvalidToken"),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 400,
            body_starts: "[req-",
            calls: 1,
        },
        Row {
            what: "no association",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: Some(unassociated),
            status: 404,
            body_starts: "[req-",
            calls: 1,
        },
        Row {
            what: "throttled, retried",
            fault: error(429, "Throttling"),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 429,
            body_starts: "[req-",
            calls: 3,
        },
        Row {
            what: "internal error, retried",
            fault: error(500, "InternalServer"),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 500,
            body_starts: "[req-",
            calls: 3,
        },
        Row {
            what: "unavailable, retried",
            fault: error(503, "ServiceUnavailable"),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 503,
            body_starts: "[req-",
            calls: 3,
        },
        Row {
            what: "no answer in time, retried",
            fault: None,
            latency_ms: 1_000,
            host: Some(&host),
            token: fresh(),
            status: 500,
            body_starts: "EKS Auth did not answer in time (at most 300ms per attempt, 3 attempts, 1s 800ms in all)",
            calls: 3,
        },
        Row {
            what: "connection dropped, retried",
            fault: Some(Fault::DropConnection),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 500,
            body_starts: "could not reach EKS Auth: ",
            calls: 3,
        },
        Row {
            what: "malformed answer",
            fault: Some(Fault::MalformedJson),
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 500,
            body_starts: "malformed EKS Auth response: ",
            calls: 1,
        },
        Row {
            what: "success",
            fault: None,
            latency_ms: 0,
            host: Some(&host),
            token: fresh(),
            status: 200,
            body_starts: "{",
            calls: 1,
        },
    ];
    for row in rows {
        env.fake.set(|k| {
            k.fault = row.fault.clone();
            k.latency = Duration::from_millis(row.latency_ms);
        });
        let before = env.fake.calls();
        let mut headers = Vec::new();
        if let Some(h) = row.host {
            headers.push(("Host", h));
        }
        if let Some(t) = &row.token {
            headers.push(("Authorization", t.as_str()));
        }
        let reply = env.get(v4(), &headers)?;
        assert_eq!(reply.status, row.status, "{}: {}", row.what, reply.body);
        assert!(
            reply.body.starts_with(row.body_starts),
            "{}: body {:?}",
            row.what,
            reply.body
        );
        if reply.status != 200 {
            assert!(
                !reply.body.contains("eyJ"),
                "{}: the body echoes a token",
                row.what
            );
            // Go's http.Error, as the reference answers every error.
            assert_eq!(
                (
                    reply.header("content-type"),
                    reply.header("x-content-type-options"),
                    reply.body.ends_with('\n')
                ),
                (Some("text/plain; charset=utf-8"), Some("nosniff"), true),
                "{}: not Go's http.Error",
                row.what
            );
        }
        wait_for(row.what, Duration::from_secs(30), || {
            Ok(env.fake.calls() - before >= row.calls)
        })?;
        assert_eq!(
            env.fake.calls() - before,
            row.calls,
            "{}: upstream calls",
            row.what
        );
    }
    // The upstream error body format, in full.
    env.fake.set(|k| k.fault = error(400, "AccessDenied"));
    let reply = env.get_with_token(v4(), &env.app_token()?)?;
    let expected_tail = "]: (AccessDeniedException): injected by the test, fault: client\n";
    assert!(reply.body.ends_with(expected_tail), "{:?}", reply.body);
    env.fake.set(|k| k.fault = None);

    // Success JSON, exactly the SDK's keys.
    let reply = env.get_with_token(v4(), &env.app_token()?)?;
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let json: Value = serde_json::from_str(&reply.body)?;
    for key in [
        "AccessKeyId",
        "SecretAccessKey",
        "Token",
        "AccountId",
        "Expiration",
    ] {
        assert!(json.get(key).is_some(), "missing {key} in {json}");
    }
    assert_eq!(json["AccountId"], ACCOUNT);
    assert!(
        json["Expiration"]
            .as_str()
            .is_some_and(|e| e.ends_with('Z') && e.contains('T'))
    );

    // Other paths: Go's 404; any method on the path is a credential request.
    let h = [("Host", host.as_str())];
    let other = env.request(v4(), "GET", "/v2/credentials", &h)?;
    assert_eq!(
        (other.status, other.body.as_str()),
        (404, "404 page not found\n")
    );
    let post = env.request(v4(), "POST", "/v1/credentials", &h)?;
    assert_eq!(
        (post.status, post.body.as_str()),
        (400, "Service account token cannot be empty\n")
    );
    let metrics = env.metrics()?;
    assert!(
        metrics.contains(r#"pod_identity_http_response{code="403"} 1"#),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn the_real_sdk_gets_credentials_over_ipv4_and_ipv6_and_repeats_hit_the_cache() -> Result<()> {
    harness::require_privilege!();
    let env = env(&[])?;
    for uri in [
        harness::topology::V4_URI,
        "http://[fd00:ec2::23]/v1/credentials",
    ] {
        let token = env.app_token()?;
        let before = env.fake.calls();
        let first = env.sdk(uri, &token)?;
        assert!(
            first["access_key_id"]
                .as_str()
                .is_some_and(|k| k.starts_with("ASIAFAKE")),
            "{uri}: {first}"
        );
        assert_eq!(first["account_id"], ACCOUNT, "{uri}");
        assert_eq!(env.fake.calls(), before + 1, "{uri}");
        let again = env.sdk(uri, &token)?;
        assert_eq!(
            again["access_key_id"], first["access_key_id"],
            "{uri}: not the cached credentials"
        );
        assert_eq!(
            env.fake.calls(),
            before + 1,
            "{uri}: the repeat went upstream"
        );
    }
    let metrics = env.metrics()?;
    assert!(
        metrics.contains(r#"pod_identity_cache_lookups_total{result="hit"} 2"#),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn two_hundred_concurrent_first_requests_make_one_upstream_call() -> Result<()> {
    harness::require_privilege!();
    // One source address sends all 200: without the per-client rate limit,
    // which would answer most with 429 before the cache is reached.
    let env = env(&["--pod-rate-limit", "0"])?;
    env.fake.set(|k| k.latency = Duration::from_millis(500));
    let token = env.app_token()?;
    let host = http::host_header(v4());
    let statuses: Vec<u16> = env.pod.netns.run_in(|| {
        let barrier = Arc::new(Barrier::new(200));
        let handles: Vec<_> = (0..200)
            .map(|_| {
                let (barrier, token, host) = (barrier.clone(), token.clone(), host.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    http::request(
                        v4(),
                        "GET",
                        "/v1/credentials",
                        &[("Host", &host), ("Authorization", &token)],
                    )
                    .map(|r| r.status)
                })
            })
            .collect();
        // Threads spawned here inherit this thread's namespace.
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect()
    })?;
    assert!(statuses.iter().all(|&s| s == 200), "statuses {statuses:?}");
    assert_eq!(
        env.fake.calls(),
        1,
        "upstream calls for 200 concurrent first requests"
    );
    Ok(())
}

#[test]
fn a_client_that_gives_up_does_not_fail_the_others_waiting() -> Result<()> {
    harness::require_privilege!();
    let env = env(&[])?;
    env.fake.set(|k| k.latency = Duration::from_millis(800));
    let token = env.app_token()?;
    let host = http::host_header(v4());
    let reply = env.pod.netns.run_in(|| {
        use std::io::Write as _;
        // The first client asks and hangs up at once.
        let mut quitter = std::net::TcpStream::connect(v4())?;
        write!(
            quitter,
            "GET /v1/credentials HTTP/1.1\r\nHost: {host}\r\nAuthorization: {token}\r\n\r\n"
        )?;
        drop(quitter);
        // The second asks for the same identity meanwhile.
        http::request(
            v4(),
            "GET",
            "/v1/credentials",
            &[("Host", &host), ("Authorization", &token)],
        )
    })?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        env.fake.calls(),
        1,
        "the abandoned call was cancelled and redone"
    );
    Ok(())
}

#[test]
fn cached_credentials_are_served_while_eks_auth_is_down() -> Result<()> {
    harness::require_privilege!();
    let env = env(&[])?;
    let token = env.app_token()?;
    let first = env.get_with_token(v4(), &token)?;
    assert_eq!(first.status, 200);
    env.fake.set(|k| k.fault = Some(Fault::DropConnection));
    let calls = env.fake.calls();
    for _ in 0..5 {
        let again = env.get_with_token(v4(), &token)?;
        assert_eq!((again.status, &again.body), (200, &first.body));
    }
    assert_eq!(env.fake.calls(), calls, "a cached identity went upstream");
    Ok(())
}

#[test]
fn the_first_request_after_retention_renews_and_an_unused_identity_is_not_renewed() -> Result<()> {
    harness::require_privilege!();
    // Held at most 1 s before renewal; EKS Auth hands out 1-hour credentials.
    let env = env(&[
        "--max-credential-retention-before-renewal",
        "1s",
        "--max-service-qps",
        "10",
    ])?;
    env.fake
        .set(|k| k.credential_lifetime = Duration::from_secs(3600));
    let token = env.app_token()?;
    let key_id = |reply: Reply| -> Result<Value> {
        let answer: Value = serde_json::from_str(&reply.body)?;
        Ok(answer["AccessKeyId"].clone())
    };
    // The SDKs are told to ask again once the entry is due (1 s) plus the
    // margin of their refresh windows (20 min), not at the hour's end.
    let answer: Value = serde_json::from_str(&env.get_with_token(v4(), &token)?.body)?;
    let expiration = answer["Expiration"].as_str().context("Expiration")?;
    let at = aws_smithy_types::DateTime::from_str(
        expiration,
        aws_smithy_types::date_time::Format::DateTime,
    )?;
    let advertised = std::time::SystemTime::try_from(at)?
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        (Duration::from_secs(19 * 60)..=Duration::from_secs(21 * 60)).contains(&advertised),
        "Expiration {expiration}: in {advertised:?}"
    );
    let first = answer["AccessKeyId"].clone();
    // Three retention periods with nobody asking: EKS Auth hears nothing
    // (an agent renewing in the background would have called by now).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        env.fake.issued(),
        1,
        "an identity nobody asked for was renewed"
    );
    // The next request renews it, and is answered with the new credentials.
    let renewed = key_id(env.get_with_token(v4(), &token)?)?;
    assert_ne!(renewed, first, "still the first credentials");
    assert_eq!(env.fake.issued(), 2);
    // Which are cached in turn.
    assert_eq!(key_id(env.get_with_token(v4(), &token)?)?, renewed);
    assert_eq!(env.fake.issued(), 2);
    assert!(
        env.metrics()?
            .contains("pod_identity_cache_state{state=\"hit\"} 1\n"),
        "the renewal was not counted"
    );
    Ok(())
}

#[test]
fn sigterm_lets_in_flight_requests_complete_and_exits_zero() -> Result<()> {
    harness::require_privilege!();
    let mut env = env(&[])?;
    // Slow, but within one upstream attempt (1 s).
    env.fake.set(|k| k.latency = Duration::from_millis(700));
    let token = env.app_token()?;
    let host = http::host_header(v4());
    let pod_ns = env.pod.netns.open()?;
    let in_flight = std::thread::spawn(move || -> Result<Reply> {
        harness::netns::enter(&pod_ns)?;
        http::request(
            v4(),
            "GET",
            "/v1/credentials",
            &[("Host", &host), ("Authorization", &token)],
        )
    });
    wait_for(
        "the request to reach EKS Auth",
        Duration::from_secs(30),
        || Ok(env.fake.calls() >= 1),
    )?;
    let status = env.agent.terminate(Duration::from_secs(30))?;
    let reply = in_flight
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        status.success(),
        "agent exit {status}:\n{}",
        env.agent.logs()
    );
    Ok(())
}

#[test]
fn a_missing_address_family_is_reported_not_fatal() -> Result<()> {
    harness::require_privilege!();
    let node = Node::bare()?;
    // init owns only the IPv4 address; the server is asked to serve both.
    let out = node
        .netns
        .command(harness::agent_bin::agent_binary()?)?
        .args(["init", "-b", "169.254.170.23"])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let issuer = Issuer::generate()?;
    let fake = FakeEksAuth::start(Some(&node.netns), issuer.decoding_key())?;
    let args = args(&[
        "-c",
        "test-cluster",
        "--attribution",
        "off",
        "--endpoint",
        &fake.endpoint(),
    ]);
    let agent = AgentProcess::start(&node.netns, &args)?;
    let logs = agent.logs();
    assert!(
        logs.contains("fd00:ec2::23") && logs.contains("not assigned to any link"),
        "the missing address is not named precisely:\n{logs}"
    );
    let ready = get_local(&node.netns, 2703, "/readyz")?;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert!(
        ready.body.contains("listener 169.254.170.23:80: ok"),
        "{}",
        ready.body
    );
    assert!(
        ready.body.contains("not served: [fd00:ec2::23]:80"),
        "{}",
        ready.body
    );
    let health = get_local(&node.netns, 2703, "/healthz")?;
    assert_eq!(health.status, 200);
    Ok(())
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() -> Result<()> {
    harness::require_privilege!();
    let env = env(&["--header-read-timeout", "1s"])?;
    let closed = env.pod.netns.run_in(|| {
        use std::io::{Read as _, Write as _};
        let mut slow = std::net::TcpStream::connect(v4())?;
        slow.write_all(b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\n")?;
        // Never the final CRLF. The agent must hang up (long before this).
        slow.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = [0u8; 512];
        Ok(match slow.read(&mut buf) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        })
    })?;
    assert!(closed, "the slow client was not cut off");
    let reply = env.get_with_token(v4(), &env.app_token()?)?;
    assert_eq!(reply.status, 200, "the agent stopped serving");
    Ok(())
}

#[test]
fn a_kept_connection_has_the_header_deadline_after_each_answer() -> Result<()> {
    harness::require_privilege!();
    let env = env(&["--header-read-timeout", "1s"])?;
    let token = env.app_token()?;
    let headers = [
        ("Host", "169.254.170.23"),
        ("Authorization", token.as_str()),
    ];
    env.pod.netns.run_in(|| {
        // In use for three deadlines: each answer starts the next one, so
        // the connection stays.
        let mut busy = http::KeepAlive::connect(v4())?;
        let started = std::time::Instant::now();
        let mut answered = 0;
        while started.elapsed() < Duration::from_secs(3) {
            let reply = busy.get("/v1/credentials", &headers)?;
            assert_eq!(reply.status, 200, "request {answered}: {}", reply.body);
            answered += 1;
            // The client's pace, a third of the deadline.
            std::thread::sleep(Duration::from_millis(330));
        }
        ensure!(answered >= 8, "only {answered} requests in 3 s");
        // Cut off, but only about a whole deadline after the last answer
        // (the agent counts from before its answer reached the client).
        let cut_after_the_deadline = |since: std::time::Instant| {
            let waited = since.elapsed();
            ensure!(
                waited >= Duration::from_millis(900),
                "cut off after {waited:?}"
            );
            Ok(())
        };
        // After an answer, the next request's headers never finished.
        let reply = busy.get("/v1/credentials", &headers)?;
        assert_eq!(reply.status, 200);
        let answered = std::time::Instant::now();
        busy.send(b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\n")?;
        ensure!(busy.closed_by_peer(), "unfinished headers were not cut off");
        cut_after_the_deadline(answered)?;
        // After an answer, nothing more.
        let mut idle = http::KeepAlive::connect(v4())?;
        assert_eq!(idle.get("/v1/credentials", &headers)?.status, 200);
        let answered = std::time::Instant::now();
        ensure!(idle.closed_by_peer(), "an idle kept connection stayed open");
        cut_after_the_deadline(answered)?;
        Ok(())
    })?;
    let reply = env.get_with_token(v4(), &token)?;
    assert_eq!(reply.status, 200, "the agent stopped serving");
    Ok(())
}

#[test]
fn a_hanging_eks_auth_is_answered_before_the_sdk_gives_up() -> Result<()> {
    harness::require_privilege!();
    // The defaults: 1 s attempts, 3 of them, 1.8 s in all.
    let env = env(&[])?;
    env.fake.set(|k| k.latency = Duration::from_secs(30));
    let started = std::time::Instant::now();
    let reply = env.get_with_token(v4(), &env.app_token()?)?;
    let took = started.elapsed();
    assert_eq!(reply.status, 500, "{}", reply.body);
    // The Rust SDK waits 5 s for an answer (connect 2 s): answer well before.
    ensure!(took < Duration::from_secs(2), "answered after {took:?}");
    let body = reply.body.trim_end();
    assert_eq!(
        body,
        "EKS Auth did not answer in time (at most 1s per attempt, 3 attempts, 1s 800ms in all)"
    );
    Ok(())
}

#[test]
fn callers_that_are_not_pods_are_rate_limited_per_source_without_attribution() -> Result<()> {
    harness::require_privilege!();
    // Attribution off: every caller is a source address. One of them
    // presenting many distinct tokens must not turn into as many EKS Auth
    // calls.
    let env = env(&["--pod-rate-limit", "5", "--pod-rate-burst", "10"])?;
    let tokens: Vec<String> = (0..60)
        .map(|i| {
            env.token(
                &TokenSpec::new("default", "app")
                    .pod(&format!("p{i}"), "0cc175b9-c0f1-b6a8-31c3-99e269772661"),
            )
        })
        .collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let mut statuses = std::collections::BTreeMap::<u16, u32>::new();
    for token in &tokens {
        *statuses
            .entry(env.get_with_token(v4(), token)?.status)
            .or_default() += 1;
    }
    let allowed = 10 + (started.elapsed().as_secs_f64() * 5.0).ceil() as u32;
    let served = statuses.get(&200).copied().unwrap_or(0);
    ensure!(
        served <= allowed && statuses.get(&429).copied().unwrap_or(0) > 0,
        "statuses {statuses:?} (at most {allowed} allowed)"
    );
    ensure!(
        env.fake.calls() as u32 <= allowed,
        "{} EKS Auth calls",
        env.fake.calls()
    );
    // Another source is not affected.
    let other = env.node.netns.run_in(|| {
        http::request(
            v4(),
            "GET",
            "/v1/credentials",
            &[("Host", "169.254.170.23"), ("Authorization", &tokens[0])],
        )
    })?;
    assert_eq!(other.status, 200, "{}", other.body);
    Ok(())
}
