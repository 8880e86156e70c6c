#!/usr/bin/env bash
# Builds the container images with Debian's buildah (no Docker engine, no registry needed), and
# imports them into the local cluster's containerd when it runs (hack/cluster.sh).
#
#   hack/image.sh nodepulse   the repository's Dockerfile, with the binaries of `make release`
#   hack/image.sh etcd        etcd + etcdctl from hack/tools.sh, named as the chart expects
#   hack/image.sh pause       the pod sandbox image, from the pause.c of the pinned Kubernetes
#   hack/image.sh busybox     Debian's busybox-static, for the chart's etcd.volumePermissions
#                             init container (hostPath volumes ignore fsGroup)
#   hack/image.sh all         the four
#   hack/image.sh ref NAME    print the image reference NAME is built as
#
# No registry is reachable here, so the base image is made from Debian packages too: libc6 and
# libgcc-s1 (what distroless/cc carries for a Rust binary), ca-certificates and netbase, unpacked
# with `dpkg -x` into a rootfs with a `nonroot` user (65532) and handed to the Dockerfile as
# RUNTIME_IMAGE. Everything is cached: buildah's storage lives in $CACHE/images, and an image is
# imported into the cluster only when it changed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}
WORK=$CACHE/images
CLUSTER=${NODEPULSE_CLUSTER_DIR:-/var/lib/nodepulse-cluster}
TOOLS=${NODEPULSE_TOOLS:-$CACHE/tools/bin}
IMAGE=${IMAGE:-nodepulse:$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/nodepulse/Chart.yaml")}
RELEASE_DIR=${CARGO_TARGET_DIR:-$ROOT/target}/release
mkdir -p "$WORK"

log() { echo "image: $*" >&2; }

# buildah with a store and a network configuration directory of its own: it never touches
# another user's images or /etc/cni. Its blob-info cache has no setting (root's is always
# /var/lib/containers/cache): removed on exit when this script made it.
printf '[network]\nnetwork_config_dir = "%s"\n' "$WORK/cni" >"$WORK/containers.conf"
export CONTAINERS_CONF=$WORK/containers.conf
if [[ ! -e /var/lib/containers ]]; then trap 'rm -rf /var/lib/containers' EXIT; fi
bh() {
  buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs "$@"
}

have_image() { bh inspect --type image "$1" >/dev/null 2>&1; }

# Fully qualified, as the kubelet asks containerd for it (`nodepulse:0.1.0` is docker.io/library/...).
qualified() {
  local ref=$1 first=${1%%/*}
  if [[ $ref != */* ]]; then echo "docker.io/library/$ref"
  elif [[ $first != *.* && $first != *:* && $first != localhost ]]; then echo "docker.io/$ref"
  else echo "$ref"; fi
}

kubernetes_version() { "$TOOLS/kube-apiserver" --version | awk '{print $2}'; }
etcd_version() { echo "v$("$TOOLS/etcd" --version | sed -n 's/^etcd Version: //p')"; }

# The Kubernetes source of the pinned version, from the Go module cache (hack/tools.sh fetched it).
kubernetes_src() {
  (cd "$WORK" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$(kubernetes_version)" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
}

pause_ref() {
  local tag
  tag=$(sed -n 's/^TAG ?= *//p' "$(kubernetes_src)/build/pause/Makefile")
  echo "localhost/nodepulse/pause:$tag"
}

ref() {
  case $1 in
    nodepulse) qualified "$IMAGE" ;;
    etcd) echo "quay.io/coreos/etcd:$(etcd_version)" ;;
    pause) pause_ref ;;
    base) base_ref ;;
    busybox) busybox_ref ;;
    *) echo "unknown image: $1" >&2; exit 2 ;;
  esac
}

DEBS=(libc6 libgcc-s1 ca-certificates netbase)

# The candidate versions of the Debian packages the images are made of ("pkg=version" lines),
# read once: apt-cache takes seconds.
CANDIDATES=
load_candidates() {
  [[ -n $CANDIDATES ]] && return
  CANDIDATES=$(apt-cache policy "${DEBS[@]}" busybox-static |
    awk '/^[^ ].*:$/ { pkg = substr($1, 1, length($1) - 1) } /^  Candidate: / { print pkg "=" $2 }')
}

base_ref() {
  load_candidates
  local versions
  versions=$(grep -v '^busybox-static=' <<<"$CANDIDATES")
  echo "localhost/nodepulse/base-cc:bookworm-$(echo "$versions" | sha256sum | cut -c1-12)"
}

# bud DIR REF DOCKERFILE [ARG...]: builds REF from the context DIR, offline and from local images only.
bud() {
  local dir=$1 ref=$2 file=$3
  shift 3
  bh bud --quiet --layers --pull=never --network none "$@" -f "$file" -t "$ref" "$dir" >&2
}

# unpack_debs DIR PACKAGE...: the packages downloaded to DIR/debs and unpacked into DIR/rootfs,
# in a DIR emptied first.
unpack_debs() {
  local dir=$1 deb
  shift
  rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/rootfs"
  (cd "$dir/debs" && apt-get download "$@" >/dev/null)
  for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/rootfs"; done
}

build_base() {
  local ref dir=$WORK/base
  ref=$(base_ref)
  have_image "$ref" && return
  log "base image $ref from Debian packages: ${DEBS[*]}"
  unpack_debs "$dir" "${DEBS[@]}"
  local r=$dir/rootfs
  # What the packages' maintainer scripts and base-files would have made.
  mkdir -p "$r/etc/ssl/certs" "$r/tmp" "$r/home/nonroot" "$r/root"
  chmod 1777 "$r/tmp"
  find "$r/usr/share/ca-certificates" -name '*.crt' -exec cat {} + >"$r/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$r/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$r/etc/group"
  chown 65532:65532 "$r/home/nonroot"
  rm -rf "$r/usr/share/doc" "$r/usr/share/man" "$r/usr/share/lintian"
  bud "$dir" "$ref" "$ROOT/hack/cluster/base.Dockerfile"
}

