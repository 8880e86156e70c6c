#!/usr/bin/env bash
# The lab's demonstration scenario on one machine (what `make demo` runs, after installing what is
# missing and building the binaries):
#   1. `nodepulsectl watch` starts: no node yet;
#   2. an agent starts as worker-1 (interval 10 s, heartbeat TTL 5 s): the watcher prints
#      `Node worker-1 Alive`;
#   3. a new config (interval 2 s) is pushed: the agent logs it at once, and samples every 2 s;
#   4. the agent is killed with SIGKILL: about TTL later the watcher prints
#      `Node worker-1 Dead (heartbeat expired)`.
# Everything runs on free loopback ports in a scratch directory; every process it started is
# stopped at the end and on Ctrl-C. Lines are prefixed [demo], [watch], [agent] (and
# [controller], [kubectl] with DEMO_K8S=1, which adds the controller and a kube-apiserver and shows
# `kubectl get monitornodes` at each step).
#
# Environment: NODEPULSE_TOOLS (etcd, etcdctl, kube-apiserver; default
# ~/.cache/nodepulse/tools/bin), NODEPULSE_BIN (our binaries; default $CARGO_TARGET_DIR/debug,
# else target/debug), DEMO_TTL (heartbeat TTL in seconds, default 5), DEMO_K8S=1, DEMO_KEEP=1
# (keep the scratch directory).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${NODEPULSE_TOOLS:-$HOME/.cache/nodepulse/tools/bin}
BIN=${NODEPULSE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
TTL=${DEMO_TTL:-5}
K8S=${DEMO_K8S:-0}
NODE=worker-1

for tool in "$TOOLS/etcd" "$TOOLS/etcdctl" "$BIN/nodepulsectl" "$BIN/nodepulse-agent"; do
  [[ -x $tool ]] || { echo "[demo] $tool is missing: run \`make demo\` (it builds everything first)" >&2; exit 1; }
done
if [[ $K8S == 1 ]]; then
  for tool in "$TOOLS/kube-apiserver" "$BIN/nodepulse-controller"; do
    [[ -x $tool ]] || { echo "[demo] $tool is missing: run \`DEMO_K8S=1 make demo\`" >&2; exit 1; }
  done
  command -v kubectl >/dev/null || { echo "[demo] kubectl is not on PATH" >&2; exit 1; }
  command -v openssl >/dev/null || { echo "[demo] openssl is not on PATH" >&2; exit 1; }
fi

# Children die with this script even if it is SIGKILLed (then no trap runs).
DIE_WITH_US=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then DIE_WITH_US=(setpriv --pdeathsig KILL --); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nodepulse-demo.XXXXXX")
PIDS=()      # what we started, stopped in reverse order
FOLLOWERS=() # the `tail | sed` prefixers; they end when their process does

# The traps may fire while a function's output goes to /dev/null: they write to fd 3, the
# script's own stdout.
exec 3>&1

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local i pid
  # Reverse order, one at a time: the agent and the watcher stop while etcd still answers (a
  # stopping agent revokes its lease).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  for pid in "${FOLLOWERS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ ${DEMO_KEEP:-0} == 1 || ($status != 0 && $status != 130) ]]; then
    echo "[demo] logs kept in $WORK" >&3
  else
    rm -rf "$WORK"
  fi
  echo "[demo] stopped everything it started" >&3
  exit "$status"
}
trap cleanup EXIT
trap 'echo >&3; echo "[demo] interrupted" >&3; exit 130' INT TERM

say() { printf '\n[demo] %s\n' "$*"; }
note() { printf '[demo] %s\n' "$*"; }

# A TCP port nothing listens on (bash's /dev/tcp: no extra tool needed).
free_port() {
  local port
  while :; do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
}

