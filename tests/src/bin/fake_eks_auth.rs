//! The fake EKS Auth as a small standalone program (loopback only).
//!
//! `fake-eks-auth [--associate NS/SA=ROLE]… [--token NS/SA/POD_NAME/POD_UID=FILE]…`
//! generates a cluster signing key, serves AssumeRoleForPodIdentity on
//! 127.0.0.1 (an ephemeral port, printed), writes a signed projected-style
//! token per `--token`, and runs until Ctrl-C.

use std::{
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use harness::{
    fake_eks_auth::FakeEksAuth,
    tokens::{Issuer, TokenSpec},
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-eks-auth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let issuer = Issuer::generate()?;
    let fake = FakeEksAuth::start(None, issuer.decoding_key())?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--associate" => {
                let (sa, role) = value.split_once('=').context("--associate NS/SA=ROLE")?;
                let (ns, sa) = sa.split_once('/').context("--associate NS/SA=ROLE")?;
                fake.associate(ns, sa, role);
            }
            "--token" => {
                let (who, file) = value
                    .split_once('=')
                    .context("--token NS/SA/POD/UID=FILE")?;
                let parts: Vec<&str> = who.split('/').collect();
                let [ns, sa, pod, uid] = parts[..] else {
                    bail!("--token NS/SA/POD/UID=FILE");
                };
                std::fs::write(file, issuer.mint(&TokenSpec::new(ns, sa).pod(pod, uid))?)?;
            }
            other => bail!("unknown flag {other}"),
        }
    }
    println!("{}", fake.endpoint());
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("fake-eks-auth: {} calls served", fake.calls());
    Ok(())
}