build_pause() {
  local ref dir=$WORK/pause
  ref=$(pause_ref)
  have_image "$ref" && return
  log "pause image $ref from Kubernetes $(kubernetes_version)'s build/pause/linux/pause.c"
  rm -rf "$dir" && mkdir -p "$dir"
  # The upstream Makefile's flags: a static binary, so the image needs nothing else.
  gcc -Os -Wall -Werror -static -DVERSION="v${ref##*:}-nodepulse" \
    -o "$dir/pause" "$(kubernetes_src)/build/pause/linux/pause.c"
  bud "$dir" "$ref" "$ROOT/hack/cluster/pause.Dockerfile"
}

# Tagged with Debian's upstream version of busybox (1:1.35.0-4+b3 -> 1.35.0).
busybox_ref() {
  load_candidates
  local v
  v=$(sed -n 's/^busybox-static=\([0-9]*:\)\{0,1\}\([0-9.]*\).*/\2/p' <<<"$CANDIDATES")
  echo "localhost/nodepulse/busybox:$v"
}

build_busybox() {
  local ref dir=$WORK/busybox
  ref=$(busybox_ref)
  have_image "$ref" && return
  log "busybox image $ref from Debian's busybox-static"
  unpack_debs "$dir" busybox-static
  local applet
  for applet in $("$dir/rootfs/bin/busybox" --list); do
    [[ -e $dir/rootfs/bin/$applet ]] || ln -s busybox "$dir/rootfs/bin/$applet"
  done
  rm -rf "$dir/rootfs/usr/share"
  bud "$dir" "$ref" "$ROOT/hack/cluster/busybox.Dockerfile"
}

build_etcd() {
  build_base
  local ref dir=$WORK/etcd
  ref=$(ref etcd)
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$(readlink -f "$TOOLS/etcd")" "$dir/etcd"
  cp "$(readlink -f "$TOOLS/etcdctl")" "$dir/etcdctl"
  log "etcd image $ref"
  bud "$dir" "$ref" "$ROOT/hack/cluster/etcd.Dockerfile" --build-arg "BASE_IMAGE=$(base_ref)"
}

build_nodepulse() {
  build_base
  local ref bin dir=$WORK/nodepulse-context
  ref=$(ref nodepulse)
  rm -rf "$dir" && mkdir -p "$dir"
  for bin in nodepulse-agent nodepulse-controller nodepulsectl; do
    [[ -x $RELEASE_DIR/$bin ]] || { echo "image: $RELEASE_DIR/$bin missing: run \`make release\` first" >&2; exit 1; }
    cp "$RELEASE_DIR/$bin" "$dir/"
  done
  log "nodepulse image $ref from the Dockerfile (BINARIES=prebuilt: the binaries of \`make release\`)"
  bud "$dir" "$ref" "$ROOT/Dockerfile" --build-arg "RUNTIME_IMAGE=$(base_ref)" \
    --build-arg BINARIES=prebuilt
}

# import_image NAME: into every node's containerd (one node: $CLUSTER/containerd.sock; three:
# $CLUSTER/NODE/containerd.sock) that runs and lacks this very image.
import_image() {
  local ref id sock dir any= pushed=
  for sock in "$CLUSTER/containerd.sock" "$CLUSTER"/*/containerd.sock; do
    [[ -S $sock ]] && ctr --address "$sock" version >/dev/null 2>&1 || continue
    dir=$(dirname "$sock")
    any=1
    [[ -n ${id:-} ]] || { ref=$(ref "$1") && id=$(bh inspect --type image --format '{{.FromImageID}}' "$ref"); }
    local stamp=$dir/imported/${ref//[\/:]/_}
    if [[ -s $stamp && $(<"$stamp") == "$id" ]] &&
      ctr --address "$sock" -n k8s.io images ls -q "name==$ref" | grep -q .; then
      continue
    fi
    log "import $ref into the cluster's containerd $sock"
    local tar=$WORK/${ref//[\/:]/_}.tar
    if [[ -z ${pushed:-} ]]; then
      rm -f "$tar"
      bh push "$ref" "docker-archive:$tar:$ref" >/dev/null
      pushed=1
    fi
    ctr --address "$sock" -n k8s.io images import "$tar" >/dev/null
    mkdir -p "$dir/imported" && echo "$id" >"$stamp"
  done
  [[ -n $any ]] || log "cluster not running: $1 not imported"
  [[ -z ${tar:-} ]] || rm -f "$tar"
}

# Read the candidates here, in the main shell, for everything that needs them (not `ref pause`,
# which hack/cluster.sh asks on every `up`): the functions run in $(...) would each read again.
case ${1:-}/${2:-} in
  ref/pause | ref/nodepulse | ref/etcd) ;;
  *) load_candidates ;;
esac

case ${1:-} in
  ref) ref "${2:?usage: hack/image.sh ref NAME}" ;;
  pause) build_pause; import_image pause ;;
  etcd) build_etcd; import_image etcd ;;
  busybox) build_busybox; import_image busybox ;;
  nodepulse) build_nodepulse; import_image nodepulse; ref nodepulse ;;
  all)
    build_pause; build_etcd; build_busybox; build_nodepulse
    import_image pause; import_image etcd; import_image busybox; import_image nodepulse ;;
  *) echo "usage: hack/image.sh nodepulse|etcd|pause|busybox|all|ref NAME" >&2; exit 2 ;;
esac
