//! The command line: subcommands and flags, compatible with the reference
//! agent's where it has them (DESIGN §3).

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
    /// Own the link-local addresses: create the link, addresses and routes
    /// (run as the DaemonSet's init container; needs CAP_NET_ADMIN).
    Init(InitArgs),
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
        let cli = Cli::try_parse_from(["agent", "init"]).unwrap();
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
}
