#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine, for trying the chart and for the e2e test
# (`make cluster`, `make cluster-down`, `make e2e-cluster`).
#
#   hack/cluster.sh up       start it, or heal it (a second run is a quick no-op when healthy)
#   hack/cluster.sh down     stop it and remove everything it made
#   hack/cluster.sh status   what runs
#   hack/cluster.sh volumes N   make N hostPath PersistentVolumes Available (recycles Released ones)
#   hack/cluster.sh exec CMD...  run CMD inside the node (its network, PID and mount namespaces)
#   hack/cluster.sh power-loss NODE  SIGKILL the node's PID 1: every process of it dies at once
#   hack/cluster.sh reboot NODE      power loss, then the node's init and daemons start again
# (NODE is the node's name, nodepulse-node; docs/local-cluster.md shows what a user sees.)
#
# The whole node lives in namespaces of its own, because kube-proxy and the kubelet rewrite
# iptables (KUBE-FIREWALL drops non-loopback traffic to 127.0.0.0/8) and mount things, which
# would hurt everything else on a shared machine:
#   - network namespace `nodepulse-cluster`: the node's `eth0` (10.250.0.2), one end of a veth pair
#     whose other end sits in namespace `nodepulse-uplink` (10.250.0.1, forwarding off: packets
#     to anywhere else end there). Every daemon listens and every iptables rule lives in it.
#   - a PID and a mount namespace inside it, whose PID 1 (tini) is the node's init. So, as on a
#     real node, PID 1, the kubelet and the node IP share one network namespace: an agent reading
#     the node's /proc/1/net/dev (hostPID) sees this node's eth0, not the machine's. The mount
#     namespace is private: the kubelet's many mounts never reach the machine, and they vanish
#     with the namespace; /run, /var/log and /var/lib/cni are tmpfs there.
#   - cgroups under /nodepulse-cluster (kubelet cgroupRoot), state in $STATE.
# kubectl on the machine reaches the API server through 127.0.0.1:$API_PORT (socat, which enters
# the namespace per connection): loopback and the cluster's namespaces are all the traffic there is.
#
# Facts of this machine the configuration answers: root lacks CAP_SYS_RESOURCE (runc cannot raise
# oom_score_adj: restrict_oom_score_adj, --oom-score-adj=0, kube-proxy oomScoreAdj 0), cgroup v1
# (cgroupfs driver), no registry reachable (every image is built here and imported; the pause
# image too), no dummy network driver in the kernel (a veth pair instead).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${NODEPULSE_CLUSTER_DIR:-/var/lib/nodepulse-cluster}
NETNS=nodepulse-cluster
UPLINK_NETNS=nodepulse-uplink
NODE_NAME=nodepulse-node
NODE_IP=10.250.0.2
UPLINK_IP=10.250.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
SERVICE_API_IP=10.96.0.1
API_PORT=${NODEPULSE_CLUSTER_API_PORT:-16443}   # on the machine's 127.0.0.1 (below the ephemeral range)
CGROUP=nodepulse-cluster
KUBECONFIG_OUT=$STATE/kubeconfig
LOGS=$STATE/logs
PKI=$STATE/pki

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, mounts, cgroups)"

# --- packages and tools ---------------------------------------------------------------------

install_packages() {
  local pkgs=(containerd runc containernetworking-plugins iptables buildah tini socat iputils-ping)
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  # policy-rc.d or not, nothing must start the machine's own containerd: we run ours.
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

BIN=
ensure_tools() {
  BIN=$(bash "$ROOT/hack/tools.sh" etcd kube-apiserver kube-controller-manager kube-scheduler \
    kubelet kube-proxy kubectl coredns helm)
}

# --- certificates and configuration ---------------------------------------------------------

# cert NAME CN ORG [SANS]: a client/server certificate signed by the cluster CA, once.
cert() {
  local name=$1 cn=$2 org=$3 sans=${4:-}
  [[ -s $PKI/$name.crt ]] && return
  local ext="$PKI/$name.ext"
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [[ -n $sans ]] && echo "subjectAltName=$sans"
  } >"$ext"
  local subj="/CN=$cn"
  [[ -n $org ]] && subj="/O=$org/CN=$cn"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -subj "$subj" \
    -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$ext"
}

