//! `eks-pod-identity-agent`: the command line. Each subcommand hands over to
//! the module that owns it; anyhow lives only here, at the edge.

use agent::config::{Cli, Command};
use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    agent::logging::init(&cli.verbosity);
    match cli.command {
        Command::Version => {
            println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
