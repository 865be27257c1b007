//! The command line: subcommands and flags, compatible with the reference
//! agent's where it has them — the AWS chart's exact argument lists parse
//! (docs/architecture.md §7).

use std::net::IpAddr;

use clap::{Args, Parser, Subcommand};

use crate::link::LinkKind;

#[derive(Debug, Parser)]
#[command(
    name = "eks-pod-identity-agent",
    version,
    about = "EKS Pod Identity Agent with kernel caller attribution"
)]
pub struct Cli {
    /// Log level of the agent's own logs, as the reference's logrus levels:
    /// panic, fatal, error, warn, info, debug, trace. Before or after the
    /// subcommand. Libraries stay at warn (see --log-filter).
    #[arg(
        short = 'v',
        long,
        global = true,
        default_value = "info",
        value_parser = crate::telemetry::logging::parse_level
    )]
    pub verbosity: crate::telemetry::logging::Level,

    /// Extra `target=level` filter directives for libraries, e.g.
    /// `aws_smithy_runtime=debug,hyper=info`: kept apart from -v so the
    /// chart's `-v trace` never turns on their request tracing.
    #[arg(long, global = true, env = "EKS_POD_IDENTITY_AGENT_LOG_FILTER")]
    pub log_filter: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Own the link-local addresses: create the link, addresses and routes
    /// (run as the DaemonSet's init container; needs CAP_NET_ADMIN).
    #[command(name = "initialize", alias = "init")]
    Init(InitArgs),
    /// Serve pod credentials on the link-local addresses.
    Server(Box<ServerArgs>),
    /// Print the version.
    Version,
}

