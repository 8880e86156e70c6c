# syntax=docker/dockerfile:1
# One image with nodepulse-agent, nodepulse-controller and nodepulsectl.
#
# Anywhere a registry is reachable, it builds from source:
#
#   docker build -t nodepulse:0.1.0 .        (or: buildah bud -t nodepulse:0.1.0 .)
#
# Where none is (the project's development and CI machines), `make image` (hack/image.sh) builds
# this same file with buildah and two build arguments: RUNTIME_IMAGE, a base made locally from
# Debian packages, and BINARIES=prebuilt, which takes the three binaries `make release` built
# (the very same `cargo build` as below) from the build context instead of compiling them. A test
# (testkit/tests/install.rs) checks that this file builds and copies exactly the packages and
# binaries that `make release` builds.

# The toolchain the project is developed and tested with (rust-version in Cargo.toml is the floor).
ARG RUST_VERSION=1.95
# The runtime base: glibc and libgcc only (TLS is rustls), no shell.
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# Where the binaries come from: `compile` (the stages below) or `prebuilt` (the build context is a
# directory holding nodepulse-agent, nodepulse-controller and nodepulsectl). Builders that skip
# unused stages (BuildKit, buildah) then never touch the Rust toolchain image.
ARG BINARIES=compile

# --- planner: a recipe of the dependency graph, so the dependency layer below is cached until
# Cargo.toml / Cargo.lock change, not on every source edit.
FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version ^0.1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- compile: dependencies first (cached layer), then the workspace.
FROM chef AS compile
COPY --from=planner /src/recipe.json recipe.json
# (cook takes one --package at most: it builds the dependencies of the whole workspace.)
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --bins -p nodepulse-agent -p nodepulse-controller -p nodepulsectl

# --- prebuilt: the binaries of `make release`, laid out where `compile` leaves them.
FROM scratch AS prebuilt
COPY nodepulse-agent nodepulse-controller nodepulsectl /src/target/release/

# --- builder: whichever of the two BINARIES names.
FROM ${BINARIES} AS builder

# --- runtime: user 65532 (nonroot).
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="nodepulse" \
      org.opencontainers.image.description="Kubernetes node liveness and metrics through etcd leases" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /src/target/release/nodepulse-agent /usr/local/bin/nodepulse-agent
COPY --from=builder /src/target/release/nodepulse-controller /usr/local/bin/nodepulse-controller
COPY --from=builder /src/target/release/nodepulsectl /usr/local/bin/nodepulsectl
USER 65532:65532
# The chart sets the command per component; this default makes `docker run IMAGE --help` useful.
ENTRYPOINT ["/usr/local/bin/nodepulse-agent"]
