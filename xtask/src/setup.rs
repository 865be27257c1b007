//! `cargo xtask setup`: installs what building the kernel programs needs on a
//! fresh Debian 12 machine (docs/architecture.md §8), and nothing when it is all there.
//!
//! * Debian's `rustc-web` ships a precompiled `core` for the bpf targets, so
//!   no nightly/build-std is needed; `cargo-web` must come along or rustup
//!   silently runs nightly's cargo for the eBPF build.
//! * `bpf-linker` must link the same LLVM major as that rustc (22): it is
//!   built from crates.io against Debian's shared libLLVM.
//! * `iproute2` builds the test topologies; `podman` and `runc` run the
//!   DaemonSet's containers in the container test.
//! * `kubernetes-validate` (PyPI) validates deploy/ against the Kubernetes
//!   schemas.
//! * `cargo-fuzz` runs the fuzz targets.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{run, workspace_root};

const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "iproute2",
    // The container test: the image built from the Dockerfile, the
    // DaemonSet's containers run as a runtime runs them (runc: crun refuses
    // this kernel generation's hybrid cgroup layout).
    "podman",
    "runc",
    // `cargo xtask bench`: the cached credential path against a static file
    // server (nginx) under the same load generator (wrk).
    "nginx-light",
    "wrk",
];
const BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn setup() -> Result<()> {
    let missing = missing_apt_packages();
    if !missing.is_empty() {
        ensure_apt()?;
        eprintln!("setup: installing {} with apt-get", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !Path::new(BPF_CORE).is_dir() {
        bail!("{BPF_CORE} is missing after installing libstd-rust-web-dev-bpf: unsupported system");
    }
    ensure_bpf_linker()?;
    ensure_manifest_validator()?;
    ensure_cargo_fuzz()?;
    ensure_bpffs()?;
    eprintln!(
        "setup: eBPF toolchain ready (Debian rustc-web + bpf-linker {BPF_LINKER_VERSION}, LLVM {LLVM_MAJOR})"
    );
    Ok(())
}

fn missing_apt_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn ensure_apt() -> Result<()> {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let debian = release
        .lines()
        .any(|l| l == "ID=debian" || l.starts_with("ID_LIKE=") && l.contains("debian"));
    if !debian || which("apt-get").is_none() {
        bail!(
            "unsupported system: this setup installs Debian's {} with apt-get (Debian 12 + backports of \
             rustc-web with LLVM {LLVM_MAJOR}). Elsewhere install a rustup nightly with rust-src and \
             bpf-linker yourself, and build with EPIA_EBPF_TOOLCHAIN=nightly.",
            APT_PACKAGES.join(", ")
        );
    }
    if !crate::cmd::is_root() {
        bail!(
            "setup must install {} and needs root",
            APT_PACKAGES.join(", ")
        );
    }
    Ok(())
}

/// `$CARGO_HOME/bin`, where `cargo install` puts binaries and where the
/// agent's build script looks for bpf-linker.
fn cargo_bin() -> Result<PathBuf> {
    let home = match env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
            .join(".cargo"),
    };
    Ok(home.join("bin"))
}

fn ensure_bpf_linker() -> Result<()> {
    let linker = cargo_bin()?.join("bpf-linker");
    let current = Command::new(&linker)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if current.as_deref() == Some(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        return Ok(());
    }
    let libllvm = find_libllvm()?;
    // bpf-linker's build wants `$LLVM_PREFIX/lib/libLLVM.so`; Debian ships
    // only the versioned name, so point a private prefix at it.
    let prefix = workspace_root()?.join("target/xtask/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );
    run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

fn ensure_cargo_fuzz() -> Result<()> {
    let current = Command::new(cargo_bin()?.join("cargo-fuzz"))
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if current.is_some_and(|v| v.ends_with(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run(
        Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "install",
            "--locked",
            &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        ]),
    )
}

/// kubernetes-validate (PyPI) checks deploy/ against the Kubernetes schemas
/// it ships (no network at test time).
fn ensure_manifest_validator() -> Result<()> {
    let present = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("setup: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} (pip)");
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))
}

/// bpffs at /sys/fs/bpf, as every Kubernetes node's systemd mounts it: the
/// agent pins its kernel programs there so they outlive a restart, and the
/// upgrade tests prove it. (Only root can mount; without root the
/// privileged tests do not run anyway.)
fn ensure_bpffs() -> Result<()> {
    const BPFFS: &str = "/sys/fs/bpf";
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, kind) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS) && kind == Some("bpf")
    });
    if mounted || !crate::cmd::is_root() {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at {BPFFS}");
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn find_libllvm() -> Result<PathBuf> {
    for dir in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ] {
        let candidate = Path::new(dir).join(format!("libLLVM.so.{LLVM_MAJOR}.1"));
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!("libLLVM.so.{LLVM_MAJOR}.1 not found: rustc-web should have brought it")
}

fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