/// The reference agent's default served addresses.
pub const DEFAULT_BIND_HOSTS: &str = "169.254.170.23,[fd00:ec2::23]";

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Addresses to own, comma-separated; IPv6 in brackets or bare.
    #[arg(short = 'b', long = "bind-hosts", default_value = DEFAULT_BIND_HOSTS, value_delimiter = ',', value_parser = parse_host)]
    pub bind_hosts: Vec<IpAddr>,

    /// Name of the link that holds the addresses.
    #[arg(long, default_value = "pod-id-link0")]
    pub link_name: String,

    /// Kind of link to create when it does not exist (auto: dummy, or a
    /// port-less bridge on kernels without the dummy driver).
    #[arg(long, value_enum, default_value_t = LinkKind::Auto)]
    pub link_kind: LinkKind,

    /// Undo: delete the link init created (its addresses and routes go with it).
    #[arg(long)]
    pub remove: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// EKS cluster name, sent to EKS Auth.
    #[arg(short = 'c', long, env = "EKS_CLUSTER_NAME")]
    pub cluster_name: String,

    /// Port of the credential endpoint on every bind host.
    #[arg(short = 'p', long, default_value_t = 80)]
    pub port: u16,

    /// Addresses to serve on, comma-separated; IPv6 in brackets or bare.
    #[arg(short = 'b', long = "bind-hosts", default_value = DEFAULT_BIND_HOSTS, value_delimiter = ',', value_parser = parse_host)]
    pub bind_hosts: Vec<IpAddr>,

    /// Port of /healthz and /readyz, on localhost.
    #[arg(long, default_value_t = 2703)]
    pub probe_port: u16,

    /// Address of the Prometheus endpoint.
    #[arg(long, default_value = "0.0.0.0", value_parser = parse_host)]
    pub metrics_address: IpAddr,

    /// Port of the Prometheus endpoint (/metrics).
    #[arg(long, default_value_t = 2705)]
    pub metrics_port: u16,

    /// Renew cached credentials after holding them this long (0 disables the cache).
    #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
    pub max_credential_retention_before_renewal: std::time::Duration,

    /// Identities kept in the credential cache.
    #[arg(long, default_value_t = 2000)]
    pub max_cache_size: u64,

    /// Renewals of cached credentials per second, at most (over it, a
    /// request is answered from the cache and a later one renews).
    #[arg(long, default_value_t = 3.0)]
    pub max_service_qps: f64,

    /// EKS Auth endpoint URL (else AWS_ENDPOINT_URL_EKS_AUTH, else the regional one).
    #[arg(long)]
    pub endpoint: Option<String>,

    /// Hybrid nodes: sign EKS Auth calls with the shared credentials file
    /// (AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials, default
    /// profile), re-read every minute and whenever it changes, as the node's
    /// tooling rotates it. `--rotate-credentials`, `=true` or ` true`.
    #[arg(
        long,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub rotate_credentials: bool,

    /// With --rotate-credentials: how long credentials read from the file
    /// are used before it is read again.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub rotate_credentials_interval: std::time::Duration,

    /// This node's name, sent to EKS Auth as eksNodeName.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Connect timeout of one EKS Auth attempt.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: std::time::Duration,

    /// Timeout of one EKS Auth attempt.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub upstream_attempt_timeout: std::time::Duration,

    /// Attempts per EKS Auth call (jittered exponential backoff between).
    #[arg(long, default_value_t = 3)]
    pub upstream_max_attempts: u32,

    /// One EKS Auth call, retries and backoff included, ends within this:
    /// a cold request is answered (with a 500 naming the cause) before the
    /// SDKs' 2 s connect + 5 s read budget gives up.
    #[arg(long, default_value = "1800ms", value_parser = humantime::parse_duration)]
    pub upstream_deadline: std::time::Duration,

    /// Concurrent connections to the credential endpoint, all clients
    /// together; more are closed at accept.
    #[arg(long, default_value_t = 2048)]
    pub max_connections: usize,

    /// Concurrent connections one client may hold (a pod; a node process's
    /// cgroup; an unattributed source address); more are closed at accept.
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_client: usize,

    /// A new connection must send its first byte within this.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub first_request_timeout: std::time::Duration,

    /// A client must send its request headers within this time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: std::time::Duration,

    /// Threads that serve credential requests, each accepting on the same
    /// listening sockets and answering its own connections start to end
    /// (the first of them also runs everything else). One answers tens of
    /// thousands of cached requests a second; a second lets a burst of new
    /// connections use two cores. Not one per core: a node's pods ask far
    /// less, and each thread costs memory.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,

    /// Request header buffer size (bytes, at least 8192).
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: std::time::Duration,

    /// Caller verification: auto (enforce where the node supports it, else
    /// off with a warning), enforce (refuse to start without it), audit
    /// (check and record, still serve), off.
    #[arg(long, value_enum, default_value_t = AttributionMode::Auto, env = "EKS_POD_IDENTITY_ATTRIBUTION")]
    pub attribution: AttributionMode,

    /// cgroup2 directory the kernel programs attach to (default: the root of
    /// the cgroup2 mount, i.e. every process of the node).
    #[arg(long)]
    pub cgroup_root: Option<std::path::PathBuf>,

    /// Where the host's cgroup2 hierarchy is mounted (default: found in
    /// /proc/self/mountinfo). In a container with its own cgroup namespace,
    /// point it at a hostPath mount of the host's /sys/fs/cgroup.
    #[arg(long)]
    pub cgroup_mount: Option<std::path::PathBuf>,

    /// kubelet's pod cgroup root, relative to the cgroup2 mount; repeat for
    /// several. Only cgroups below one of these, in kubelet's layout and
    /// owned by root all the way down, are pods. Default: kubepods.slice and
    /// kubepods (kubelet's `--cgroup-root=/` with the systemd or cgroupfs
    /// driver); with `--cgroup-root=/kubelet`: kubelet.slice/kubelet-kubepods.slice
    /// or kubelet/kubepods.
    #[arg(long = "kubepods-root", value_name = "PATH")]
    pub kubepods_roots: Vec<String>,

    /// bpffs directory where the kernel programs are pinned, so that they
    /// stay attached when the agent restarts and the next agent adopts them
    /// (upgrades and crashes lose no attribution). Empty: not pinned.
    #[arg(long, default_value = "/sys/fs/bpf/eks-pod-identity-agent")]
    pub bpf_pin_dir: std::path::PathBuf,

    /// Unix socket (root only) on which the serving agent hands its
    /// listening sockets to its successor, so an upgrade refuses no
    /// connection. A hostPath shared by the DaemonSet's pods. Empty: no
    /// handover (a new agent binds its own listeners).
    #[arg(long, default_value = "/run/eks-pod-identity-agent/handover.sock")]
    pub handover_socket: std::path::PathBuf,

    /// On SIGTERM before a successor took over: keep serving this long for
    /// one to take the listeners (with their queued connections) before
    /// stopping. 0: stop at once.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub successor_wait: std::time::Duration,

    /// Also append audit events (JSON lines) to this file.
    #[arg(long)]
    pub audit_log: Option<std::path::PathBuf>,

    /// Credential requests per second for all clients together, as the
    /// reference (burst: --max-request-burst); over it: 429 (0: no limit).
    #[arg(long, default_value_t = 1000)]
    pub max_request_rate: u32,

    /// Burst of the all-clients limit.
    #[arg(long, default_value_t = 500)]
    pub max_request_burst: u32,

    /// Credential requests per second allowed per client — a pod, a node
    /// process's cgroup, or an unattributed source address (0: no limit).
    #[arg(long, default_value_t = 20)]
    pub pod_rate_limit: u32,

    /// Burst of the per-client rate limit.
    #[arg(long, default_value_t = 40)]
    pub pod_rate_burst: u32,

    /// How often to drop cached credentials of pods whose cgroup is gone.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub pod_gc_interval: std::time::Duration,

    /// IMDS guard: audit (record every pod's connects to the instance
    /// metadata service), enforce (also refuse, EPERM, those of pods no
    /// --imds-allow rule names), off. Needs the kernel programs.
    #[arg(long, value_enum, default_value_t = crate::imds::policy::ImdsMode::Audit, env = "EKS_POD_IDENTITY_IMDS")]
    pub imds: crate::imds::policy::ImdsMode,

    /// Pods that may use the IMDS: a namespace (`kube-system`) or a pod
    /// name prefix within one (`kube-system/aws-node`). Repeat, or separate
    /// with commas. Node processes (outside pods) always may.
    #[arg(long = "imds-allow", value_name = "NAMESPACE[/POD-PREFIX]", value_delimiter = ',', value_parser = crate::imds::policy::AllowRule::parse)]
    pub imds_allow: Vec<crate::imds::policy::AllowRule>,

    /// What a connect from a pod not classified yet (its log directory not
    /// seen, or a cgroup not in kubelet's layout) gets. Default: allow in
    /// audit, deny in enforce.
    #[arg(long, value_enum)]
    pub imds_unclassified: Option<crate::imds::policy::Unclassified>,

    /// The instance metadata service's addresses (one per family).
    #[arg(long, default_value = "169.254.169.254,[fd00:ec2::254]", value_delimiter = ',', value_parser = parse_host)]
    pub imds_hosts: Vec<IpAddr>,

    /// The instance metadata service's port.
    #[arg(long, default_value_t = 80)]
    pub imds_port: u16,

    /// kubelet's pod log directory (`<namespace>_<pod>_<uid>` per pod):
    /// where the IMDS guard learns a pod's namespace and name without the
    /// Kubernetes API. A read-only hostPath.
    #[arg(long, default_value = "/var/log/pods")]
    pub pod_log_dir: std::path::PathBuf,

    /// A pod connecting to the IMDS in a loop gets one audit event at its
    /// first connect of an interval and one summary (with a count) at the
    /// interval's end. 0: an event per connect the kernel reports (at most
    /// 32 a second per pod; the rest are summarised each second).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub imds_audit_interval: std::time::Duration,
}