# start NAME LOG CMD... : runs CMD in the background with its output in LOG, and echoes LOG live
# with a [NAME] prefix (colour codes removed); NAME "-" only logs. Sets START_PID.
start() {
  local name=$1 log=$2
  shift 2
  "${DIE_WITH_US[@]}" "$@" >"$log" 2>&1 &
  START_PID=$!
  PIDS+=("$START_PID")
  if [[ $name != - ]]; then
    tail --pid="$START_PID" -s 0.1 -n +1 -F "$log" 2>/dev/null |
      sed -u -e $'s/\x1b\\[[0-9;]*m//g' -e "s/^/[$name] /" &
    FOLLOWERS+=($!)
  fi
}

now_ms() { date +%s%3N; }

# wait_for LOG REGEX SECONDS WHAT [FROM_LINE]: waits until a line of LOG (after FROM_LINE) matches
# REGEX; fails the demo after SECONDS. Echoes the matching line number.
wait_for() {
  local log=$1 regex=$2 secs=$3 what=$4 from=${5:-0}
  local deadline=$(($(now_ms) + secs * 1000)) n
  while :; do
    n=$(tail -n +"$((from + 1))" "$log" 2>/dev/null | grep -n -m1 -E -- "$regex" | cut -d: -f1 || true)
    if [[ -n $n ]]; then
      echo $((from + n))
      return 0
    fi
    if (($(now_ms) > deadline)); then
      echo "[demo] FAILED: no $what within ${secs}s; last lines of $log:" >&2
      tail -n 20 "$log" | sed 's/^/[demo]   /' >&2
      exit 1
    fi
    sleep 0.1
  done
}

lines() { wc -l <"$1" | tr -d ' '; }
elapsed() { awk -v ms=$(($(now_ms) - $1)) 'BEGIN { printf "%.2f", ms / 1000 }'; }

# --- etcd -----------------------------------------------------------------------------------
ETCD_PORT=$(free_port)
ETCD_PEER_PORT=$(free_port)
while [[ $ETCD_PEER_PORT == "$ETCD_PORT" ]]; do ETCD_PEER_PORT=$(free_port); done
ETCD=http://127.0.0.1:$ETCD_PORT
say "starting etcd on $ETCD (a single member, data in $WORK/etcd)"
"${DIE_WITH_US[@]}" "$TOOLS/etcd" --name demo --data-dir "$WORK/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER_PORT" \
  --log-level warn >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
deadline=$(($(now_ms) + 30000))
until "$TOOLS/etcdctl" --endpoints "$ETCD" endpoint health >/dev/null 2>&1; do
  (($(now_ms) < deadline)) || { echo "[demo] FAILED: etcd did not start; $WORK/etcd.log:" >&2; cat "$WORK/etcd.log" >&2; exit 1; }
  sleep 0.2
done
export NODEPULSE_ETCD_ENDPOINTS=$ETCD
export RUST_LOG=${RUST_LOG:-info}
etcdctl() { "$TOOLS/etcdctl" --endpoints "$ETCD" "$@"; }

