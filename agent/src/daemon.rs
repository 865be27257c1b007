//! `server`: wires the modules together and runs until SIGTERM/SIGINT.
//! The application's edge, so errors here are anyhow with context.

use std::{
    net::SocketAddr,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::JoinSet,
};
use tracing::{error, info, warn};

use crate::{
    caller::attribution::{
        Accepted, AttachOptions, Attribution, AttributionError, OpenerLookup, Provenance,
    },
    caller::cgroup::{self, CgroupResolver, PodLayout},
    caller::identify::Identifier,
    capabilities,
    config::{AttributionMode, ModeInForce, ServerArgs},
    credentials::{CacheOptions, CredentialCache},
    handover::{
        self,
        taking::{Predecessor, WithPredecessor},
    },
    hygiene::PodRegistry,
    imds::{self, policy::ImdsMode},
    link::Netlink,
    node_credentials::RotatingSharedCredentials,
    serving::admission::{self, ConnectionBudget},
    serving::handler::Verification,
    serving::handler::{self, AppState},
    serving::pauses::Pauses,
    serving::ports,
    serving::probes::{self, ProbeState},
    serving::ratelimit::ClientRateLimiter,
    serving::server::{self, Accepting, HttpLimits},
    serving::threads::{AcceptLoop, MakeLoops, ServingThreads},
    telemetry::audit::Auditor,
    telemetry::losses,
    telemetry::metrics::Metrics,
    token,
    upstream::{EksAuth, UpstreamOptions},
};

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if capabilities::port_is_privileged(args.port) {
        capabilities::require(&[capabilities::NET_BIND_SERVICE])
            .with_context(|| format!("serving on port {}", args.port))?;
    }
    report_missing_addresses(&args).await;
    // Every budgeted connection is a descriptor: refuse to start with budgets
    // the descriptor limit cannot honour (EMFILE would stop every listener,
    // the probe's too).
    let wanted = args.max_connections + 2 * SIDE_CONNECTIONS + DESCRIPTOR_MARGIN;
    let limit = raise_descriptor_limit().context("raising RLIMIT_NOFILE")?;
    if (limit as usize) < wanted {
        bail!(
            "RLIMIT_NOFILE is {limit}, below the {wanted} descriptors --max-connections={} needs; raise the limit or lower --max-connections",
            args.max_connections
        );
    }
    // Set up beside the kernel programs (on another worker), awaited once
    // the listeners are open.
    // A JoinSet: the task is aborted if start-up fails before it is awaited.
    let mut upstream = JoinSet::new();
    upstream.spawn(upstream_client(
        UpstreamOptions {
            cluster_name: args.cluster_name.clone(),
            endpoint: args.endpoint.clone(),
            node_name: args.node_name.clone(),
            connect_timeout: args.upstream_connect_timeout,
            attempt_timeout: args.upstream_attempt_timeout,
            max_attempts: args.upstream_max_attempts,
            deadline: args.upstream_deadline,
            node_credentials: None,
        },
        args.rotate_credentials
            .then_some(args.rotate_credentials_interval),
    ));
    let metrics = Arc::new(Metrics::new());
    // The agent this one takes over from, if any: set once the listeners
    // are taken, before the first accept (it vouches for its stamps).
    let predecessor: Arc<OnceLock<Predecessor>> = Arc::default();
    // The programs are attached before anything listens: a connection
    // accepted earlier would carry no stamp and be refused as unattributed.
    let Attached {
        verification,
        identifier,
        attribution,
        detail: attribution_detail,
        imds,
    } = verification(&args, &metrics, &predecessor)?;
    let attributed = verification.is_some();
    // Programs first, then the listeners: taken from the agent serving on
    // this node if there is one (no connection refused while we change
    // places), else bound here.
    let mut inherited = match take_over(&args, attribution.as_deref()) {
        Ok(inherited) => inherited,
        // An agent answers but the handover failed: leave everything of it
        // in place (it keeps serving); binding below fails while it runs.
        Err(e) => {
            warn!(error = %e, "the agent serving on this node did not hand over; binding our own listeners");
            None
        }
    };
    // Programs of agents that are gone (a crash) go; those of a live agent
    // are held by it and stay.
    retire_other_generations(attribution.as_deref());
    let probe_addr = SocketAddr::from(([127, 0, 0, 1], args.probe_port));
    let metrics_addr = SocketAddr::new(args.metrics_address, args.metrics_port);
    // Nothing handed over, yet the listeners may be held: by an agent that
    // offers no handover (no pinned programs, so no key to prove a
    // successor with) or whose handover failed. Wait for it to go rather
    // than exit: in a surge update the old pod is removed only once this
    // one is ready, and the kubelet's probe of this pod's port is answered
    // by the old agent while this one runs.
    let mut stop = Stop::install()?;
    if inherited.is_none() {
        let served = |role, addr| ports::Port { addr, role };
        let ports: Vec<ports::Port> = args
            .bind_hosts
            .iter()
            .map(|host| served(ports::Role::Credentials, SocketAddr::new(*host, args.port)))
            .chain([
                served(ports::Role::Probe, probe_addr),
                served(ports::Role::Metrics, metrics_addr),
            ])
            .collect();
        // Stopped while waiting (a rollback, a drain): go, as told, and
        // leave nothing of this agent's attached.
        tokio::select! {
            () = ports::wait_until_released(&ports) => {}
            () = stop.requested() => {
                info!("stopped while waiting for the agent's ports");
                release_programs(attribution.as_deref());
                return Ok(());
            }
        }
    }
    let mut open =
        |addr: SocketAddr, save_syns: bool| match inherited.as_mut().and_then(|i| i.take(addr)) {
            Some(listener) => server::adopt(listener, save_syns),
            None => server::bind(addr, save_syns),
        };
    let (listeners, failed) =
        server::open_all(&args.bind_hosts, args.port, |addr| open(addr, attributed));
    let probe_listener = open(probe_addr, attributed).with_context(|| {
        format!("binding the probe port {probe_addr} (is another process, e.g. containerd, using it? set --probe-port)")
    })?;
    let metrics_listener = open(metrics_addr, false)
        .with_context(|| format!("binding the metrics port {metrics_addr} (set --metrics-port)"))?;
    // Every listener taken: the previous agent, if any, is in place before
    // the first accept, to vouch for what its programs stamped.
    if let Some(inherited) = inherited {
        let _ = predecessor.set(inherited.into_predecessor());
    }
    let mut unbound = Vec::new();
    for (addr, err) in &failed {
        error!(%addr, error = %err, "cannot serve on this address; continuing with the others");
        unbound.push(format!("{addr} ({err})"));
    }
    if listeners.is_empty() {
        bail!(
            "no bind host could be bound ({}); run `eks-pod-identity-agent init` first",
            unbound.join(", ")
        );
    }
    let bound: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();

    let upstream = upstream
        .join_next()
        .await
        .context("the EKS Auth client's set-up task is gone")?
        .context("setting up the EKS Auth client")??;
    let credentials = CredentialCache::new(
        Arc::new(upstream),
        metrics.clone(),
        CacheOptions {
            max_entries: args.max_cache_size,
            retention: args.max_credential_retention_before_renewal,
            max_service_qps: args.max_service_qps,
        },
    );
    let auditor = Auditor::new(
        &args.cluster_name,
        args.audit_log.as_deref(),
        metrics.clone(),
    )
    .with_context(|| format!("opening the audit log {:?}", args.audit_log))?;
    let state = Arc::new(AppState {
        cluster_name: args.cluster_name.clone(),
        served_hosts: args.bind_hosts.clone(),
        credentials: credentials.clone(),
        metrics: metrics.clone(),
        auditor: Arc::new(auditor),
        verification,
        identifier,
        limiter: ClientRateLimiter::new(args.pod_rate_limit, args.pod_rate_burst),
        global_limiter: global_limiter(args.max_request_rate, args.max_request_burst),
        tokens: token::Recent::new(handler::RECENT_TOKENS),
    });

    let limits = HttpLimits {
        header_read_timeout: args.header_read_timeout,
        first_request_timeout: args.first_request_timeout,
        max_header_bytes: args.max_header_bytes,
    };
    let graceful = Arc::new(GracefulShutdown::new());
    let (accepting, accepting_rx) = watch::channel(Accepting::Yes);
    let pauses = Pauses::new();
    // What a successor will be handed: every listener, by its address.
    let mut offered = Vec::new();
    let mut keep = |listener: &tokio::net::TcpListener| {
        if let (Ok(addr), Ok(fd)) = (listener.local_addr(), listener.as_fd().try_clone_to_owned()) {
            offered.push((addr, fd));
        }
    };
    let mut tasks = JoinSet::new();

    let budget = ConnectionBudget::new(args.max_connections, args.max_connections_per_client);
    for listener in &listeners {
        keep(listener);
    }
    // The credential listeners' accept loops, for the main runtime and for
    // each serving thread.
    let credential_loops: Arc<MakeLoops> = Arc::new({
        let (state, limits, graceful, accepting, pauses) = (
            state.clone(),
            limits.clone(),
            graceful.clone(),
            accepting_rx.clone(),
            pauses.clone(),
        );
        move |listeners: Vec<tokio::net::TcpListener>| {
            listeners
                .into_iter()
                .map(|listener| {
                    let handling = state.clone();
                    Box::pin(server::serve(
                        listener,
                        limits.clone(),
                        graceful.clone(),
                        accepting.clone(),
                        pauses.clone(),
                        admitter(state.clone(), budget.clone(), "credentials", true),
                        move |conn, req| handler::handle(handling.clone(), conn, req),
                    )) as AcceptLoop
                })
                .collect()
        }
    });
    let mut serving = ServingThreads::start(
        usize::from(args.worker_threads.saturating_sub(1)),
        &listeners,
        &credential_loops,
    );
    for accept_loop in credential_loops(listeners) {
        tasks.spawn(accept_loop);
    }
    drop(credential_loops);
    let probe_state = Arc::new(ProbeState {
        bound: bound.clone(),
        unbound,
        details: vec![attribution_detail],
    });
    keep(&probe_listener);
    keep(&metrics_listener);
    // Probes and metrics have few legitimate clients (the kubelet, a
    // scraper): each listener its own small budget, each client a sliver of
    // it, so a pod holding connections cannot fail the agent's liveness.
    let side_budget = || ConnectionBudget::new(SIDE_CONNECTIONS, SIDE_CONNECTIONS_PER_CLIENT);
    tasks.spawn(server::serve(
        probe_listener,
        limits.clone(),
        graceful.clone(),
        accepting_rx.clone(),
        pauses.clone(),
        admitter(state.clone(), side_budget(), "probe", true),
        {
            let probe_state = probe_state.clone();
            move |_conn, req| probes::handle_probe(probe_state.clone(), req)
        },
    ));
    // Scrapers come from other hosts: nothing for the kernel to attribute.
    tasks.spawn(server::serve(
        metrics_listener,
        limits.clone(),
        graceful.clone(),
        accepting_rx.clone(),
        pauses.clone(),
        admitter(state.clone(), side_budget(), "metrics", false),
        {
            let exported = metrics.clone();
            move |_conn, req| probes::handle_metrics(exported.clone(), probe_state.clone(), req)
        },
    ));
    let losses = tokio::spawn({
        let state = state.clone();
        losses::watch(metrics.clone(), move || state.auditor.lost())
    });
    let imds_reader = imds.map(|guard| {
        tokio::spawn(guard.read(
            state.auditor.clone(),
            metrics.clone(),
            accepting_rx.clone(),
            args.imds_audit_interval,
        ))
    });
    let housekeeping = tokio::spawn(pod_housekeeping(
        state.clone(),
        attribution.clone(),
        args.pod_gc_interval,
    ));
    release_startup_memory();
    info!(cluster_name = args.cluster_name, listeners = ?bound, probe = %probe_addr, metrics = %metrics_addr, "serving");
    if let Some(previous) = predecessor.get() {
        let pid = previous.pid();
        match previous.serving() {
            Ok(()) => {
                info!(
                    predecessor_pid = pid,
                    "took over from the agent serving on this node"
                );
            }
            // It stays in its accept loop too: both serve, nothing lost.
            Err(e) => {
                warn!(error = %e, predecessor_pid = pid, "could not tell the previous agent we serve");
            }
        }
    }
    let offer = match args.handover_socket() {
        Some(path) => {
            match handover::giving::offer(
                path.to_owned(),
                offered,
                accepting.clone(),
                pauses.clone(),
                attribution.clone(),
            ) {
                Ok(offer) => Some(offer),
                Err(e) => {
                    warn!(error = %e, path = %path.display(), "cannot offer a handover: the next agent will bind its own listeners once this one is gone");
                    None
                }
            }
        }
        None => None,
    };

    stop.requested().await;
    // Stopped before a successor took over (the kubelet does not wait for
    // one): keep serving a moment, so a successor starting now takes the
    // listeners with their queued connections instead of finding them gone.
    if let Some(offer) = offer.clone()
        && !args.successor_wait.is_zero()
    {
        let wait = args.successor_wait;
        info!(
            ?wait,
            "stopping: serving until a successor takes over, or for --successor-wait"
        );
        let _ = tokio::task::spawn_blocking(move || offer.wait_for_successor(wait)).await;
    }
    info!(grace = ?args.shutdown_grace, "shutting down: no new connections, finishing in-flight requests");
    accepting.send_replace(Accepting::Stop);
    // Settled before anything else: a successor in the middle of taking
    // over finishes, and from here on none can.
    let succeeded = match offer {
        Some(offer) => tokio::task::spawn_blocking(move || offer.close())
            .await
            .unwrap_or(false),
        None => false,
    };
    losses.abort();
    // It settled its summaries when accepting stopped.
    if let Some(reader) = imds_reader {
        let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
    }
    housekeeping.abort();
    while tasks.join_next().await.is_some() {}
    serving.loops_ended().await;
    let graceful = Arc::try_unwrap(graceful)
        .map_err(|_| anyhow::anyhow!("listeners still hold the shutdown handle"))?;
    match tokio::time::timeout(args.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => info!("all connections finished"),
        Err(_) => warn!("shutdown grace elapsed with connections still open; exiting anyway"),
    }
    let _ = tokio::task::spawn_blocking(move || serving.finish()).await;
    if let (Some(predecessor), true) = (predecessor.get(), succeeded) {
        predecessor.handed_on();
    }
    // Last, once every connection this agent accepted has been answered.
    release_programs(attribution.as_deref());
    Ok(())
}