make_pki() {
  mkdir -p "$PKI" && chmod 700 "$PKI"
  if [[ ! -s $PKI/ca.crt ]]; then
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -days 3650 \
      -subj "/CN=nodepulse-cluster-ca" -out "$PKI/ca.crt" 2>/dev/null
  fi
  [[ -s $PKI/sa.key ]] || openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  [[ -s $PKI/sa.pub ]] || openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP,IP:$SERVICE_API_IP"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin nodepulse-cluster-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  cert coredns coredns system:masters
  cert kubelet "system:node:$NODE_NAME" system:nodes "DNS:$NODE_NAME,IP:$NODE_IP"
}

# kubeconfig NAME SERVER: a kubeconfig with the certificate NAME, embedded so the file stands alone.
kubeconfig() {
  local name=$1 server=$2 out=${3:-$STATE/$1.kubeconfig}
  put "$out" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: nodepulse
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$PKI/$name.crt")
    client-key-data: $(base64 -w0 "$PKI/$name.key")
contexts:
- name: nodepulse
  context: {cluster: nodepulse, user: $name}
current-context: nodepulse
EOF
}

# put FILE: stdin into FILE (mode 600), only when it differs: kube-proxy exits when its
# configuration file changes, and a healthy `up` must not disturb anything.
put() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  cat >"$tmp"
  chmod 600 "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; fi
}

write_config() {
  mkdir -p "$LOGS" "$STATE/cni" "$STATE/etcd" "$STATE/kubelet" "$STATE/containerd" "$STATE/volumes"
  local inside=https://$NODE_IP:6443 n
  for n in controller-manager scheduler kube-proxy coredns kubelet; do kubeconfig "$n" "$inside"; done
  # What people and tests use on the machine: the forwarder on loopback.
  kubeconfig admin "https://127.0.0.1:$API_PORT" "$KUBECONFIG_OUT"

  put "$STATE/containerd.toml" <<EOF
# containerd of the nodepulse test cluster: its own socket, root and state, so it never meets
# another containerd on this machine.
version = 2
root = "$STATE/containerd/root"
state = "/run/containerd"   # a tmpfs of the node's own mount namespace
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$STATE/containerd.sock"
[ttrpc]
  address = "$STATE/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$STATE/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  # Built here (hack/image.sh pause): no registry is reachable.
  sandbox_image = "$(bash "$ROOT/hack/image.sh" ref pause)"
  # root here lacks CAP_SYS_RESOURCE: runc fails ("can't get final child's PID from pipe: EOF")
  # when asked to lower a container's oom_score_adj below ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni"
EOF

  # ptp rather than bridge: every pod packet is routed through the node's own stack, so
  # kube-proxy's rules see pod-to-service-to-pod traffic without br_netfilter games.
  put "$STATE/cni/10-nodepulse.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "nodepulse",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$STATE/cni-ipam"
      }
    }
  ]
}
EOF

  # Pods whose dnsPolicy is Default get this; ClusterFirst pods get CoreDNS on the node IP.
  echo "nameserver $NODE_IP" | put "$STATE/resolv.conf"

  put "$STATE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet.crt
tlsPrivateKeyFile: $PKI/kubelet.key
containerRuntimeEndpoint: unix://$STATE/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP
failSwapOn: false
oomScoreAdj: 0
# The kernel settings the kubelet wants are shown to it inside the node's mount namespace (see
# mask_sysctls): with this it only checks them and never writes the machine's.
protectKernelDefaults: true
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $STATE/resolv.conf
volumePluginDir: $STATE/kubelet/volume-plugins
hairpinMode: none
# Images exist only here (imported, never pulled): never garbage-collect or evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
EOF

  put "$STATE/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
nodePortAddresses: [primary]
# The conntrack table size and timeouts are the machine's (global) settings: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

  # CoreDNS runs as a process of the node, not as a pod: it needs no image and is up before the
  # node is Ready, and it is platform, not product. No cache plugin: a cached NXDOMAIN would keep
  # a new StatefulSet member's name unresolvable to its peers for ~30 s.
  put "$STATE/Corefile" <<EOF
.:53 {
    errors
    ready 127.0.0.1:8181
    health 127.0.0.1:8180
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $STATE/coredns.kubeconfig nodepulse
        pods insecure
        ttl 5
    }
}
EOF
}

# --- namespaces -----------------------------------------------------------------------------

in_netns() { ip netns exec "$NETNS" "$@"; }