# --- optional: kube-apiserver + controller --------------------------------------------------
# The same kube-apiserver the test harness runs (testkit): serving certificate from a throwaway
# CA, a service-account key pair, a static admin token, a kubeconfig. It keeps its objects in
# the demo's etcd under /registry, beside nodepulse's /monitor keys.
k8s_start() {
  local dir=$WORK/k8s port
  mkdir -p "$dir"
  port=$(free_port)
  say "DEMO_K8S=1: starting kube-apiserver on https://127.0.0.1:$port and nodepulse-controller"
  (
    cd "$dir"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 \
      -subj "/CN=nodepulse-demo-ca"
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
      -subj "/CN=kube-apiserver"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n' >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
      -out apiserver.crt -days 1 -extfile san.ext
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; exit 1; }
  echo "nodepulse-demo-admin,admin,admin,system:masters" >"$dir/tokens.csv"
  start - "$dir/apiserver.log" "$TOOLS/kube-apiserver" \
    --etcd-servers="$ETCD" --secure-port="$port" --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 --cert-dir="$dir/certs" \
    --tls-cert-file="$dir/apiserver.crt" --tls-private-key-file="$dir/apiserver.key" \
    --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/sa.pub" --service-account-signing-key-file="$dir/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --enable-priority-and-fairness=false --v=0
  # Its startup chatter is long; the log stays in the scratch directory.
  cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: demo
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority: $dir/ca.crt
users:
- name: admin
  user:
    token: nodepulse-demo-admin
contexts:
- name: demo
  context:
    cluster: demo
    user: admin
current-context: demo
KUBECONFIG
  export KUBECONFIG=$dir/kubeconfig
  local deadline=$(($(now_ms) + 120000))
  until kubectl get --raw /readyz >/dev/null 2>&1; do
    (($(now_ms) < deadline)) || { echo "[demo] FAILED: kube-apiserver not ready" >&2; tail -n 20 "$dir/apiserver.log" >&2; exit 1; }
    sleep 0.5
  done
  until kubectl get namespace default >/dev/null 2>&1; do sleep 0.2; done
  note "kubectl apply --server-side -f manifests/00-crds.yaml"
  kubectl apply --server-side -f "$ROOT/manifests/00-crds.yaml" 2>&1 | sed 's/^/[kubectl] /'
  kubectl wait --for=condition=Established --timeout=60s \
    crd/monitornodes.nodepulse.io crd/monitorconfigs.nodepulse.io 2>&1 | sed 's/^/[kubectl] /'
  note "nodepulse-controller --leader-election-namespace default --etcd-endpoints $ETCD"
  start controller "$WORK/controller.log" "$BIN/nodepulse-controller" \
    --metrics-addr "127.0.0.1:$(free_port)" --leader-election-namespace default \
    --etcd-endpoints "$ETCD"
  wait_for "$WORK/controller.log" 'became leader' 30 "\"became leader\" from the controller" >/dev/null
}

if [[ $K8S == 1 ]]; then
  k8s_start
fi
# show_monitornodes [STATE]: with DEMO_K8S=1, waits (15 s at most) until the MonitorNode shows
# STATE, then prints `kubectl get monitornodes`.
show_monitornodes() {
  if [[ $K8S == 1 ]]; then
    if [[ -n ${1:-} ]]; then
      local deadline=$(($(now_ms) + 15000))
      until [[ $(kubectl get monitornode "$NODE" -o jsonpath='{.status.state}' 2>/dev/null) == "$1" ]]; do
        (($(now_ms) < deadline)) || { note "MonitorNode $NODE is not $1 after 15 s"; break; }
        sleep 0.2
      done
    fi
    note "kubectl get monitornodes"
    kubectl get monitornodes 2>&1 | sed 's/^/[kubectl] /'
  fi
}

# --- 1. the watcher ---------------------------------------------------------------------------
say "1. The server watches /monitor/heartbeat/ (nodepulsectl watch): no node yet"
start watch "$WORK/watch.log" "$BIN/nodepulsectl" watch
wait_for "$WORK/watch.log" 'No node yet|^NODE' 10 "first output of the watcher" >/dev/null
show_monitornodes

# --- 2. the agent -----------------------------------------------------------------------------
say "2. Start the agent as $NODE (interval 10 s by default, heartbeat lease TTL ${TTL} s)"
note "nodepulse-agent --node-name $NODE --heartbeat-ttl $TTL --etcd-endpoints $ETCD"
t_agent=$(now_ms)
start agent "$WORK/agent.log" "$BIN/nodepulse-agent" --node-name "$NODE" --heartbeat-ttl "$TTL" \
  --metrics-addr "127.0.0.1:$(free_port)" --etcd-endpoints "$ETCD"
