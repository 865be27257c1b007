//! The reference agent's surface, table by table: what the AWS chart runs,
//! what its dashboards and alerts query, what its probes expect, what its
//! log pipelines parse. Each row is something an operator swapping images
//! relies on.

use std::{net::SocketAddr, time::Duration};

use agent::config::{Cli, Command};
use anyhow::{Context as _, Result, ensure};
use clap::Parser as _;
use harness::{
    agent_proc::{AgentProcess, get_local},
    cluster::Who,
    fake_eks_auth::Fault,
    http,
    served::Served,
    tempdir::TempDir,
    topology::{AGENT_V4, V4_URI},
    wait::wait_for,
};

const NODE: &str = "node-1";

/// What a command line must parse to.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Initialize,
    Server { rotate_credentials: bool },
    Version,
}

#[test]
fn the_charts_argument_lists_parse() {
    // (what, argv after the binary, subcommand, verbosity)
    let ok: [(&str, &[&str], Parsed, &str); 10] = [
        (
            "chart init container",
            &["initialize", "-v", "trace"],
            Parsed::Initialize,
            "Trace",
        ),
        (
            "init, our earlier name",
            &["init"],
            Parsed::Initialize,
            "Info",
        ),
        (
            "verbosity before the subcommand",
            &["-v", "debug", "initialize"],
            Parsed::Initialize,
            "Debug",
        ),
        (
            "chart server container",
            &[
                "server",
                "--port",
                "80",
                "--cluster-name",
                "EKS_CLUSTER_NAME",
                "--probe-port",
                "2703",
                "-v",
                "trace",
            ],
            Parsed::Server {
                rotate_credentials: false,
            },
            "Trace",
        ),
        (
            "chart hybrid server container",
            &[
                "server",
                "--port",
                "80",
                "--cluster-name",
                "EKS_CLUSTER_NAME",
                "--probe-port",
                "2703",
                "--rotate-credentials",
                "true",
                "-v",
                "trace",
            ],
            Parsed::Server {
                rotate_credentials: true,
            },
            "Trace",
        ),
        (
            "--rotate-credentials=false",
            &["server", "-c", "x", "--rotate-credentials=false"],
            Parsed::Server {
                rotate_credentials: false,
            },
            "Info",
        ),
        (
            "bare --rotate-credentials",
            &["server", "-c", "x", "--rotate-credentials"],
            Parsed::Server {
                rotate_credentials: true,
            },
            "Info",
        ),
        (
            "every reference server flag",
            &[
                "server",
                "-c",
                "x",
                "-p",
                "8080",
                "--probe-port",
                "2704",
                "--metrics-address",
                "127.0.0.1",
                "--metrics-port",
                "2706",
                "--max-credential-retention-before-renewal",
                "1h",
                "--max-cache-size",
                "5",
                "--max-service-qps",
                "7",
                "--endpoint",
                "http://127.0.0.1:1",
                "-b",
                "169.254.170.23",
                "-b",
                "[fd00:ec2::23]",
            ],
            Parsed::Server {
                rotate_credentials: false,
            },
            "Info",
        ),
        (
            "logrus level names",
            &["-v", "warning", "version"],
            Parsed::Version,
            "Warn",
        ),
        (
            "panic level",
            &["version", "-v", "panic"],
            Parsed::Version,
            "Panic",
        ),
    ];
    for (what, argv, expected, verbosity) in ok {
        let cli = Cli::try_parse_from(
            std::iter::once("eks-pod-identity-agent").chain(argv.iter().copied()),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        let parsed = match cli.command {
            Command::Init(_) => Parsed::Initialize,
            Command::Server(args) => Parsed::Server {
                rotate_credentials: args.rotate_credentials,
            },
            Command::Version => Parsed::Version,
        };
        assert_eq!(parsed, expected, "{what}");
        assert_eq!(format!("{:?}", cli.verbosity), verbosity, "{what}");
    }
    for (what, argv) in [
        ("an unknown verbosity", &["-v", "loud", "version"][..]),
        ("server without a cluster name", &["server"][..]),
    ] {
        assert!(
            Cli::try_parse_from(
                std::iter::once("eks-pod-identity-agent").chain(argv.iter().copied())
            )
            .is_err(),
            "{what} parsed"
        );
    }
}

#[test]
fn metrics_have_the_reference_names_labels_and_format() -> Result<()> {
    harness::require_privilege!();
    let env = Served::start(NODE, "enforce", &[])?;
    env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    let reply = get_local(&env.node.netns, 2705, "/metrics")?;
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = reply.body;
    // (what dashboards query, the line that must be there)
    let rows = [
        (
            "reference: responses by code",
            "# TYPE pod_identity_http_response counter",
        ),
        (
            "reference: code label",
            r#"pod_identity_http_response{code="200"} 2"#,
        ),
        (
            "reference: cache state",
            "# TYPE pod_identity_cache_state counter",
        ),
        (
            "reference: a request missed the cache",
            r#"pod_identity_cache_state{state="miss"}"#,
        ),
        (
            "ours: cache lookups",
            r#"pod_identity_cache_lookups_total{result="miss"}"#,
        ),
        (
            "ours: decisions",
            r#"pod_identity_caller_decisions_total{reason="ok",result="allow"} 2"#,
        ),
        (
            "ours: attribution mode",
            r#"pod_identity_attribution_mode{mode="enforce"} 1"#,
        ),
        (
            "process metrics, as client_golang's",
            "process_resident_memory_bytes ",
        ),
        ("process CPU", "process_cpu_seconds_total "),
        ("process fds", "process_open_fds "),
    ];
    for (what, line) in rows {
        ensure!(text.contains(line), "{what}: no {line:?} in\n{text}");
    }
    for name in [
        "pod_identity_http_response",
        "pod_identity_cache_state",
        "pod_identity_cache_errors",
    ] {
        ensure!(
            !text.contains(&format!("{name}_total")),
            "{name} grew a _total suffix:\n{text}"
        );
    }
    Ok(())
}

#[test]
fn probes_answer_as_the_reference_on_both_ports_and_fail_when_a_listener_stops() -> Result<()> {
    harness::require_privilege!();
    let env = Served::start(NODE, "enforce", &[])?;
    let get = |port: u16, path: &str| get_local(&env.node.netns, port, path);
    // (port, path, status, body starts)
    let rows = [
        (2703, "/healthz", 200, "listener 169.254.170.23:80: ok"),
        (2703, "/readyz", 200, "listener 169.254.170.23:80: ok"),
        (2705, "/healthz", 200, "listener 169.254.170.23:80: ok"),
        (2705, "/readyz", 200, "listener 169.254.170.23:80: ok"),
        (2703, "/metrics", 404, "404 page not found\n"),
        (2705, "/other", 404, "404 page not found\n"),
    ];
    for (port, path, status, body) in rows {
        let reply = get(port, path)?;
        assert_eq!(reply.status, status, ":{port}{path}: {}", reply.body);
        assert!(
            reply.body.starts_with(body),
            ":{port}{path}: {:?}",
            reply.body
        );
    }
    // The IPv4 listener's address goes away: a request to it cannot come
    // back, so liveness fails (and the kubelet would restart the agent).
    env.node
        .netns
        .ip(&["route", "del", "169.254.170.23/32", "dev", "pod-id-link0"])?;
    env.node
        .netns
        .ip(&["addr", "del", "169.254.170.23/32", "dev", "pod-id-link0"])?;
    for port in [2703, 2705] {
        let reply = get(port, "/healthz")?;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (500, "Internal Server Error occurred\n"),
            ":{port}"
        );
    }
    Ok(())
}