/// A listener group's admission: who opened the connection (where the
/// kernel attributes it, and `identify`), charged to the group's budget.
fn admitter(
    state: Arc<AppState>,
    budget: ConnectionBudget,
    listener: &'static str,
    identify: bool,
) -> impl Fn(Accepted) -> Option<admission::Connection> + Send + Sync + 'static {
    move |info: Accepted| {
        let identifier = state.identifier.as_ref().filter(|_| identify);
        admission::admit(info, identifier, &budget, &state.metrics, listener)
    }
}

/// This agent's programs go unless another agent (a successor of the same
/// build, or the predecessor) holds them, so an uninstall leaves nothing
/// attached and an upgrade loses nothing.
fn release_programs(attribution: Option<&Attribution>) {
    if let Some(attribution) = attribution {
        match attribution.release() {
            Ok(true) => info!("kernel programs unpinned: no other agent uses them"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "unpinning the kernel programs failed"),
        }
    }
}

/// Whether `err` comes from a permission the process lacks (a capability
/// check, or EPERM anywhere in its chain: what seccomp's default profiles
/// and a missing capability answer bpf() with), rather than from a kernel
/// without the feature. (EACCES is not taken as one: the verifier rejects
/// programs with it on kernels that cannot run them.)
fn refused_for_lack_of_permission(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<capabilities::MissingCaps>().is_some()
            || cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.raw_os_error() == Some(libc::EPERM))
    })
}

