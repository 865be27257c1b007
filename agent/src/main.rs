//! `eks-pod-identity-agent`: the command line. Each subcommand hands over to
//! the module that owns it; anyhow lives only here, at the edge.

use agent::{
    config::{Cli, Command, InitArgs},
    link::{LinkSpec, Netlink},
};
use anyhow::Context as _;
use clap::Parser as _;

mod without_libm;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Held to the end: dropping it writes out the queued log lines.
    let _logs = agent::telemetry::logging::init(cli.verbosity, cli.log_filter.as_deref());
    let result = match cli.command {
        Command::Init(args) => runtime()?.block_on(init(args)),
        Command::Server(args) => multi_thread_runtime()?.block_on(agent::daemon::run(*args)),
        Command::Version => {
            println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "failed");
    }
    result
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The main runtime: one worker (the other serving threads have runtimes
/// of their own, `serving::threads`), multi-threaded so that a blocking
/// section (an exchange with the previous agent during an upgrade) hands
/// the worker on.
fn multi_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn init(args: InitArgs) -> anyhow::Result<()> {
    agent::capabilities::require(&[agent::capabilities::NET_ADMIN]).context("init")?;
    let netlink = Netlink::connect()?;
    if args.remove {
        let removed = netlink.remove(&args.link_name).await?;
        tracing::info!(link = args.link_name, removed, "init --remove done");
        return Ok(());
    }
    let spec = LinkSpec {
        name: args.link_name,
        addresses: args.bind_hosts,
        kind: args.link_kind,
    };
    let report = netlink.init(&spec).await?;
    tracing::info!(
        link = spec.name,
        created = report.created.map(|k| k.to_string()),
        set_up = report.set_up,
        added_addresses = ?report.added_addresses,
        added_routes = ?report.added_routes,
        warnings = report.warnings.len(),
        changed = report.changed(),
        "init done"
    );
    Ok(())
}
