# syntax=docker/dockerfile:1
#
# Build: the same steps CI runs — `cargo xtask setup` (Debian's rustc-web
# with the bpf core, bpf-linker against libLLVM 22), then a locked build in
# the `dist` profile (release with whole-program optimisation: what the
# bench measures). The eBPF object is embedded in the binary.
#
# `--build-arg BINARY_FROM=prebuilt` packs a binary built beforehand
# (`eks-pod-identity-agent` at the root of the build context) instead: what
# the container test does, where no registry is reachable.
ARG BINARY_FROM=build
ARG RUNTIME_BASE=gcr.io/distroless/cc-debian12:latest

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo xtask setup \
 && cargo build --profile dist --locked -p eks-pod-identity-agent \
 && install -D -m 0755 target/dist/eks-pod-identity-agent /out/eks-pod-identity-agent

FROM scratch AS prebuilt
COPY eks-pod-identity-agent /out/eks-pod-identity-agent

FROM ${BINARY_FROM} AS binary

# Runtime: glibc and libgcc only (distroless "cc"); no shell, no package
# manager. Pin it by digest for releases: --build-arg RUNTIME_BASE=…@sha256:…
FROM ${RUNTIME_BASE} AS runtime
COPY --from=binary /out/eks-pod-identity-agent /usr/local/bin/eks-pod-identity-agent
# Also where the AWS chart runs it (`/eks-pod-identity-agent`), so swapping
# the chart's image needs no other path.
COPY --from=binary /out/eks-pod-identity-agent /eks-pod-identity-agent
# Root inside the container, but with only the capabilities the manifests
# grant (deploy/daemonset.yaml); the image itself grants nothing.
USER 0:0
ENTRYPOINT ["/usr/local/bin/eks-pod-identity-agent"]
CMD ["--help"]