/// The reference's limiter for all callers together: `rate` per second,
/// `burst` at once (`None` when `rate` is 0).
fn global_limiter(rate: u32, burst: u32) -> Option<governor::DefaultDirectRateLimiter> {
    let rate = std::num::NonZeroU32::new(rate)?;
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(rate);
    Some(governor::RateLimiter::direct(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Descriptors beyond the connection budgets: listeners, BPF maps and
/// programs, the audit log, the EKS Auth client's connections.
const DESCRIPTOR_MARGIN: usize = 256;

/// Raises the soft descriptor limit to the hard one; returns the new soft
/// limit.
fn raise_descriptor_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}

/// Connections the probe and the metrics listener each hold at most, and
/// how many of them one client may.
const SIDE_CONNECTIONS: usize = 64;
const SIDE_CONNECTIONS_PER_CLIENT: usize = 8;

/// The caller checks as attached at start.
struct Attached {
    verification: Option<Verification>,
    identifier: Option<Identifier>,
    /// The kernel programs, to unpin at exit when no agent follows.
    attribution: Option<Arc<Attribution>>,
    /// One line for /healthz's details.
    detail: String,
    /// The IMDS guard, watching pods, its events to read once serving.
    imds: Option<imds::guard::Watching>,
}

impl Attached {
    /// Without the kernel programs: the IMDS guard cannot run either. In
    /// enforce that is a refusal to start, in audit a warning.
    fn off(args: &ServerArgs, detail: String) -> anyhow::Result<Attached> {
        match args.imds {
            ImdsMode::Enforce => bail!(
                "--imds enforce needs the kernel programs, and they are off here ({detail}); run with --attribution enforce or audit on a node that supports them, or --imds audit|off"
            ),
            ImdsMode::Audit => warn!(
                detail,
                "IMDS GUARD IS OFF: it needs the kernel programs; pods' connects to the instance metadata service go unrecorded"
            ),
            ImdsMode::Off => {}
        }
        Ok(Attached {
            verification: None,
            identifier: None,
            attribution: None,
            detail,
            imds: None,
        })
    }
}

/// The listeners of the agent serving on this node: `Ok(None)` when none
/// answers at the handover socket (or there is none), an error when one
/// answers but does not hand over.
fn take_over(
    args: &ServerArgs,
    attribution: Option<&Attribution>,
) -> Result<Option<handover::taking::Inherited>, handover::wire::WireError> {
    let Some(path) = args.handover_socket() else {
        return Ok(None);
    };
    handover::taking::take_over(
        path,
        attribution.and_then(Attribution::generation),
        args.pin_dir(),
    )
}

/// Attaches the kernel programs as `--attribution` asks. `auto` degrades to
/// off, loudly; `enforce` and `audit` refuse to start without them.
fn verification(
    args: &ServerArgs,
    metrics: &Arc<Metrics>,
    predecessor: &Arc<OnceLock<Predecessor>>,
) -> anyhow::Result<Attached> {
    if args.attribution == AttributionMode::Off {
        metrics.set_attribution_mode(ModeInForce::Off);
        return Attached::off(args, "attribution: off (--attribution off)".into());
    }
    let attached = attach(args, metrics);
    let (attribution, resolver, layout, root, imds) = match attached {
        Ok(ok) => ok,
        // A privilege withheld (a capability, a seccomp profile, an LSM) is
        // a deployment mistake, not a node without the feature: running on,
        // unprotected, would hide it. `--attribution off` says it on purpose.
        Err(e) if refused_for_lack_of_permission(&e) => {
            return Err(e.context(format!(
                "--attribution {}: the kernel programs were refused for lack of permission \
                 (a capability the container lacks, a seccomp profile or an LSM blocking bpf()); \
                 refusing to run unprotected. Grant what deploy/daemonset.yaml grants, or run \
                 with --attribution off to serve without caller verification",
                args.attribution
            )));
        }
        // Never degraded: `--imds enforce` asked for what cannot run.
        Err(e) if e.downcast_ref::<imds::guard::GuardRefused>().is_some() => return Err(e),
        Err(e) if args.attribution == AttributionMode::Auto => {
            warn!(
                error = format!("{e:#}"),
                "CALLER VERIFICATION IS OFF: this node cannot attribute connections to pods; any process holding a pod's token gets its credentials"
            );
            metrics.set_attribution_mode(ModeInForce::Off);
            return Attached::off(args, format!("attribution: off (unsupported here: {e:#})"));
        }
        Err(e) => {
            return Err(e.context(format!(
                "--attribution {} cannot work on this node",
                args.attribution
            )));
        }
    };
    let enforce = args.attribution != AttributionMode::Audit;
    let mode = if enforce {
        ModeInForce::Enforce
    } else {
        ModeInForce::Audit
    };
    metrics.set_attribution_mode(mode);
    let mode = mode.label();
    info!(mode, cgroup_root = %root.display(), "caller attribution attached");
    let attribution = Arc::new(attribution);
    let lookup: Arc<dyn OpenerLookup> = Arc::new(WithPredecessor {
        own: attribution.clone(),
        predecessor: predecessor.clone(),
    });
    Ok(Attached {
        verification: Some(Verification {
            enforce,
            node_name: args.node_name.clone(),
            cgroup_mount: resolver.mount().to_owned(),
            registry: PodRegistry::default(),
        }),
        identifier: Some(Identifier::new(lookup, resolver, layout, metrics.clone())),
        attribution: Some(attribution),
        detail: format!("attribution: {mode} (attached at {})", root.display()),
        imds,
    })
}

/// The attached programs, how cgroups are resolved, where they attach, and
/// the IMDS guard (watching pods) if on.
type AttachedParts = (
    Attribution,
    CgroupResolver,
    PodLayout,
    std::path::PathBuf,
    Option<imds::guard::Watching>,
);

fn attach(args: &ServerArgs, metrics: &Arc<Metrics>) -> anyhow::Result<AttachedParts> {
    capabilities::require(capabilities::ATTRIBUTION)?;
    let mount = match &args.cgroup_mount {
        Some(mount) => mount.clone(),
        None => cgroup::find_cgroup2_mount()?,
    };
    let root = args.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    let layout = if args.kubepods_roots.is_empty() {
        PodLayout::default()
    } else {
        PodLayout::new(&args.kubepods_roots)
    };
    if !layout.present_under(&mount) {
        bail!(
            "none of kubelet's pod cgroup roots ({}) exists under the cgroup2 mount {} (pods are not in cgroup v2 here, or set --kubepods-root)",
            layout.roots().collect::<Vec<_>>().join(", "),
            mount.display()
        );
    }
    let resolver = CgroupResolver::new(&mount)?;
    // Proves open_by_handle_at works here (CAP_DAC_READ_SEARCH) before any request needs it.
    let root_id =
        CgroupResolver::id_of(&root).with_context(|| format!("stat {}", root.display()))?;
    resolver.path_of(root_id)?;
    let guard = imds::guard::prepare(args, &mount, &layout)?;
    let mut options = AttachOptions {
        cgroup: root.clone(),
        addresses: args.bind_hosts.clone(),
        port: args.port,
        probe_port: args.probe_port,
        pin_dir: args.pin_dir().map(Path::to_owned),
        imds: guard.as_ref().map(|g| g.attach_options(args)),
    };
    let (attribution, provenance) = match Attribution::attach(&options) {
        Err(AttributionError::Pins(e)) => {
            // Attribution works; only its continuity across restarts is
            // lost. Said loudly, once, with what to do.
            warn!(error = %e, "KERNEL PROGRAMS NOT PINNED: a restart or upgrade of this agent refuses connections opened before it; mount bpffs at --bpf-pin-dir's parent");
            options.pin_dir = None;
            Attribution::attach(&options)?
        }
        attached => attached?,
    };
    match provenance {
        Provenance::Loaded => info!("kernel programs loaded (not pinned)"),
        Provenance::Pinned { generation, others } => {
            info!(generation, ?others, "kernel programs loaded and pinned")
        }
        Provenance::Adopted { generation } => {
            info!(
                generation,
                "kernel programs adopted as the previous agent left them"
            )
        }
    }
    let imds = match (guard, attribution.take_imds()) {
        (Some(guard), Some(maps)) => {
            let handoff = imds::handoff::Handoff::new(
                args.handover_socket()
                    .and_then(Path::parent)
                    .map(Path::to_owned),
                attribution.generation(),
            );
            match guard.start(maps, metrics.clone(), handoff) {
                Ok(watching) => Some(watching),
                Err(e) if args.imds == ImdsMode::Enforce => {
                    return Err(imds::guard::GuardRefused::new(format!("{e:#}")).into());
                }
                // The verdicts written so far stand in the kernel.
                Err(e) => {
                    error!(
                        error = format!("{e:#}"),
                        "IMDS guard: cannot follow pods or read events; the verdicts of pods known at start stand, new pods get --imds-unclassified"
                    );
                    None
                }
            }
        }
        _ => None,
    };
    Ok((attribution, resolver, layout, root, imds))
}

/// Unpins the kernel programs of other builds or configurations.
fn retire_other_generations(attribution: Option<&Attribution>) {
    match attribution.map(Attribution::retire_others) {
        Some(Ok(retired)) if !retired.is_empty() => {
            info!(?retired, "older kernel programs detached")
        }
        Some(Err(e)) => warn!(error = %e, "detaching older kernel programs failed"),
        _ => {}
    }
}

/// Every `every`: evicts cached credentials of pods that are gone, brings
/// the cache gauge up to date, forgets idle clients' rate-limit buckets,
/// and detaches kernel programs left by agents that have exited.
async fn pod_housekeeping(
    state: Arc<AppState>,
    attribution: Option<Arc<Attribution>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(verification) = &state.verification {
            let (gone, evicted) = verification.registry.evict_dead(&state.credentials).await;
            if gone > 0 {
                info!(
                    identities = gone,
                    evicted, "evicted credentials of pods that no longer exist"
                );
            }
        }
        state.credentials.settle().await;
        if let Some(limiter) = &state.limiter {
            limiter.forget_idle();
        }
        // Programs of a previous agent that has exited since.
        retire_other_generations(attribution.as_deref());
    }
}

/// SIGTERM and SIGINT, listened for from before the agent may wait for its
/// ports until it stops: once tokio handles a signal it handles it for good
/// (the default action, exiting, is gone), and a signal arriving while no
/// receiver exists is lost — so one pair of receivers throughout.
struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    fn install() -> anyhow::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM"),
            _ = self.int.recv() => info!("SIGINT"),
        }
    }
}

