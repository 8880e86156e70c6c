#!/usr/bin/env bash
# A Kubernetes cluster on this machine, for trying the chart and for the e2e test
# (`make cluster`, `make cluster-down`, `make e2e-cluster`): one node, or with
# NODEPULSE_CLUSTER_NODES=3 three (control-plane, worker-1, worker-2; docs/local-cluster.md).
#
#   hack/cluster.sh up       start it, or heal it (a second run is a quick no-op when healthy)
#   hack/cluster.sh down     stop it and remove everything it made
#   hack/cluster.sh status   what runs
#   hack/cluster.sh volumes N   make N hostPath PersistentVolumes Available (recycles Released ones)
#   hack/cluster.sh exec CMD...  run CMD inside the (first) node (its network, PID and mount namespaces)
#   hack/cluster.sh power-loss NODE  SIGKILL the node's PID 1: every process of it dies at once
#   hack/cluster.sh reboot NODE      power loss, then the node's init and daemons start again
#   hack/cluster.sh partition NODE   cut the node's link in the router namespace; its processes live
#   hack/cluster.sh heal NODE        undo partition
# (NODE is a node's name; docs/local-cluster.md shows what a user sees.)
#
# With three nodes each node is the box described below, with its own namespaces, containerd,
# kubelet, kube-proxy, kube-network-policies (the NetworkPolicy enforcer), cgroup root
# (/nodepulse-cluster/NODE) and state ($STATE/NODE); the control plane (etcd, API server,
# scheduler, controller manager, CoreDNS) runs on `control-plane`, which is tainted
# node-role.kubernetes.io/control-plane:NoSchedule. The nodes meet in namespace `nodepulse-uplink`,
# which forwards between the node links only (routes to each pod CIDR via its node) and has no
# link to the machine.
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
UPLINK_NETNS=nodepulse-uplink
UPLINK_IP=10.250.0.1
CP_IP=10.250.0.2   # the node running the control plane (and CoreDNS)
SERVICE_CIDR=10.96.0.0/16
SERVICE_API_IP=10.96.0.1
API_PORT=${NODEPULSE_CLUSTER_API_PORT:-16443}   # on the machine's 127.0.0.1 (below the ephemeral range)
CGROUP=nodepulse-cluster
KUBECONFIG_OUT=$STATE/kubeconfig
LOGS=$STATE/logs
PKI=$STATE/pki

# How many nodes: what the running cluster was made with, else NODEPULSE_CLUSTER_NODES (1 or 3).
NODE_COUNT=${NODEPULSE_CLUSTER_NODES:-}
if [[ -s $STATE/node-count ]]; then
  made=$(<"$STATE/node-count")
  [[ -z $NODE_COUNT || $NODE_COUNT == "$made" ]] ||
    { echo "cluster: the cluster here has $made node(s); run down first" >&2; exit 1; }
  NODE_COUNT=$made
fi
NODE_COUNT=${NODE_COUNT:-1}
case $NODE_COUNT in
  1) NODES=(nodepulse-node) ;;
  3) NODES=(control-plane worker-1 worker-2) ;;
  *) echo "cluster: NODEPULSE_CLUSTER_NODES must be 1 or 3" >&2; exit 2 ;;
esac

# select_node NAME: the per-node variables every function below uses. One node keeps the
# one-node layout (state right in $STATE, namespace nodepulse-cluster) that the e2e test reads.
select_node() {
  local i
  for i in "${!NODES[@]}"; do [[ ${NODES[$i]} == "$1" ]] && break; done
  [[ ${NODES[$i]} == "$1" ]] || die "no node $1 (the nodes: ${NODES[*]})"
  NODE_NAME=$1
  NODE_IP=10.250.0.$((i + 2))
  POD_CIDR=10.244.$i.0/24
  if ((NODE_COUNT == 1)); then
    NETNS=nodepulse-cluster NODE_DIR=$STATE UPLINK_DEV=eth0 KUBELET_CERT=kubelet
    NODE_CGROUP=$CGROUP NODE_LOGS=$LOGS
  else
    NETNS=nodepulse-$1 NODE_DIR=$STATE/$1 UPLINK_DEV=v-$1 KUBELET_CERT=kubelet-$1
    NODE_CGROUP=$CGROUP/$1 NODE_LOGS=$STATE/$1/logs
  fi
}
select_node "${NODES[0]}"

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
    kubelet kube-proxy kubectl coredns helm kube-network-policies)
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
    "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:$CP_IP,IP:$SERVICE_API_IP"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin nodepulse-cluster-admin system:masters
  cert controller-manager system:kube-controller-manager ""
  cert scheduler system:kube-scheduler ""
  cert kube-proxy system:kube-proxy ""
  cert coredns coredns system:masters
  local n
  for n in "${NODES[@]}"; do
    select_node "$n"
    cert "$KUBELET_CERT" "system:node:$NODE_NAME" system:nodes "DNS:$NODE_NAME,IP:$NODE_IP"
  done
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
  mkdir -p "$LOGS" "$STATE/etcd" "$STATE/volumes"
  local inside=https://$CP_IP:6443 n
  for n in controller-manager scheduler kube-proxy coredns; do kubeconfig "$n" "$inside"; done
  # What people and tests use on the machine: the forwarder on loopback.
  kubeconfig admin "https://127.0.0.1:$API_PORT" "$KUBECONFIG_OUT"
  write_corefile
  for n in "${NODES[@]}"; do
    select_node "$n"
    write_node_config
  done
}

