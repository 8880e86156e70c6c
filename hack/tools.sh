#!/usr/bin/env bash
# Builds the test tooling that no package ships, once per machine, from the Go module proxy:
# etcd + etcdctl, the Kubernetes components (kube-apiserver, kubectl, and for the local cluster
# kubelet, kube-controller-manager, kube-scheduler, kube-proxy, coredns, and kube-network-policies,
# its NetworkPolicy enforcer), helm, node_exporter, the
# OpenTelemetry Collector (otelcol: the hostmetrics receiver only, the bench's second peer), and the
# chart's checkers (promtool for the alert rules, kube-score for the rendered manifests). The product
# is Rust; this is only what the tests, the demo and the benchmarks run against.
#
# Binaries land in $NODEPULSE_TOOLS (default ~/.cache/nodepulse/tools/bin), named <tool>-<version>,
# with an unversioned symlink beside each. A second run finds them and returns at once.
#
# usage: hack/tools.sh [all|etcd|kube-apiserver|kubectl|kubelet|kube-controller-manager|
#                       kube-scheduler|kube-proxy|coredns|kube-network-policies|helm|node_exporter|otelcol|promtool|
#                       kube-score]...
set -euo pipefail

KUBERNETES_VERSION=${KUBERNETES_VERSION:-v1.34.4}   # matches k8s-openapi's v1_34 feature
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.20.2}
NODE_EXPORTER_VERSION=${NODE_EXPORTER_VERSION:-v1.10.1}
COREDNS_VERSION=${COREDNS_VERSION:-v1.14.7}
KUBE_NETWORK_POLICIES_VERSION=${KUBE_NETWORK_POLICIES_VERSION:-v0.8.0}
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}   # Prometheus 3.16's Go module version
KUBE_SCORE_VERSION=${KUBE_SCORE_VERSION:-v1.20.0}
# One collector release for every collector module: contrib's hostmetrics receiver and the builder at
# v0.160.0, core's stable modules at the v1.x of that release.
OTELCOL_VERSION=${OTELCOL_VERSION:-v0.160.0}
OTELCOL_STABLE_VERSION=${OTELCOL_STABLE_VERSION:-v1.66.0}

CACHE=${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}
BIN=${NODEPULSE_TOOLS:-$CACHE/tools/bin}
WORK=$CACHE/tools/src
mkdir -p "$BIN" "$WORK"
# Several test binaries may ask at once: one build at a time. The lock is taken only to build,
# so a tool already built is returned at once while another one builds.
locked=0
build_lock() {
  if ((locked == 0)); then exec 9>"$CACHE/tools/.lock" && flock 9 && locked=1; fi
}
# have NAME VERSION: NAME-VERSION is built; point NAME at it (no write when it already does).
have() {
  [[ -x $BIN/$1-$2 ]] || return 1
  [[ $(readlink "$BIN/$1" 2>/dev/null) == "$1-$2" ]] || ln -sfn "$1-$2" "$BIN/$1"
}
# A caller's GOFLAGS (say -p=1, to leave a core free) are kept.
export GOFLAGS="-mod=mod${GOFLAGS:+ $GOFLAGS}" GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

log() { echo "tools: $*" >&2; }

# built NAME VERSION: whether NAME-VERSION is there. When it is not, the caller holds the build
# lock on return (another run may have built it while this one waited for the lock).
built() {
  have "$1" "$2" && return
  build_lock
  have "$1" "$2"
}

# begin_build NAME VERSION: NAME-VERSION's build starts, in a clean work directory.
begin_build() {
  log "building $1 $2 (first run on this machine; cached afterwards)"
  local dir="$WORK/$1-$2"
  rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
}

# end_build NAME VERSION FILE: the FILE just built becomes NAME-VERSION (renamed in place, so that
# no run sees half a file) and NAME points at it.
end_build() {
  mv "$3" "$BIN/$1-$2.tmp"
  mv "$BIN/$1-$2.tmp" "$BIN/$1-$2"
  ln -sfn "$1-$2" "$BIN/$1"
  log "built $BIN/$1-$2"
}

