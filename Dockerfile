# syntax=docker/dockerfile:1
# One image with nodepulse-agent, nodepulse-controller and nodepulsectl.
#
# No Docker engine runs on the project's development and CI machines, so this file is not built
# there (`make image` needs one). What keeps it honest: CI builds the very same release binaries
# with the very same command (`make release` = the `cargo build` below), and a test
# (testkit/tests/install.rs) checks that this file builds and copies exactly the packages and
# binaries that `make release` builds.
#
#   docker build -t nodepulse:0.1.0 .

# The toolchain the project is developed and tested with (rust-version in Cargo.toml is the floor).
ARG RUST_VERSION=1.95

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

# --- builder: dependencies first (cached layer), then the workspace.
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# (cook takes one --package at most: it builds the dependencies of the whole workspace.)
RUN cargo chef cook --release --recipe-path recipe.json
COPY . .
RUN cargo build --release --bins -p nodepulse-agent -p nodepulse-controller -p nodepulsectl

# --- runtime: glibc and libgcc only (TLS is rustls), no shell, user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="nodepulse" \
      org.opencontainers.image.description="Kubernetes node liveness and metrics through etcd leases" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /src/target/release/nodepulse-agent /usr/local/bin/nodepulse-agent
COPY --from=builder /src/target/release/nodepulse-controller /usr/local/bin/nodepulse-controller
COPY --from=builder /src/target/release/nodepulsectl /usr/local/bin/nodepulsectl
USER 65532:65532
# The chart sets the command per component; this default makes `docker run IMAGE --help` useful.
ENTRYPOINT ["/usr/local/bin/nodepulse-agent"]