netns_up() {
  [[ -e /run/netns/$NETNS && -e /run/netns/$UPLINK_NETNS ]] && return
  # /run/netns is iproute2's; remember whether it was there so that `down` can leave it as found.
  [[ -d /run/netns || -e $STATE/made-run-netns ]] || touch "$STATE/made-run-netns"
  log "network namespaces $NETNS (node $NODE_IP) and $UPLINK_NETNS ($UPLINK_IP)"
  ip netns add "$NETNS"
  ip netns add "$UPLINK_NETNS"
  ip -n "$NETNS" link add eth0 type veth peer name eth0 netns "$UPLINK_NETNS"
  ip -n "$NETNS" addr add "$NODE_IP/24" dev eth0
  ip -n "$UPLINK_NETNS" addr add "$UPLINK_IP/24" dev eth0
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" link set eth0 up
  ip -n "$UPLINK_NETNS" link set lo up
  ip -n "$UPLINK_NETNS" link set eth0 up
  # The node needs a default route (the API server picks its address from it, and the kernel
  # must route service IPs before kube-proxy's DNAT): it leads to the uplink, which forwards
  # nothing.
  ip -n "$NETNS" route add default via "$UPLINK_IP"
}

init_pid() {
  local unshare_pid
  [[ -s $STATE/node.pid ]] || return 1
  unshare_pid=$(<"$STATE/node.pid")
  [[ -d /proc/$unshare_pid && $(readlink "/proc/$unshare_pid/exe" || true) == */unshare ]] || return 1
  local child
  child=$(awk '{print $1}' "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null)
  [[ -n $child ]] || return 1
  echo "$child"
}

# The kernel tunables the kubelet insists on (pkg/kubelet/cm: setupKernelTunables). Outside the
# node they keep the machine's values; inside they read as the kubelet wants.
mask_sysctls() {
  mkdir -p "$STATE/sysctl"
  local pair path want
  for pair in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    path=${pair%=*} want=${pair#*=}
    [[ $(<"/proc/sys/$path") == "$want" ]] && continue
    echo "$want" >"$STATE/sysctl/${path//\//.}"
    node_mount mount --bind -o ro "$STATE/sysctl/${path//\//.}" "/proc/sys/$path"
  done
}

node_mount() { nsenter -t "$(init_pid)" -m -- "$@"; }

node_up() {
  init_pid >/dev/null && return
  log "node namespaces (PID 1: tini)"
  [[ -d /var/lib/cni || -e $STATE/made-var-lib-cni ]] || { mkdir -p /var/lib/cni && touch "$STATE/made-var-lib-cni"; }
  setsid nsenter --net="/run/netns/$NETNS" \
    unshare --pid --fork --mount --propagation private --mount-proc -- tini -- sleep infinity \
    </dev/null >>"$LOGS/init.log" 2>&1 &
  echo $! >"$STATE/node.pid"
  local i
  for i in $(seq 50); do init_pid >/dev/null && break; sleep 0.1; done
  init_pid >/dev/null || die "the node's init did not start (see $LOGS/init.log)"
  # Private tmpfs where the runtime and the kubelet put sockets, runc state, pod network
  # namespaces, the xtables lock, container log links and CNI results.
  node_mount mount -t tmpfs -o mode=0755 nodepulse-run /run
  node_mount mkdir -p /run/netns /run/containerd /run/lock
  node_mount mount -t tmpfs -o mode=0755 nodepulse-log /var/log
  node_mount mount -t tmpfs -o mode=0755 nodepulse-cni /var/lib/cni
  mask_sysctls
  # The node's cgroup root, in every v1 hierarchy (the kubelet requires it to exist).
  local h
  for h in /sys/fs/cgroup/*/; do
    if [[ $(stat -f -c %T "$h") == cgroupfs ]]; then mkdir -p "$h$CGROUP"; fi
  done
}

# --- daemons --------------------------------------------------------------------------------

# pids_of EXE: host PIDs of the node's processes running EXE (two `find`s, not a fork per PID).
pids_of() {
  local want=$1 init ns pids
  init=$(init_pid) || return 0
  ns=$(readlink "/proc/$init/ns/pid")
  pids=$(find /proc/[0-9]*/ns/pid -maxdepth 0 -printf '%p %l\n' 2>/dev/null |
    awk -v ns="$ns" '$2 == ns { split($1, p, "/"); print "/proc/" p[3] "/exe" }')
  [[ -n $pids ]] || return 0
  # shellcheck disable=SC2086 # one path per PID
  find $pids -maxdepth 0 -printf '%p %l\n' 2>/dev/null |
    awk -v want="$want" '$2 == want { split($1, p, "/"); print p[3] }'
}

exe_of() { if [[ $1 == containerd ]]; then echo /usr/bin/containerd; else readlink -f "$BIN/$1"; fi; }

running() { [[ -n $(pids_of "$(exe_of "$1")") ]]; }

# start NAME ARGS...: runs NAME inside the node (its own session; tini adopts it), unless running.
start() {
  local name=$1 exe
  shift
  running "$name" && return
  exe=$(exe_of "$name")
  log "start $name (log: $LOGS/$name.log)"
  nsenter -t "$(init_pid)" -p -m -n -- setsid -f "$exe" "$@" </dev/null >>"$LOGS/$name.log" 2>&1
}

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds.
wait_for() {
  local what=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    "$@" >/dev/null 2>&1 && return
    sleep 0.2
  done
  die "$what not ready after ${secs}s (logs in $LOGS)"
}

kube() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_OUT" "$@"; }

api_ready() { in_netns curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://$NODE_IP:6443/readyz"; }

start_control_plane() {
  start etcd --name "$NODE_NAME" --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381
  start kube-apiserver --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$NODE_IP" --secure-port 6443 --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction --allow-privileged=true \
    --profiling=false
  wait_for kube-apiserver 60 api_ready
  start kube-controller-manager --kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-name nodepulse --profiling=false
  start kube-scheduler --kubeconfig "$STATE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --leader-elect=false --profiling=false
  start coredns -conf "$STATE/Corefile"
}

start_node() {
  start containerd --config "$STATE/containerd.toml"
  wait_for containerd 30 ctr_ok
  # The sandbox image must be there before the kubelet asks for its first pod.
  bash "$ROOT/hack/image.sh" pause
  start kubelet --config "$STATE/kubelet.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
    --root-dir "$STATE/kubelet" --cert-dir "$PKI" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP"
  start kube-proxy --config "$STATE/kube-proxy.yaml"
}

ctr_ok() { ctr --address "$STATE/containerd.sock" version; }

# The API server, on the machine's loopback: socat enters the node's network namespace per
# connection.
forwarder_up() {
  if [[ -s $STATE/forwarder.pid ]] && grep -qa "TCP-LISTEN:$API_PORT" "/proc/$(<"$STATE/forwarder.pid")/cmdline" 2>/dev/null; then
    return
  fi
  if ss -Htln "sport = :$API_PORT" | grep -q .; then
    die "127.0.0.1:$API_PORT is taken by another program (set NODEPULSE_CLUSTER_API_PORT)"
  fi
  setsid socat "TCP-LISTEN:$API_PORT,bind=127.0.0.1,reuseaddr,fork" \
    "EXEC:nsenter --net=/run/netns/$NETNS socat STDIO TCP\\:$NODE_IP\\:6443" \
    </dev/null >>"$LOGS/forwarder.log" 2>&1 &
  echo $! >"$STATE/forwarder.pid"
}

# Objects every fresh cluster gets: the default StorageClass of the pre-made volumes below.
cluster_objects() {
  kube apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: local-hostpath
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
}

# volumes N: N hostPath PersistentVolumes of the default StorageClass Available. Pre-made volumes
# rather than a provisioner: one node, no image to build, and the kubelet makes each directory
# (root, 0755) exactly as a hostPath volume on any node would. A Released volume (its claim gone)
# is deleted with its data and made anew, so a reinstall starts from an empty etcd.
volumes() {
  local want=$1 name phase
  while read -r name phase; do
    [[ $phase == Released || $phase == Failed ]] || continue
    kube delete pv "$name" --wait=true >/dev/null
    rm -rf "${STATE:?}/volumes/$name"
  done < <(kube get pv -l nodepulse.io/cluster-volume -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase}{"\n"}{end}')
  local have i=0
  have=$(kube get pv -l nodepulse.io/cluster-volume -o name | wc -l)
  while ((have < want)); do
    name=local-pv-$i
    i=$((i + 1))
    kube get pv "$name" >/dev/null 2>&1 && continue
    kube apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $name
  labels: {nodepulse.io/cluster-volume: "true"}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: local-hostpath
  hostPath: {path: $STATE/volumes/$name, type: DirectoryOrCreate}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}
EOF
    have=$((have + 1))
  done
}

up() {
  local t0=$SECONDS
  install_packages
  ensure_tools
  mkdir -p "$STATE" "$LOGS"
  make_pki
  write_config
  netns_up
  node_up
  start_control_plane
  forwarder_up
  wait_for "kube-apiserver on 127.0.0.1:$API_PORT" 30 kube get --raw /readyz
  start_node
  wait_for "CoreDNS" 60 in_netns curl -sf http://127.0.0.1:8181/ready
  wait_for "node $NODE_NAME" 120 kube wait node "$NODE_NAME" --for condition=Ready --timeout 1s
  cluster_objects
  log "up in $((SECONDS - t0)) s: node $NODE_NAME Ready"
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
}

down() {
  local init
  if init=$(init_pid); then
    log "stop the node (SIGKILL to its PID 1 ends every process in it, pods included)"
    kill -KILL "$init" || true
    wait_for "the node's processes to end" 30 node_gone "$(readlink "/proc/$init/ns/pid" 2>/dev/null || echo none)"
  fi
  if [[ -s $STATE/node.pid ]]; then
    local u
    u=$(<"$STATE/node.pid")
    if [[ $(readlink "/proc/$u/exe" 2>/dev/null || true) == */unshare ]]; then kill -KILL "$u" 2>/dev/null || true; fi
  fi
  if [[ -s $STATE/forwarder.pid ]]; then
    local f
    f=$(<"$STATE/forwarder.pid")
    if grep -qa "TCP-LISTEN:$API_PORT" "/proc/$f/cmdline" 2>/dev/null; then kill "$f" || true; fi
  fi
  local ns
  for ns in "$NETNS" "$UPLINK_NETNS"; do
    [[ -e /run/netns/$ns ]] && ip netns del "$ns"
  done
  if [[ -e $STATE/made-run-netns ]] && [[ -d /run/netns ]] && [[ -z $(ls -A /run/netns) ]]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns
  fi
  [[ -e $STATE/made-var-lib-cni ]] && rm -rf /var/lib/cni
  # The kubelet's cgroups (pods, QoS classes), deepest first, now that nothing runs in them.
  local h
  for h in /sys/fs/cgroup/*/"$CGROUP"; do
    if [[ -d $h ]]; then find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  for h in /sys/fs/cgroup/*/"$CGROUP"; do
    [[ -d $h ]] && die "cgroup $h still in use"
  done
  # kubelet volume directories can be left read-only mounted only inside the (gone) namespace,
  # so a plain rm works.
  rm -rf "$STATE"
  log "down: no process, mount, interface, namespace, cgroup or directory of the cluster is left"
}

# power_loss NODE: what a cut power cord does. SIGKILL to the node's PID 1 makes the kernel kill
# every process of its PID namespace at once (no process gets to clean up), and with the last one
# the mount namespace and its tmpfs go too. State on disk ($STATE) stays, as a disk would.
power_loss() {
  local node=$1 init
  [[ $node == "$NODE_NAME" ]] || die "no node $node (the node is $NODE_NAME)"
  init=$(init_pid) || die "node $node is not running"
  log "power loss of $node (SIGKILL to its PID 1, host PID $init)"
  local ns
  ns=$(readlink "/proc/$init/ns/pid")
  kill -KILL "$init"
  wait_for "the node's processes to end" 30 node_gone "$ns"
}

node_gone() {
  local ns=$1 p
  for p in /proc/[0-9]*; do
    [[ $(readlink "$p/ns/pid" 2>/dev/null) == "$ns" ]] && return 1
  done
  return 0
}

status() {
  local init name
  init=$(init_pid) || { echo "cluster: not running"; return 1; }
  BIN=${NODEPULSE_TOOLS:-${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}/tools/bin}
  echo "node init: PID $init (network namespace $NETNS)"
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler coredns containerd kubelet kube-proxy; do
    printf '  %-24s %s\n' "$name" "$(pids_of "$(exe_of "$name")" | tr '\n' ' ')"
  done
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  volumes)
    BIN=${NODEPULSE_TOOLS:-${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}/tools/bin}
    volumes "${2:?usage: hack/cluster.sh volumes N}" ;;
  power-loss) power_loss "${2:?usage: hack/cluster.sh power-loss NODE}" ;;
  # A reboot is a power loss followed by `up`, which starts the node's init and every daemon
  # that is not running (on this one node the control plane too) and waits for Ready.
  # A node already without power just starts.
  reboot)
    node=${2:?usage: hack/cluster.sh reboot NODE}
    if init_pid >/dev/null; then power_loss "$node"; else [[ $node == "$NODE_NAME" ]] || die "no node $node"; fi
    up ;;
  exec)
    shift
    init=$(init_pid) || die "not running"
    exec nsenter -t "$init" -p -m -n -- "$@" ;;
  *) echo "usage: hack/cluster.sh up|down|status|volumes N|exec CMD...|power-loss NODE|reboot NODE" >&2; exit 2 ;;
esac