AGENT_PID=$START_PID
wait_for "$WORK/watch.log" "Node $NODE Alive" 10 "\"Node $NODE Alive\" from the watcher" >/dev/null
alive_after=$(elapsed "$t_agent")
note "the watcher saw $NODE alive ${alive_after} s after the agent started"
wait_for "$WORK/agent.log" 'sample ' 15 "first sample line of the agent" >/dev/null
if [[ $K8S == 1 ]]; then
  wait_for "$WORK/controller.log" "Node $NODE Alive" 10 "\"Node $NODE Alive\" from the controller" >/dev/null
fi
show_monitornodes Alive

# --- 3. live configuration --------------------------------------------------------------------
say "3. Push a new config to $NODE: interval 2 s, metrics cpu and memory"
agent_mark=$(lines "$WORK/agent.log")
if [[ $K8S == 1 ]]; then
  # The Kubernetes way: a MonitorConfig; the controller writes /monitor/config/worker-1.
  monitor_config="apiVersion: nodepulse.io/v1alpha1
kind: MonitorConfig
metadata:
  name: demo-fast
spec:
  nodeNames: [$NODE]
  interval: 2
  metrics: [cpu, memory]"
  note "kubectl apply -f - <<EOF"
  printf '%s\n' "$monitor_config" | sed 's/^/[demo]   /'
  note "EOF"
  t_push=$(now_ms)
  printf '%s\n' "$monitor_config" | kubectl apply -f - 2>&1 | sed 's/^/[kubectl] /'
else
  note "nodepulsectl config set $NODE --interval 2 --metrics cpu,memory"
  note "  (the same as: etcdctl put /monitor/config/$NODE '{\"interval\": 2, \"metrics\": [\"cpu\",\"memory\"]}')"
  t_push=$(now_ms)
  "$BIN/nodepulsectl" config set "$NODE" --interval 2 --metrics cpu,memory 2>&1 | sed 's/^/[nodepulsectl] /'
fi
n=$(wait_for "$WORK/agent.log" 'config updated' 5 "\"config updated\" line from the agent" "$agent_mark")
applied_after=$(elapsed "$t_push")
note "the agent applied it ${applied_after} s after the push; its samples now come every 2 s:"
# Let the viewer see the new cadence: three samples after the update.
for i in 1 2 3; do
  n=$(wait_for "$WORK/agent.log" 'sample ' 5 "sample line $i after the update" "$n")
done
note "nodepulsectl nodes   (the heartbeat value is rewritten at most every 5 s; liveness rides on the lease)"
"$BIN/nodepulsectl" nodes 2>&1 | sed 's/^/[nodepulsectl] /'
if [[ $K8S == 1 ]]; then
  note "nodepulsectl config get $NODE   (the key the controller wrote)"
  "$BIN/nodepulsectl" config get "$NODE" 2>&1 | sed 's/^/[nodepulsectl] /'
  note "kubectl get monitorconfigs"
  kubectl get monitorconfigs 2>&1 | sed 's/^/[kubectl] /'
fi
show_monitornodes Alive

# --- 4. hard kill -----------------------------------------------------------------------------
say "4. Kill the agent hard (kill -9 $AGENT_PID): no goodbye, etcd expires its lease after ~${TTL} s"
watch_mark=$(lines "$WORK/watch.log")
t_kill=$(now_ms)
# (Reaped at once, so that bash does not print its own "Killed" line.)
{ kill -KILL "$AGENT_PID" && wait "$AGENT_PID"; } 2>/dev/null || true
wait_for "$WORK/watch.log" "Node $NODE Dead" $((TTL + 10)) "\"Node $NODE Dead\" from the watcher" "$watch_mark" >/dev/null
dead_after=$(elapsed "$t_kill")
note "the watcher reported $NODE dead ${dead_after} s after the kill (TTL ${TTL} s)"
if [[ $K8S == 1 ]]; then
  wait_for "$WORK/controller.log" "Node $NODE Dead" 10 "\"Node $NODE Dead\" from the controller" >/dev/null
fi
show_monitornodes Dead

say "Done: Alive after ${alive_after} s, config applied after ${applied_after} s, Dead ${dead_after} s after kill -9."
