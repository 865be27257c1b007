//! Project automation: `cargo xtask bench | demo | fuzz | setup | test`.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo automation for the EKS Pod Identity Agent")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// What attribution costs, as ratios against a same-run baseline.
    Bench {
        /// Sections to run (default: all): attribution, upgrade,
        /// throughput, footprint.
        sections: Vec<String>,
    },
    /// The whole system on one machine: node, pods, agent, fake EKS Auth.
    Demo {
        /// Leave it running (and print how to talk to it) until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Coverage-guided fuzzing of the parsers and the request path.
    Fuzz {
        /// One target (default: all of them).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Install what building the kernel programs needs (idempotent).
    Setup,
    /// setup, then fmt, clippy and every test (privileged ones need root).
    Test {
        /// Passed to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        extra: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Bench { sections } => bench::bench(&sections),
        Task::Demo { keep } => demo::demo(keep),
        Task::Fuzz { target, time } => {
            setup::setup()?;
            fuzz::fuzz(target.as_deref(), time)
        }
        Task::Setup => setup::setup(),
        Task::Test { extra } => test::test(&extra),
    }
}
