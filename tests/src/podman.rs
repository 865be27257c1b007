//! A real container runtime for the container test: podman with runc,
//! images made locally (no registry is reachable), containers run with
//! exactly the security context and volumes a manifest gives them.
//!
//! Flags this machine kind needs: runc (crun refuses the hybrid cgroup
//! layout), the cgroupfs manager, and explicit ulimits (the sandbox has no
//! CAP_SYS_RESOURCE to raise podman's defaults).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_yaml_ng::Value;

pub use crate::manifest::strings;
use crate::{manifest::expand_args, names, tempdir::TempDir};

/// Whether podman and runc are installed (`cargo xtask setup` installs them).
pub fn available() -> bool {
    ["podman", "runc"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// `podman` with this machine's runtime flags.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Builds the project's image from its Dockerfile with `binary` packed as
/// the prebuilt agent, on a runtime base made here of the libraries the
/// binary links and a CA bundle (what distroless `cc` provides).
pub fn build_image(dockerfile: &Path, binary: &Path) -> Result<Image> {
    let dir = TempDir::new("epia-image-")?;
    let rootfs = dir.path().join("rootfs");
    for sub in [
        "etc/ssl/certs",
        "tmp",
        "lib64",
        "lib/x86_64-linux-gnu",
        "lib/aarch64-linux-gnu",
    ] {
        std::fs::create_dir_all(rootfs.join(sub))?;
    }
    // distroless ships the CA bundle; the SDK's TLS client wants one.
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        rootfs.join("etc/ssl/certs/ca-certificates.crt"),
    )
    .context("the host's CA bundle (package ca-certificates)")?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    for lib in linked_libraries(binary)? {
        let target = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        std::fs::copy(&lib, &target)
            .with_context(|| format!("copy {} into the base", lib.display()))?;
    }
    let tar = dir.path().join("base.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    let listing = run(Command::new("tar").arg("-tf").arg(&tar))?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    ensure!(
        listing.contains("etc/ssl/certs/ca-certificates.crt") && listing.contains("libc.so.6"),
        "the runtime base lacks the CA bundle or libc:\n{listing}"
    );
    let base = format!("localhost/epia-runtime-base:{}", names::unique_id());
    run(podman().arg("import").arg(&tar).arg(&base))?;
    let context = dir.path().join("context");
    std::fs::create_dir_all(&context)?;
    std::fs::copy(binary, context.join("eks-pod-identity-agent"))?;
    let tag = format!(
        "localhost/eks-pod-identity-agent:test-{}",
        names::unique_id()
    );
    let built = podman()
        .arg("build")
        .arg("-f")
        .arg(dockerfile)
        .args(["--build-arg", "BINARY_FROM=prebuilt"])
        .args(["--build-arg", &format!("RUNTIME_BASE={base}")])
        .args(["--target", "runtime", "-t", &tag])
        .arg(&context)
        .output()
        .context("spawn podman build")?;
    // Every stage's image (`--> <id>`), to remove with the image: the
    // prebuilt stage holds a copy of the binary.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let layers: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("--> "))
        .map(|id| id.trim().to_owned())
        .collect();
    let _ = podman().args(["rmi", &base]).output();
    let image = Image {
        tag: tag.clone(),
        layers,
    };
    ensure!(built.status.success(), "podman build failed:\n{text}");
    Ok(image)
}

/// The shared libraries `binary` loads, as `ldd` resolves them.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = run(Command::new("ldd").arg(binary))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// A built image, removed with its stages' images when dropped.
pub struct Image {
    pub tag: String,
    layers: Vec<String>,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "-f", &self.tag]).output();
        for layer in &self.layers {
            let _ = podman().args(["rmi", "-f", layer]).output();
        }
    }
}

/// A named container, removed (forcibly) when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    pub fn new(prefix: &str) -> Container {
        Container {
            name: names::unique(prefix),
        }
    }

    /// Its output so far (stdout and stderr).
    pub fn logs(&self) -> String {
        podman()
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.name]).output();
    }
}