#[test]
fn logs_are_logrus_json_and_never_carry_a_token_or_a_secret() -> Result<()> {
    harness::require_privilege!();
    for verbosity in ["trace", "debug"] {
        let env = Served::start(NODE, "enforce", &["-v", verbosity])?;
        let mut secrets: Vec<String> = vec!["node-secret-for-signing".into()];
        // Cold miss, cache hit, an upstream error, a refused caller.
        let token_a = env.own_token(Who::A)?;
        secrets.push(token_a.clone());
        for _ in 0..2 {
            let creds = env.sdk_ok(Who::A, V4_URI, &token_a)?;
            for key in ["secret_access_key", "session_token"] {
                secrets.push(creds[key].as_str().context(key)?.to_owned());
            }
        }
        env.fake.set(|k| {
            k.fault = Some(Fault::Error {
                status: 400,
                name: "AccessDenied".into(),
            })
        });
        let refused_upstream = env.own_token(Who::B)?;
        secrets.push(refused_upstream.clone());
        ensure!(!env.sdk(Who::B, V4_URI, &refused_upstream)?.status.success());
        env.fake.set(|k| k.fault = None);
        ensure!(
            !env.sdk(Who::B, V4_URI, &token_a)?.status.success(),
            "replay served"
        );

        let audit = env.audit_trail()?;
        // The log line of each audited request too (same writer thread).
        let events = audit.lines().count();
        let mut logs = String::new();
        wait_for("every request's log line", Duration::from_secs(30), || {
            logs = env.agent.logs();
            Ok(logs.matches(r#""msg":"credential request""#).count() >= events)
        })?;
        for (name, text) in [("logs", &logs), ("audit file", &audit)] {
            for secret in &secrets {
                ensure!(
                    !text.contains(secret.as_str()),
                    "-v {verbosity}: a token or secret in the {name}"
                );
            }
            ensure!(!text.contains("eyJ"), "-v {verbosity}: a JWT in the {name}");
        }
        // logrus' JSON: every line an object with level, msg, time; the
        // request's line with the reference's field names.
        for line in logs.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value = serde_json::from_str(line).context(line.to_owned())?;
            for key in ["level", "msg", "time"] {
                ensure!(v.get(key).is_some(), "no {key} in {line}");
            }
        }
        let request_line = logs
            .lines()
            .find(|l| l.contains(r#""msg":"credential request""#))
            .context("no request log line")?;
        let v: serde_json::Value = serde_json::from_str(request_line)?;
        ensure!(
            v["client-addr"].is_string() && v["cluster-name"] == "test-cluster",
            "{request_line}"
        );
        ensure!(
            logs.contains(r#""level":"trace""#) || logs.contains(r#""level":"debug""#),
            "-v {verbosity} logged nothing below info"
        );
    }
    Ok(())
}

#[test]
fn rotated_node_credentials_sign_the_next_call() -> Result<()> {
    harness::require_privilege!();
    let cluster = harness::cluster::Cluster::new(NODE)?;
    let dir = TempDir::new("epia-hybrid-")?;
    let file = dir.path().join("credentials");
    let write = |key: &str| {
        std::fs::write(
            &file,
            format!(
                "[default]\naws_access_key_id = {key}\naws_secret_access_key = secret-of-{key}\n"
            ),
        )
    };
    write("AKIDHYBRIDFIRST")?;
    let args = cluster.agent_args(
        "enforce",
        &[
            "--rotate-credentials",
            "true",
            "--rotate-credentials-interval",
            "1s",
        ],
    );
    let file_env = file.to_string_lossy().into_owned();
    let agent = AgentProcess::start_with_env(
        &cluster.node.netns,
        &args,
        &[("AWS_SHARED_CREDENTIALS_FILE", &file_env)],
    )?;
    let env = Served { agent, cluster };
    env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
    assert_eq!(
        env.fake.last_signing_key().as_deref(),
        Some("AKIDHYBRIDFIRST")
    );
    // The node's tooling rotates the file; no restart.
    write("AKIDHYBRIDSECOND")?;
    wait_for(
        "a call signed with the rotated key",
        Duration::from_secs(60),
        || {
            // A fresh token each time: a cache miss, so EKS Auth is called.
            env.sdk_ok(Who::A, V4_URI, &env.own_token(Who::A)?)?;
            Ok(env.fake.last_signing_key().as_deref() == Some("AKIDHYBRIDSECOND"))
        },
    )?;
    Ok(())
}

#[test]
fn a_missing_credentials_file_is_a_clear_error_at_start() -> Result<()> {
    harness::require_privilege!();
    refused_at_start(
        &["--rotate-credentials"],
        &[("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")],
        &["/nonexistent/credentials", "--rotate-credentials"],
    )
}

/// An image without a CA bundle: the SDK's TLS client would start and then
/// fail every call; the agent exits at start saying what is missing.
#[test]
fn no_ca_certificate_is_a_clear_error_at_start() -> Result<()> {
    harness::require_privilege!();
    refused_at_start(
        &[],
        // The bundle the SDK reads instead of the system's: empty.
        &[("SSL_CERT_FILE", "/dev/null")],
        &["no CA certificates found", "SSL_CERT_FILE"],
    )
}

/// Starts an agent (enforce, `flags` added) with `env` on top of the
/// harness's, which must stop it: it exits, and its log says each of `says`.
fn refused_at_start(flags: &[&str], env: &[(&str, &str)], says: &[&str]) -> Result<()> {
    let cluster = harness::cluster::Cluster::new(NODE)?;
    let args = cluster.agent_args("enforce", flags);
    let mut agent = AgentProcess::spawn_with_env(&cluster.node.netns, &args, None, env)?;
    let status = agent.wait_exit(Duration::from_secs(30))?;
    ensure!(!status.success(), "started with {env:?}");
    let logs = agent.logs();
    ensure!(
        says.iter().all(|said| logs.contains(said)),
        "the error does not say {says:?}:\n{logs}"
    );
    Ok(())
}

/// The credential listener answers the reference's global limit with 429.
#[test]
fn the_global_request_limit_answers_429_too_many_requests() -> Result<()> {
    harness::require_privilege!();
    let env = Served::start(
        NODE,
        "enforce",
        &[
            "--max-request-rate",
            "1",
            "--max-request-burst",
            "2",
            "--pod-rate-limit",
            "0",
        ],
    )?;
    let token = env.own_token(Who::A)?;
    let target: SocketAddr = (AGENT_V4, 80).into();
    let burst = env.burst(Who::A, target, &token, 10)?;
    let out = burst.wait_with_output()?;
    let statuses: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(statuses["429"].as_u64() >= Some(7), "{statuses}");
    let reply = env.node.netns.run_in(|| {
        http::request(
            target,
            "GET",
            "/v1/credentials",
            &[("Host", "169.254.170.23")],
        )
    })?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (429, "Too Many Requests\n")
    );
    Ok(())
}