impl ServerArgs {
    /// `--bpf-pin-dir`, unless empty.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        Some(self.bpf_pin_dir.as_path()).filter(|p| !p.as_os_str().is_empty())
    }

    /// `--handover-socket`, unless empty.
    pub fn handover_socket(&self) -> Option<&std::path::Path> {
        Some(self.handover_socket.as_path()).filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttributionMode {
    Auto,
    Enforce,
    Audit,
    Off,
}

/// The mode actually in force once `auto` has been decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeInForce {
    Enforce,
    Audit,
    Off,
}

impl ModeInForce {
    pub const ALL: [ModeInForce; 3] = [ModeInForce::Enforce, ModeInForce::Audit, ModeInForce::Off];

    /// As metrics, audit events and `/readyz` say it.
    pub fn label(self) -> &'static str {
        match self {
            ModeInForce::Enforce => "enforce",
            ModeInForce::Audit => "audit",
            ModeInForce::Off => "off",
        }
    }
}

impl std::fmt::Display for AttributionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttributionMode::Auto => "auto",
            AttributionMode::Enforce => "enforce",
            AttributionMode::Audit => "audit",
            AttributionMode::Off => "off",
        })
    }
}

/// `169.254.170.23`, `[fd00:ec2::23]` or `fd00:ec2::23`.
pub fn parse_host(raw: &str) -> Result<IpAddr, String> {
    let trimmed = raw.trim();
    let bare = trimmed
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(trimmed);
    bare.parse()
        .map_err(|_| format!("{raw:?} is not an IPv4 or IPv6 address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_in_the_reference_style() {
        let cases = [
            ("169.254.170.23", Some("169.254.170.23")),
            ("[fd00:ec2::23]", Some("fd00:ec2::23")),
            ("fd00:ec2::23", Some("fd00:ec2::23")),
            (" 169.254.170.23 ", Some("169.254.170.23")),
            ("[169.254.170.23", None),
            ("localhost", None),
        ];
        for (raw, expected) in cases {
            let got = parse_host(raw).ok();
            assert_eq!(got, expected.map(|e| e.parse().unwrap()), "{raw}");
        }
    }

    #[test]
    fn init_defaults_match_the_reference() {
        let cli = Cli::try_parse_from(["agent", "initialize"]).unwrap();
        let Command::Init(args) = cli.command else {
            panic!("not init")
        };
        assert_eq!(args.link_name, "pod-id-link0");
        assert_eq!(
            args.bind_hosts,
            vec![
                "169.254.170.23".parse::<IpAddr>().unwrap(),
                "fd00:ec2::23".parse().unwrap()
            ]
        );
        assert_eq!(args.link_kind, LinkKind::Auto);
    }

    #[test]
    fn server_defaults_match_the_reference() {
        let cli = Cli::try_parse_from(["agent", "server", "-c", "test-cluster"]).unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not server")
        };
        assert_eq!(args.cluster_name, "test-cluster");
        assert_eq!(
            (args.port, args.probe_port, args.metrics_port),
            (80, 2703, 2705)
        );
        assert_eq!(
            args.max_credential_retention_before_renewal,
            std::time::Duration::from_secs(3 * 3600)
        );
        assert_eq!(args.max_cache_size, 2000);
        assert_eq!(args.max_service_qps, 3.0);
        assert_eq!(args.bind_hosts.len(), 2);
        assert_eq!(args.attribution, AttributionMode::Auto);
        assert!(
            Cli::try_parse_from(["agent", "server"]).is_err(),
            "cluster name is required"
        );
    }
}
