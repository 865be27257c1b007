//! The command line: subcommands and flags, compatible with the reference
//! agent's where it has them (DESIGN §3).

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "eks-pod-identity-agent",
    version,
    about = "EKS Pod Identity Agent with kernel caller attribution"
)]
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(
        short = 'v',
        long,
        global = true,
        default_value = "info",
        env = "EKS_POD_IDENTITY_AGENT_VERBOSITY"
    )]
    pub verbosity: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the version.
    Version,
}