/// Says precisely which served address no link holds (init not run, or
/// removed); binding them would fail with a vaguer error.
async fn report_missing_addresses(args: &ServerArgs) {
    let missing = match Netlink::connect() {
        Ok(netlink) => netlink.missing_addresses(&args.bind_hosts).await,
        Err(e) => Err(e),
    };
    match missing {
        Ok(missing) => {
            for address in missing {
                error!(%address, "address is not assigned to any link in this network namespace; run `eks-pod-identity-agent init` (with the same --bind-hosts)");
            }
        }
        Err(e) => warn!(error = %e, "could not check the served addresses through netlink"),
    }
}

/// The EKS Auth client, signed with the node's credentials (or the rotated
/// shared file's). Loading the CA bundle and the SDK's configuration takes
/// about as long as loading the kernel programs, so `run` does both at once.
/// With `rotate` (`--rotate-credentials`), calls are signed with the
/// shared credentials file, re-read at that interval.
async fn upstream_client(
    mut options: UpstreamOptions,
    rotate: Option<Duration>,
) -> anyhow::Result<EksAuth> {
    if let Some(interval) = rotate {
        let node = RotatingSharedCredentials::from_env(interval);
        // A missing or unreadable file is an error now, not at the first
        // request.
        node.load().await.with_context(|| {
            format!(
                "--rotate-credentials: the node's credentials file {}",
                node.file()
            )
        })?;
        info!(
            file = node.file(),
            ?interval,
            "credentials rotation enabled: EKS Auth calls are signed with the shared credentials file, re-read as it rotates"
        );
        options.node_credentials = Some(node);
    }
    EksAuth::new(&options)
        .await
        .context("setting up the EKS Auth client")
}

/// Start-up's garbage — loading the kernel programs, the SDK's set-up (its
/// configuration, the CA bundle it parses) — is freed by the time the agent
/// serves, but malloc keeps freed memory in its arenas: give it back to the
/// system, once, so the agent's resident memory is what it uses.
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns the allocator's free memory to the
    // system; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