# write_node_config: the selected node's containerd, CNI, kubelet and kube-proxy configuration.
write_node_config() {
  mkdir -p "$NODE_LOGS" "$NODE_DIR/cni" "$NODE_DIR/kubelet" "$NODE_DIR/containerd" "$NODE_DIR/volumes"
  kubeconfig "$KUBELET_CERT" "https://$CP_IP:6443" "$NODE_DIR/kubelet.kubeconfig"
  put "$NODE_DIR/containerd.toml" <<EOF
# containerd of the nodepulse test cluster: its own socket, root and state, so it never meets
# another containerd on this machine.
version = 2
root = "$NODE_DIR/containerd/root"
state = "/run/containerd"   # a tmpfs of the node's own mount namespace
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$NODE_DIR/containerd.sock"
[ttrpc]
  address = "$NODE_DIR/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
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
    conf_dir = "$NODE_DIR/cni"
EOF

  # ptp rather than bridge: every pod packet is routed through the node's own stack, so
  # kube-proxy's rules see pod-to-service-to-pod traffic without br_netfilter games.
  put "$NODE_DIR/cni/10-nodepulse.conflist" <<EOF
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
        "dataDir": "$NODE_DIR/cni-ipam"
      }
    }
  ]
}
EOF

  # Pods whose dnsPolicy is Default get this; ClusterFirst pods get CoreDNS on the control
  # plane's node IP.
  echo "nameserver $CP_IP" | put "$NODE_DIR/resolv.conf"

  put "$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/$KUBELET_CERT.crt
tlsPrivateKeyFile: $PKI/$KUBELET_CERT.key
containerRuntimeEndpoint: unix://$NODE_DIR/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
failSwapOn: false
oomScoreAdj: 0
# The kernel settings the kubelet wants are shown to it inside the node's mount namespace (see
# mask_sysctls): with this it only checks them and never writes the machine's.
protectKernelDefaults: true
clusterDNS: [$CP_IP]
clusterDomain: cluster.local
resolvConf: $NODE_DIR/resolv.conf
volumePluginDir: $NODE_DIR/kubelet/volume-plugins
hairpinMode: none
# Images exist only here (imported, never pulled): never garbage-collect or evict for disk.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
EOF

  put "$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: 10.244.0.0/16
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
nodePortAddresses: [primary]
# The conntrack table size and timeouts are the machine's (global) settings: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

