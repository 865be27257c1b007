//! The binaries the demo, the bench and the integration tests run.

use anyhow::{Context as _, Result};

use crate::cmd::{cargo, run, workspace_root};

/// The agent built with another kernel ABI (`--features abi-variant`: a
/// different map layout), for the test that upgrades across an ABI change.
pub const ABI_VARIANT_BINARY: &str = "eks-pod-identity-agent-abi-variant";

/// The agent and the harness's binaries (demo, bench, pod client); with
/// `abi_variant`, also [`ABI_VARIANT_BINARY`].
pub fn build_binaries(release: bool, abi_variant: bool) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    let dir = workspace_root()?.join("target").join(profile);
    let build = |features: Option<&str>| {
        let mut cmd = cargo();
        cmd.args(["build", "--locked", "-p", "eks-pod-identity-agent"]);
        match features {
            Some(features) => cmd.args(["--features", features]),
            None => cmd.args(["-p", "integration-tests", "--bins"]),
        };
        if release {
            cmd.arg("--release");
        }
        run(&mut cmd)
    };
    if abi_variant {
        // First: it leaves its binary at the agent's path, which the
        // normal build below puts back.
        build(Some("abi-variant"))?;
        let built = dir.join("eks-pod-identity-agent");
        let variant = dir.join(ABI_VARIANT_BINARY);
        std::fs::copy(&built, &variant)
            .with_context(|| format!("copy {} to {}", built.display(), variant.display()))?;
    }
    build(None)
}