# wrapper_build NAME VERSION MODULE@VER PACKAGE [go.mod extra lines] [ldflags]
# Builds PACKAGE (a main package inside a dependency) from a throwaway wrapper module, because
# `go install pkg@version` refuses modules whose go.mod carries replace directives.
wrapper_build() {
  local name=$1 version=$2 require=$3 pkg=$4 extra=${5:-} ldflags=${6:-}
  built "$name" "$version" && return
  begin_build "$name" "$version"
  cat >go.mod <<GOMOD
module nodepulse.test/tools/$name

go 1.24

require ${require%@*} ${require#*@}
$extra
GOMOD
  # The classic tools.go pattern: an import under a build tag lets `go mod tidy` resolve PACKAGE's
  # dependencies at the versions the required module pins.
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" >tools.go
  go mod tidy
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w $ldflags" -o "$name" "$pkg"
  end_build "$name" "$version" "$name"
}

# build_kubernetes NAME: one Kubernetes component (kube-apiserver, kubectl, kubelet, ...) at
# KUBERNETES_VERSION, all from the same pinned module graph.
build_kubernetes() {
  local name=$1 minor=${KUBERNETES_VERSION#v1.}
  built "$name" "$KUBERNETES_VERSION" && return
  local staging=v0.$minor
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local paths,
  # which a dependent module ignores: pin each one to the matching published v0.x tag.
  local gomod
  gomod=$(cd "$WORK" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local replaces
  replaces=$(grep -E '^\s*k8s\.io/[a-z0-9-]+ v0\.0\.0\s*$' "$gomod" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}' | sort -u)
  # Without these the binaries report v0.0.0, and Helm's kubeVersion checks and kubectl's version
  # skew warnings see a cluster that does not exist.
  local version_flags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_flags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor%%.*}"
    version_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  local main=k8s.io/kubernetes/cmd/$name
  wrapper_build "$name" "$KUBERNETES_VERSION" "k8s.io/kubernetes@$KUBERNETES_VERSION" "$main" "$replaces" "$version_flags"
}

build_etcd() {
  wrapper_build etcd "$ETCD_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION" go.etcd.io/etcd/server/v3
  wrapper_build etcdctl "$ETCD_VERSION" "go.etcd.io/etcd/etcdctl/v3@$ETCD_VERSION" go.etcd.io/etcd/etcdctl/v3
}

build_helm() {
  wrapper_build helm "$HELM_VERSION" "helm.sh/helm/v3@$HELM_VERSION" helm.sh/helm/v3/cmd/helm
}

build_node_exporter() {
  wrapper_build node_exporter "$NODE_EXPORTER_VERSION" \
    "github.com/prometheus/node_exporter@$NODE_EXPORTER_VERSION" github.com/prometheus/node_exporter
}

build_promtool() {
  wrapper_build promtool "$PROMETHEUS_VERSION" \
    "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" github.com/prometheus/prometheus/cmd/promtool
}

build_kube_score() {
  wrapper_build kube-score "$KUBE_SCORE_VERSION" \
    "github.com/zegl/kube-score@$KUBE_SCORE_VERSION" github.com/zegl/kube-score/cmd/kube-score \
    "" "-X main.version=$KUBE_SCORE_VERSION"
}

# The local cluster's NetworkPolicy enforcer (hack/cluster.sh): SIG Network's nftables + nfqueue
# implementation, which works with any CNI (the cluster's is ptp, which enforces none).
build_kube_network_policies() {
  wrapper_build kube-network-policies "$KUBE_NETWORK_POLICIES_VERSION" \
    "sigs.k8s.io/kube-network-policies@$KUBE_NETWORK_POLICIES_VERSION" sigs.k8s.io/kube-network-policies/cmd
}

# CoreDNS for the local cluster (hack/cluster.sh), with only the plugins that cluster's Corefile
# uses: CoreDNS's own main package links all ~60 plugins (cloud DNS providers and their SDKs);
# a main of our own that sets dnsserver.Directives is CoreDNS's documented way to trim them, and
# builds in a fraction of the time.
build_coredns() {
  built coredns "$COREDNS_VERSION" && return
  begin_build coredns "$COREDNS_VERSION"
  printf 'module nodepulse.test/tools/coredns\n\ngo 1.24\n\nrequire github.com/coredns/coredns %s\n' \
    "$COREDNS_VERSION" >go.mod
  cat >main.go <<'GO'
// CoreDNS with the plugins of hack/cluster.sh's Corefile only, in CoreDNS's plugin order.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	dnsserver.Directives = []string{"ready", "health", "errors", "log", "kubernetes"}
}

func main() { coremain.Run() }
GO
  go mod tidy
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
    -o coredns .
  end_build coredns "$COREDNS_VERSION" coredns
}

# The OpenTelemetry Collector as the bench runs it (bench/src/footprint.rs): the hostmetrics receiver
# and the nop exporter, nothing else, built by the collector builder from a manifest, as the
# collector's documentation has a custom distribution made. Every collector module at one release:
# with strict versioning the builder fails when a component pulls in another core release.
build_otelcol() {
  built otelcol "$OTELCOL_VERSION" && return
  begin_build otelcol "$OTELCOL_VERSION"
  cat >manifest.yaml <<YAML
dist:
  module: nodepulse.test/tools/otelcol
  name: otelcol
  description: OpenTelemetry Collector with the hostmetrics receiver only (nodepulse bench peer)
  version: ${OTELCOL_VERSION#v}
  output_path: ./dist
receivers:
  - gomod: github.com/open-telemetry/opentelemetry-collector-contrib/receiver/hostmetricsreceiver $OTELCOL_VERSION
exporters:
  - gomod: go.opentelemetry.io/collector/exporter/nopexporter $OTELCOL_VERSION
providers:
  - gomod: go.opentelemetry.io/collector/confmap/provider/envprovider $OTELCOL_STABLE_VERSION
  - gomod: go.opentelemetry.io/collector/confmap/provider/fileprovider $OTELCOL_STABLE_VERSION
YAML
  go run "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION" \
    --config manifest.yaml --skip-strict-versioning=false
  end_build otelcol "$OTELCOL_VERSION" dist/otelcol
}

targets=("$@")
[[ ${#targets[@]} -eq 0 || ${targets[0]} == all ]] && targets=(etcd kube-apiserver kubectl helm node_exporter)
for t in "${targets[@]}"; do
  case $t in
    kube-apiserver | kubectl | kubelet | kube-controller-manager | kube-scheduler | kube-proxy)
      build_kubernetes "$t" ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    node_exporter) build_node_exporter ;;
    otelcol) build_otelcol ;;
    coredns) build_coredns ;;
    kube-network-policies) build_kube_network_policies ;;
    promtool) build_promtool ;;
    kube-score) build_kube_score ;;
    *) echo "unknown tool: $t" >&2; exit 2 ;;
  esac
done
echo "$BIN"