write_corefile() {
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
  ((NODE_COUNT == 1)) || { fleet_netns_up; return; }
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

# fleet_netns_up: the selected node's namespace and its link to the router namespace. Each link
# is point-to-point (/32 at both ends, as on a routed fabric): the router reaches the node and
# its pod CIDR through that link only, and the node sends everything else to the router.
fleet_netns_up() {
  if [[ ! -e /run/netns/$UPLINK_NETNS ]]; then
    log "router namespace $UPLINK_NETNS ($UPLINK_IP, forwarding between node links only)"
    ip netns add "$UPLINK_NETNS"
    ip -n "$UPLINK_NETNS" link set lo up
    ip netns exec "$UPLINK_NETNS" sysctl -qw net.ipv4.ip_forward=1
  fi
  [[ -e /run/netns/$NETNS ]] && return
  log "network namespace $NETNS (node $NODE_NAME, $NODE_IP, pods $POD_CIDR)"
  ip netns add "$NETNS"
  ip -n "$NETNS" link add eth0 type veth peer name "$UPLINK_DEV" netns "$UPLINK_NETNS"
  ip -n "$NETNS" addr add "$NODE_IP/32" dev eth0
  ip -n "$UPLINK_NETNS" addr add "$UPLINK_IP/32" dev "$UPLINK_DEV"
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" link set eth0 up
  ip -n "$UPLINK_NETNS" link set "$UPLINK_DEV" up
  ip -n "$NETNS" route add "$UPLINK_IP/32" dev eth0
  ip -n "$NETNS" route add default via "$UPLINK_IP" dev eth0
  ip -n "$UPLINK_NETNS" route add "$NODE_IP/32" dev "$UPLINK_DEV"
  ip -n "$UPLINK_NETNS" route add "$POD_CIDR" via "$NODE_IP" dev "$UPLINK_DEV"
}

init_pid() {
  local unshare_pid
  [[ -s $NODE_DIR/node.pid ]] || return 1
  unshare_pid=$(<"$NODE_DIR/node.pid")
  [[ -d /proc/$unshare_pid && $(readlink "/proc/$unshare_pid/exe" || true) == */unshare ]] || return 1
  local child
  child=$(awk '{print $1}' "/proc/$unshare_pid/task/$unshare_pid/children" 2>/dev/null)
  [[ -n $child ]] || return 1
  echo "$child"
}

# The kernel tunables the kubelet insists on (pkg/kubelet/cm: setupKernelTunables). Outside the
# node they keep the machine's values; inside they read as the kubelet wants.
mask_sysctls() {
  mkdir -p "$NODE_DIR/sysctl"
  local pair path want
  for pair in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
    kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
    path=${pair%=*} want=${pair#*=}
    [[ $(<"/proc/sys/$path") == "$want" ]] && continue
    echo "$want" >"$NODE_DIR/sysctl/${path//\//.}"
    node_mount mount --bind -o ro "$NODE_DIR/sysctl/${path//\//.}" "/proc/sys/$path"
  done
}

node_mount() { nsenter -t "$(init_pid)" -m -- "$@"; }

node_up() {
  init_pid >/dev/null && return
  log "node $NODE_NAME namespaces (PID 1: tini)"
  [[ -d /var/lib/cni || -e $STATE/made-var-lib-cni ]] || { mkdir -p /var/lib/cni && touch "$STATE/made-var-lib-cni"; }
  setsid nsenter --net="/run/netns/$NETNS" \
    unshare --pid --fork --mount --propagation private --mount-proc -- tini -- sleep infinity \
    </dev/null >>"$NODE_LOGS/init.log" 2>&1 &
  echo $! >"$NODE_DIR/node.pid"
  local i
  for i in $(seq 50); do init_pid >/dev/null && break; sleep 0.1; done
  init_pid >/dev/null || die "the node's init did not start (see $NODE_LOGS/init.log)"
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
    if [[ $(stat -f -c %T "$h") == cgroupfs ]]; then mkdir -p "$h$NODE_CGROUP"; fi
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
  log "start $name on $NODE_NAME (log: $NODE_LOGS/$name.log)"
  nsenter -t "$(init_pid)" -p -m -n -- setsid -f "$exe" "$@" </dev/null >>"$NODE_LOGS/$name.log" 2>&1
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

api_ready() { in_netns curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://$CP_IP:6443/readyz"; }

start_control_plane() {
  start etcd --name "$NODE_NAME" --data-dir "$STATE/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381
  start kube-apiserver --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$CP_IP" --secure-port 6443 --service-cluster-ip-range "$SERVICE_CIDR" \
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
  start containerd --config "$NODE_DIR/containerd.toml"
  wait_for containerd 30 ctr_ok
  # The sandbox image must be there before the kubelet asks for its first pod.
  bash "$ROOT/hack/image.sh" pause
  local taint=()
  if ((NODE_COUNT > 1)) && [[ $NODE_NAME == control-plane ]]; then
    taint=(--register-with-taints node-role.kubernetes.io/control-plane=:NoSchedule)
  fi
  start kubelet --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$NODE_DIR/kubelet.kubeconfig" \
    --root-dir "$NODE_DIR/kubelet" --cert-dir "$PKI" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" \
    "${taint[@]}"
  start kube-proxy --config "$NODE_DIR/kube-proxy.yaml"
  start_network_policies
}

# The ptp CNI enforces no NetworkPolicy: kube-network-policies (SIG Network's enforcer) does, as a
# process of each node like kube-proxy. It judges, in user space, each new connection the kernel
# queues to it on nfqueue 100 against the policies it watches, and answers accept or drop. It
# would install the queueing itself as an nftables chain, but this kernel has no nftables `queue`
# expression (CONFIG_NFT_QUEUE is not set; its sync fails, "netlink receive: no such file or
# directory", and it logs that on every retry): the same rules as its chain (POSTROUTING, which all
# pod traffic passes, for ptp routes every packet through the node's stack; root's own sockets,
# kubelet probes among them, and established connections passed first) are put here with
# iptables' NFQUEUE target, for every new connection from or to a pod of this node rather than
# only those of pods a policy selects (it accepts what no policy selects). With --queue-bypass:
# while the enforcer is not running, traffic passes unjudged.
# It knows only the in-cluster configuration (a ServiceAccount token at
# /var/run/secrets/kubernetes.io/serviceaccount), so the node's /run, a tmpfs of its own, gets one,
# of a ServiceAccount bound to the ClusterRole its DaemonSet manifest has.
start_network_policies() {
  running kube-network-policies && return
  network_policy_queue
  network_policy_token
  local sa=/run/secrets/kubernetes.io/serviceaccount
  node_mount mkdir -p "$sa"
  node_mount install -m 600 "$STATE/kube-network-policies.token" "$sa/token"
  node_mount install -m 644 "$PKI/ca.crt" "$sa/ca.crt"
  KUBERNETES_SERVICE_HOST=$CP_IP KUBERNETES_SERVICE_PORT=6443 \
    start kube-network-policies --hostname-override "$NODE_NAME" --fail-open \
    --netfilter-bug-1766-fix=false --metrics-bind-address 127.0.0.1:9080
}

# network_policy_queue: the selected node's NODEPULSE-NETPOL chain (mangle POSTROUTING), made anew.
network_policy_queue() {
  local ipt=(in_netns iptables -w -t mangle) chain=NODEPULSE-NETPOL dir
  "${ipt[@]}" -N "$chain" 2>/dev/null || "${ipt[@]}" -F "$chain"
  "${ipt[@]}" -A "$chain" -m owner --uid-owner 0 -j RETURN
  "${ipt[@]}" -A "$chain" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
  for dir in -s -d; do
    "${ipt[@]}" -A "$chain" "$dir" "$POD_CIDR" -j NFQUEUE --queue-num 100 --queue-bypass
  done
  "${ipt[@]}" -C POSTROUTING -j "$chain" 2>/dev/null || "${ipt[@]}" -A POSTROUTING -j "$chain"
}

# network_policy_token: the enforcer's ServiceAccount, its ClusterRole (pods, namespaces and
# networkpolicies: list, watch) and a token of it valid as long as the certificates, once.
network_policy_token() {
  [[ -s $STATE/kube-network-policies.token ]] && return
  kube apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: kube-network-policies, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kube-network-policies}
rules:
- {apiGroups: [""], resources: [pods, namespaces], verbs: [list, watch]}
- {apiGroups: [networking.k8s.io], resources: [networkpolicies], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kube-network-policies}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kube-network-policies}
subjects:
- {kind: ServiceAccount, name: kube-network-policies, namespace: kube-system}
EOF
  kube create token kube-network-policies -n kube-system --duration 87600h |
    put "$STATE/kube-network-policies.token"
}

ctr_ok() { ctr --address "$NODE_DIR/containerd.sock" version; }

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
    "EXEC:nsenter --net=/run/netns/$NETNS socat STDIO TCP\\:$CP_IP\\:6443" \
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
# rather than a provisioner: no image to build, and the kubelet makes each directory (root, 0755)
# exactly as a hostPath volume on any node would. Volume i lives on node i mod the node count
# (under that node's state directory, with nodeAffinity to it), so three etcd members with a
# required anti-affinity find one volume on each node. A Released volume (its claim gone) is
# deleted with its data and made anew, so a reinstall starts from an empty etcd.
volumes() {
  local want=$1 name phase
  while read -r name phase; do
    [[ $phase == Released || $phase == Failed ]] || continue
    kube delete pv "$name" --wait=true >/dev/null
    rm -rf "${STATE:?}/volumes/$name" "${STATE:?}"/*/volumes/"$name"
  done < <(kube get pv -l nodepulse.io/cluster-volume -o jsonpath='{range .items[*]}{.metadata.name} {.status.phase}{"\n"}{end}')
  local have i=0
  have=$(kube get pv -l nodepulse.io/cluster-volume -o name | wc -l)
  while ((have < want)); do
    name=local-pv-$i
    select_node "${NODES[$((i % NODE_COUNT))]}"
    i=$((i + 1))
    kube get pv "$name" >/dev/null 2>&1 && continue
    kube apply -f - >/dev/null <<EOV
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
  hostPath: {path: $NODE_DIR/volumes/$name, type: DirectoryOrCreate}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions:
        - {key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}
EOV
    have=$((have + 1))
  done
}

# boot NODE: the node's namespaces and init, the control plane when it is the first node, and its
# containerd, kubelet and kube-proxy; each step only when missing.
boot() {
  select_node "$1"
  netns_up
  node_up
  if [[ $NODE_NAME == "${NODES[0]}" ]]; then
    start_control_plane
    forwarder_up
    wait_for "kube-apiserver on 127.0.0.1:$API_PORT" 30 kube get --raw /readyz
  fi
}

up() {
  local t0=$SECONDS n
  install_packages
  ensure_tools
  mkdir -p "$STATE" "$LOGS"
  echo "$NODE_COUNT" >"$STATE/node-count"
  make_pki
  write_config
  for n in "${NODES[@]}"; do boot "$n"; done
  for n in "${NODES[@]}"; do
    select_node "$n"
    start_node
  done
  select_node "${NODES[0]}"
  wait_for "CoreDNS" 60 in_netns curl -sf http://127.0.0.1:8181/ready
  for n in "${NODES[@]}"; do
    wait_for "node $n" 120 kube wait node "$n" --for condition=Ready --timeout 1s
  done
  if ((NODE_COUNT > 1)); then
    # The kubelet may not set node-role labels itself (NodeRestriction); an installer does.
    kube label node "${NODES[0]}" node-role.kubernetes.io/control-plane= --overwrite >/dev/null
  fi
  cluster_objects
  log "up in $((SECONDS - t0)) s: node(s) ${NODES[*]} Ready"
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
}

# reboot NODE: power loss (unless it is off already), then the node starts as at `up`.
reboot() {
  select_node "$1"
  if init_pid >/dev/null; then power_loss "$1"; fi
  ensure_tools
  # Ready again means the new kubelet's own report, not the one from before the power loss:
  # one made after this moment, taken before the kubelet starts (it reports at once, and then
  # only every few minutes while nothing changes).
  local since
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  boot "$1"
  start_node
  wait_for "node $1 Ready after the reboot" 120 ready_since "$1" "$since"
  log "node $1 Ready again"
}

ready_since() {
  local hb
  hb=$(kube get node "$1" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}')
  [[ ${hb% *} == True && ! ${hb#* } < $2 ]]
}

# partition NODE: DROP in the router namespace's FORWARD chain for the node's link, both
# directions; the node's processes run on and only its packets to other nodes are lost.
partition() {
  select_node "$1"
  ((NODE_COUNT > 1)) || die "one node: nothing to cut it off from (NODEPULSE_CLUSTER_NODES=3)"
  init_pid >/dev/null || die "node $1 is not running"
  local r
  for r in "-i $UPLINK_DEV" "-o $UPLINK_DEV"; do
    # shellcheck disable=SC2086 # the rule's words
    ip netns exec "$UPLINK_NETNS" iptables -w -C FORWARD $r -j DROP 2>/dev/null ||
      ip netns exec "$UPLINK_NETNS" iptables -w -I FORWARD $r -j DROP
  done
  log "partition of $1: its link ($UPLINK_DEV in $UPLINK_NETNS) drops every packet, its processes run on"
}

heal() {
  select_node "$1"
  ((NODE_COUNT > 1)) || die "one node: nothing to heal"
  local r
  for r in "-i $UPLINK_DEV" "-o $UPLINK_DEV"; do
    # shellcheck disable=SC2086 # the rule's words
    while ip netns exec "$UPLINK_NETNS" iptables -w -D FORWARD $r -j DROP 2>/dev/null; do :; done
  done
  log "heal of $1: its link forwards again"
}

down() {
  local init pidfile u
  # Every node either layout made, whatever the node count says.
  for pidfile in "$STATE/node.pid" "$STATE"/*/node.pid; do
    [[ -e $pidfile ]] || continue
    NODE_DIR=$(dirname "$pidfile")
    if init=$(init_pid); then
      log "stop node ${NODE_DIR##*/} (SIGKILL to its PID 1 ends every process in it, pods included)"
      kill -KILL "$init" || true
      wait_for "the node's processes to end" 30 node_gone "$(readlink "/proc/$init/ns/pid" 2>/dev/null || echo none)"
    fi
    if [[ -s $NODE_DIR/node.pid ]]; then
      u=$(<"$NODE_DIR/node.pid")
      if [[ $(readlink "/proc/$u/exe" 2>/dev/null || true) == */unshare ]]; then kill -KILL "$u" 2>/dev/null || true; fi
    fi
  done
  if [[ -s $STATE/forwarder.pid ]]; then
    local f
    f=$(<"$STATE/forwarder.pid")
    if grep -qa "TCP-LISTEN:$API_PORT" "/proc/$f/cmdline" 2>/dev/null; then kill "$f" || true; fi
  fi
  # Every namespace either layout makes; the router's iptables rules go with it.
  local ns
  for ns in nodepulse-cluster nodepulse-control-plane nodepulse-worker-1 nodepulse-worker-2 "$UPLINK_NETNS"; do
    [[ -e /run/netns/$ns ]] && ip netns del "$ns"
  done
  if [[ -e $STATE/made-run-netns ]] && [[ -d /run/netns ]] && [[ -z $(ls -A /run/netns) ]]; then
    umount /run/netns 2>/dev/null || true
    rmdir /run/netns
  fi
  [[ -e $STATE/made-var-lib-cni ]] && rm -rf /var/lib/cni
  # The kubelets' cgroups (pods, QoS classes), deepest first, now that nothing runs in them.
  local h
  for h in /sys/fs/cgroup/*/"$CGROUP"; do
    if [[ -d $h ]]; then find "$h" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  for h in /sys/fs/cgroup/*/"$CGROUP"; do
    [[ -d $h ]] && die "cgroup $h still in use"
  done
  # kubelet volume directories can be left read-only mounted only inside the (gone) namespaces,
  # so a plain rm works.
  rm -rf "$STATE"
  log "down: no process, mount, interface, namespace, cgroup or directory of the cluster is left"
}

# power_loss NODE: what a cut power cord does. SIGKILL to the node's PID 1 makes the kernel kill
# every process of its PID namespace at once (no process gets to clean up), and with the last one
# the mount namespace and its tmpfs go too. State on disk ($NODE_DIR) stays, as a disk would.
power_loss() {
  local init ns
  select_node "$1"
  init=$(init_pid) || die "node $1 is not running"
  log "power loss of $1 (SIGKILL to its PID 1, host PID $init)"
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
  local init name n any=1
  BIN=${NODEPULSE_TOOLS:-${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}/tools/bin}
  for n in "${NODES[@]}"; do
    select_node "$n"
    init=$(init_pid) || { echo "node $n: not running"; continue; }
    any=0
    echo "node $n: init PID $init (network namespace $NETNS, $NODE_IP)"
    for name in etcd kube-apiserver kube-controller-manager kube-scheduler coredns containerd kubelet kube-proxy \
      kube-network-policies; do
      printf '  %-24s %s\n' "$name" "$(pids_of "$(exe_of "$name")" | tr '\n' ' ')"
    done
  done
  ((any == 0)) || { echo "cluster: not running"; return 1; }
  echo "export KUBECONFIG=$KUBECONFIG_OUT"
}

usage="usage: hack/cluster.sh up|down|status|volumes N|exec CMD...|power-loss NODE|reboot NODE|partition NODE|heal NODE"
case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  volumes)
    BIN=${NODEPULSE_TOOLS:-${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}/tools/bin}
    volumes "${2:?usage: hack/cluster.sh volumes N}" ;;
  power-loss) power_loss "${2:?usage: hack/cluster.sh power-loss NODE}" ;;
  reboot) reboot "${2:?usage: hack/cluster.sh reboot NODE}" ;;
  partition) partition "${2:?usage: hack/cluster.sh partition NODE}" ;;
  heal) heal "${2:?usage: hack/cluster.sh heal NODE}" ;;
  exec)
    shift
    init=$(init_pid) || die "not running"
    exec nsenter -t "$init" -p -m -n -- "$@" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
