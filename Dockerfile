# syntax=docker/dockerfile:1
#
# Build: the same steps CI runs — `cargo xtask setup` (Debian's rustc-web
# with the bpf core, bpf-linker against libLLVM 22), then a locked release
# build. The eBPF object is embedded in the binary.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup \
 && cargo build --release --locked -p eks-pod-identity-agent \
 && install -D -m 0755 target/release/eks-pod-identity-agent /out/eks-pod-identity-agent

# Runtime: glibc and libgcc only (distroless "cc"); no shell, no package
# manager. Pin it by digest for releases: --build-arg RUNTIME_BASE=…@sha256:…
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:latest
FROM ${RUNTIME_BASE} AS runtime
COPY --from=build /out/eks-pod-identity-agent /usr/local/bin/eks-pod-identity-agent
# Also where the AWS chart runs it (`/eks-pod-identity-agent`), so swapping
# the chart's image needs no other path.
COPY --from=build /out/eks-pod-identity-agent /eks-pod-identity-agent
# Root inside the container, but with only the capabilities the manifests
# grant (deploy/daemonset.yaml); the image itself grants nothing.
USER 0:0
ENTRYPOINT ["/usr/local/bin/eks-pod-identity-agent"]
CMD ["--help"]
