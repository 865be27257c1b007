//! Builds the kernel programs (`agent-ebpf`) for the bpf target and leaves the
//! object in OUT_DIR, where `attribution` embeds it.
//!
//! Two toolchains can build it (docs/architecture.md §8): Debian's `rustc-web`, which
//! ships a precompiled `core` for bpf (this machine kind; selected when
//! present), or a rustup nightly with `rust-src` (build-std). `bpf-linker`
//! must be on PATH; `cargo xtask setup` installs it into `$CARGO_HOME/bin`,
//! which is added here in case the caller's PATH lacks it.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};
use object::build::elf::SectionData;

/// Where Debian's rustc-web keeps the bpf `core`.
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=EPIA_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=PATH");
    // Relative relocations packed (DT_RELR) rather than one 24-byte RELA
    // entry each: ~22 000 of them, 535 KB of table that the dynamic loader
    // reads once at start and that stayed resident — a twentieth of the
    // idle agent's memory. Needs glibc 2.36 (Debian 12, the image's
    // distroless cc-debian12).
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    put_bpf_linker_on_path()?;

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("agent crate has no parent directory")?;
    let ebpf_dir = workspace.join("agent-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 workspace path")?;

    let chosen = env::var("EPIA_EBPF_TOOLCHAIN").ok();
    let toolchain = match chosen.as_deref() {
        Some("nightly") => Toolchain::Nightly,
        Some(other) => Toolchain::Custom(other),
        None if Path::new(DEBIAN_BPF_CORE).is_dir() && Path::new("/usr/bin/cargo").exists() => {
            Toolchain::Custom("/usr")
        }
        None => Toolchain::Nightly,
    };
    if !matches!(toolchain, Toolchain::Nightly) {
        // aya-ebpf needs one unstable feature, the programs one more (an
        // atomic add); allow them for those crates only. (RUSTC_BOOTSTRAP=1
        // would make aya-build ask for build-std.)
        // SAFETY: build scripts are single-threaded; set before any child.
        unsafe { env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf,agent_ebpf") };
    }

    // The test-only ABI variant reaches the kernel programs too.
    let features: &[&str] = if env::var_os("CARGO_FEATURE_ABI_VARIANT").is_some() {
        &["abi-variant"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: "agent-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        toolchain,
    )?;
    let object =
        PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?).join("agent-ebpf");
    strip_dwarf(&object)
}

/// Drops the kernel object's DWARF (`.debug_*` and their relocations): the
/// linker needs it to emit BTF, the loader needs only the BTF. Four fifths
/// of the object, embedded in the binary, and within reach of every start.
fn strip_dwarf(object: &Path) -> anyhow::Result<()> {
    let data = std::fs::read(object).with_context(|| format!("{}", object.display()))?;
    let mut elf = object::build::elf::Builder::read(&*data)
        .with_context(|| format!("{} is not an ELF object", object.display()))?;
    for section in elf.sections.iter_mut() {
        let name = section.name.as_slice();
        if [&b".debug_"[..], b".rel.debug_", b".rela.debug_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            section.delete = true;
        }
    }
    // LLVM names sections from the symbols' string table; the writer wants
    // a section-name table of its own (an object stripped before has one).
    if !elf
        .sections
        .iter()
        .any(|s| matches!(s.data, SectionData::SectionString))
    {
        let names = elf.sections.add();
        names.name = b".shstrtab"[..].into();
        names.sh_type = object::elf::SHT_STRTAB;
        names.data = SectionData::SectionString;
    }
    // Only DWARF may go: a relocation of a kept section that pointed into
    // it would be dropped silently by the writer.
    let relocations = |elf: &object::build::elf::Builder| -> usize {
        elf.sections
            .iter()
            .filter(|s| !s.delete)
            .map(|s| match &s.data {
                SectionData::Relocation(r) => r.len(),
                _ => 0,
            })
            .sum()
    };
    let kept = relocations(&elf);
    elf.delete_orphans();
    if relocations(&elf) != kept {
        bail!(
            "{}: stripping DWARF would drop relocations of kept sections",
            object.display()
        );
    }
    let mut stripped = Vec::new();
    elf.write(&mut stripped)
        .with_context(|| format!("writing {} without DWARF", object.display()))?;
    std::fs::write(object, stripped).with_context(|| format!("{}", object.display()))
}

fn put_bpf_linker_on_path() -> anyhow::Result<()> {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        return Ok(());
    }
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match cargo_home.map(|h| h.join("bin")) {
        Some(bin) if bin.join("bpf-linker").is_file() => {
            dirs.insert(0, bin);
            // SAFETY: single-threaded build script, before any child process.
            unsafe { env::set_var("PATH", env::join_paths(dirs)?) };
            Ok(())
        }
        _ => bail!("bpf-linker not found on PATH or in $CARGO_HOME/bin: run `cargo xtask setup`"),
    }
}
