#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test nodepulse. Idempotent: a second run
# checks and returns.
set -euo pipefail

need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)   # etcd-client's build script
command -v openssl >/dev/null || need_apt+=(openssl)
# flock: hack/tools.sh builds one tool at a time.
command -v flock >/dev/null || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  echo "deps: apt-get install ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Another install (or the machine's own updates) may hold dpkg's lock: wait for it.
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo not found; install Rust with rustup first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt

if ! command -v go >/dev/null; then
  echo "deps: go not found; the test tooling (etcd, kube-apiserver, kubectl, helm) is built with Go" >&2
  exit 1
fi