/// How the test stands in for the kubelet when it turns a manifest's
/// container into `podman run` flags.
pub struct Placement<'a> {
    /// The node: a network namespace the test made (`hostNetwork: true`).
    pub netns_path: &'a str,
    /// Where a `hostPath` of `/sys/fs/cgroup` points on this machine: the
    /// cgroup2 mount (the same path on EKS nodes; `/sys/fs/cgroup/unified`
    /// on this machine kind's hybrid layout).
    pub cgroup2_mount: &'a Path,
    /// Where `Localhost` seccomp profiles are found (the kubelet's
    /// `seccomp/` directory; here, `deploy/`).
    pub seccomp_root: &'a Path,
    /// Values for the container's `valueFrom` env entries, by name.
    pub downward: &'a [(&'a str, &'a str)],
    /// Other hostPaths the test gives the container a private stand-in
    /// for (the node's bpffs directory, the handover directory), by path.
    pub host_paths: &'a [(&'a str, PathBuf)],
}

/// `podman run` flags for the manifest's `container` of `pod_spec`: its
/// security context (capabilities, read-only root, user, no privilege
/// escalation, seccomp — absent means RuntimeDefault, the runtime's own),
/// host networking, a private cgroup namespace (the kubelet's default on
/// cgroup v2), its hostPath volume mounts and its env.
pub fn run_flags(pod_spec: &Value, container: &Value, at: &Placement) -> Result<Vec<String>> {
    let mut flags = vec![
        "--network".to_owned(),
        format!("ns:{}", at.netns_path),
        "--cgroupns".into(),
        "private".into(),
        "--ulimit".into(),
        "nofile=4096:4096".into(),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ];
    ensure!(
        pod_spec["hostNetwork"] == Value::Bool(true),
        "not hostNetwork"
    );
    let sc = &container["securityContext"];
    for cap in strings(&sc["capabilities"]["drop"]) {
        flags.extend(["--cap-drop".into(), cap]);
    }
    for cap in strings(&sc["capabilities"]["add"]) {
        flags.extend(["--cap-add".into(), cap]);
    }
    if sc["readOnlyRootFilesystem"] == Value::Bool(true) {
        flags.push("--read-only".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        flags.extend(["--user".into(), format!("{uid}:{uid}")]);
    }
    if sc["allowPrivilegeEscalation"] == Value::Bool(false) {
        flags.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    match sc["seccompProfile"]["type"].as_str() {
        None | Some("RuntimeDefault") => {}
        Some("Unconfined") => flags.extend(["--security-opt".into(), "seccomp=unconfined".into()]),
        Some("Localhost") => {
            let rel = sc["seccompProfile"]["localhostProfile"]
                .as_str()
                .context("Localhost seccomp without localhostProfile")?;
            let profile = at.seccomp_root.join(rel);
            ensure!(
                profile.is_file(),
                "no seccomp profile at {}",
                profile.display()
            );
            flags.extend([
                "--security-opt".into(),
                format!("seccomp={}", profile.display()),
            ]);
        }
        Some(other) => bail!("unknown seccomp profile type {other}"),
    }
    let volumes = pod_spec["volumes"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    for mount in container["volumeMounts"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
    {
        let name = mount["name"].as_str().context("volumeMount without name")?;
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume {name}"))?;
        let host = volume["hostPath"]["path"]
            .as_str()
            .with_context(|| format!("volume {name} is not a hostPath"))?;
        let host = match at.host_paths.iter().find(|(path, _)| *path == host) {
            _ if host == "/sys/fs/cgroup" => at.cgroup2_mount.to_owned(),
            Some((_, stand_in)) => {
                std::fs::create_dir_all(stand_in)
                    .with_context(|| format!("create {}", stand_in.display()))?;
                stand_in.clone()
            }
            None => PathBuf::from(host),
        };
        let mut spec = format!(
            "{}:{}",
            host.display(),
            mount["mountPath"].as_str().context("mountPath")?
        );
        if mount["readOnly"] == Value::Bool(true) {
            spec.push_str(":ro");
        }
        flags.extend(["-v".into(), spec]);
    }
    for var in container["env"].as_sequence().cloned().unwrap_or_default() {
        let name = var["name"].as_str().context("env without name")?;
        let value = match var["value"].as_str() {
            Some(v) => v.to_owned(),
            None => at
                .downward
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
                .with_context(|| format!("no value for env {name}"))?,
        };
        flags.extend(["-e".into(), format!("{name}={value}")]);
    }
    Ok(flags)
}

/// A manifest container's args with `$(VAR)` expanded from `-e` flags.
pub fn args_of(container: &Value, flags: &[String]) -> Vec<String> {
    let env: Vec<(String, String)> = flags
        .windows(2)
        .filter(|w| w[0] == "-e")
        .filter_map(|w| {
            w[1].split_once('=')
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
        })
        .collect();
    expand_args(container, &env)
}
