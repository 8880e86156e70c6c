#!/usr/bin/env bash
# The lab's demonstration scenario on one machine (what `make demo` runs, after building etcd and
# the two binaries it starts):
#   1. `nodepulsectl watch` starts: no node yet;
#   2. an agent starts as worker-1 (interval 10 s, heartbeat TTL 5 s): the watcher prints
#      `Node worker-1 Alive`;
#   3. a new config (interval 2 s) is pushed: the agent logs it at once, and samples every 2 s;
#   4. the agent is killed with SIGKILL: about TTL later the watcher prints
#      `Node worker-1 Dead (heartbeat expired)`.
# Everything runs on loopback in a scratch directory; every process it started is stopped at the
# end and on Ctrl-C (SIGINT) or SIGTERM. Lines are prefixed [demo], [watch], [agent] (and
# [controller], [kubectl] with DEMO_K8S=1, which adds the controller and a kube-apiserver and shows
# `kubectl get monitornodes` at each step).
#
# Ports: our binaries bind 127.0.0.1:0 and log the address they got; etcd's client port and the
# API server's port (which cannot be 0: see reserve_port) are reserved under a lock, outside the
# kernel's ephemeral range; etcd's peer listener is a unix socket in the scratch directory.
#
# Signals: the scenario runs as a background job, and this shell only ever sits in the `wait`
# builtin, which returns as soon as a trapped signal arrives. (A shell running a foreground
# command acts on SIGINT only after that command ends, and not at all when the command exits
# normally after catching it too.) The trap freezes the scenario, stops what it started, in
# reverse order, and exits 130.
#
# Environment: NODEPULSE_TOOLS (etcd, etcdctl, kube-apiserver, kubectl; default
# ~/.cache/nodepulse/tools/bin), NODEPULSE_BIN (our binaries; default $CARGO_TARGET_DIR/debug,
# else target/debug), DEMO_TTL (heartbeat TTL in seconds, default 5), DEMO_K8S=1, DEMO_KEEP=1
# (keep the scratch directory).
set -euo pipefail

# A shell started with SIGINT ignored (a background job of another script: `make demo &`, some CI
# runners) can neither trap nor reset it, and Ctrl-C would do nothing: start again with the
# default disposition.
sigint_ignored() {
  local mask
  mask=$(awk '/^SigIgn:/ { print $2 }' /proc/$$/status 2>/dev/null) || return 1
  [[ -n $mask ]] && (((16#$mask & 2) != 0))
}
if [[ -z ${NODEPULSE_DEMO_REEXEC:-} ]] && sigint_ignored && env --default-signal=INT true 2>/dev/null; then
  export NODEPULSE_DEMO_REEXEC=1
  exec env --default-signal=INT bash "$0" "$@"
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${NODEPULSE_TOOLS:-${NODEPULSE_CACHE:-$HOME/.cache/nodepulse}/tools/bin}
BIN=${NODEPULSE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
TTL=${DEMO_TTL:-5}
K8S=${DEMO_K8S:-0}
NODE=worker-1

for tool in "$TOOLS/etcd" "$TOOLS/etcdctl" "$BIN/nodepulsectl" "$BIN/nodepulse-agent"; do
  [[ -x $tool ]] || { echo "[demo] $tool is missing: run \`make demo\` (it builds what the demo runs first)" >&2; exit 1; }
done
if [[ $K8S == 1 ]]; then
  for tool in "$TOOLS/kube-apiserver" "$TOOLS/kubectl" "$BIN/nodepulse-controller"; do
    [[ -x $tool ]] || { echo "[demo] $tool is missing: run \`DEMO_K8S=1 make demo\`" >&2; exit 1; }
  done
  command -v openssl >/dev/null || { echo "[demo] openssl is not on PATH" >&2; exit 1; }
fi

# Children die with the scenario even if it is SIGKILLed (then no trap runs).
DIE_WITH_US=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then DIE_WITH_US=(setpriv --pdeathsig KILL --); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nodepulse-demo.XXXXXX")
# What the scenario started, one "<pid> <start time>" per line in start order, and the `tail |
# sed` prefixers (they end when their process does). Files, because the scenario runs in a
# subshell and this shell stops what it started.
: >"$WORK/pids"
: >"$WORK/followers"

# The start time of process PID (field 22 of /proc/PID/stat): with the pid, it names one process
# even after the pid is reused.
start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  set -- $stat
  echo "${20}"
}

# Whether PID is still the process that started at START and has not exited (a zombie has
# closed its sockets and files: it counts as gone).
running() {
  local pid=$1 start=$2 stat
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  set -- $stat
  [[ $1 != Z && ${20} == "$start" ]]
}

# The supervising shell (this one, the parent of the scenario job): the scenario stops when it
# is gone, even if it was SIGKILLed and ran no trap.
T_PID=$$
T_START=$(start_time $$)
supervised() { running "$T_PID" "$T_START"; }

# stop_started: stops what the scenario started, in reverse order, one at a time, so that the
# agent and the watcher stop while etcd still answers (a stopping agent marks its heartbeat
# Stopping).
stop_started() {
  local lines=() pid start i
  mapfile -t lines <"$WORK/pids"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r pid start <<<"${lines[i]}"
    running "$pid" "$start" || continue
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do running "$pid" "$start" || break; sleep 0.1; done
    if running "$pid" "$start"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

# end_followers MS: gives the [name] prefixers MS milliseconds to print their process's last
# lines and end (`tail --pid` ends once its process is reaped), then ends the rest.
end_followers() {
  local lines=() line pid start deadline=$(($(date +%s%3N) + $1))
  mapfile -t lines <"$WORK/followers"
  for line in "${lines[@]}"; do
    read -r pid start <<<"$line"
    while running "$pid" "$start" && (($(date +%s%3N) < deadline)); do sleep 0.1; done
    if running "$pid" "$start"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}

SCENARIO=
cleanup() {
  local status=$?
  # Nothing interrupts the cleanup: it is bounded (5 s per process at most).
  trap '' INT TERM
  trap - EXIT
  if [[ -n $SCENARIO ]]; then
    # Interrupted: freeze the scenario (it starts nothing more), stop what it started, then end
    # it and whatever it was running in the foreground.
    kill -STOP "$SCENARIO" 2>/dev/null || true
    stop_started
    # The frozen scenario cannot reap what it started, so its prefixers never see their process
    # end: they get the time to print the last lines (they poll every 0.1 s), then go.
    end_followers 300
    pkill -KILL -P "$SCENARIO" 2>/dev/null || true
    kill -KILL "$SCENARIO" 2>/dev/null || true
    wait "$SCENARIO" 2>/dev/null || true
  fi
  if [[ ${DEMO_KEEP:-0} == 1 || ($status != 0 && $status != 130) ]]; then
    echo "[demo] logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  echo "[demo] stopped everything it started"
  exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "[demo] interrupted"; exit 130' INT TERM

say() { printf '\n[demo] %s\n' "$*"; }
note() { printf '[demo] %s\n' "$*"; }
fail() { echo "[demo] FAILED: $*" >&2; exit 1; }

# reserve_port: sets RESERVED_PORT to a loopback TCP port for a server that cannot bind port 0
# (kube-apiserver refuses --secure-port=0; etcd's built-in gateway dials the configured client
# address). Picking a "free" port and handing it over races with every other process that binds
# meanwhile; this cannot collide: the port lies below the kernel's ephemeral range
# (/proc/sys/net/ipv4/ip_local_port_range), which the kernel never hands out by itself, and an
# exclusive flock on /tmp/nodepulse-ports/<port>, held by this shell and its children until they
# exit, keeps every other reserver (other demos, the test harness: testkit's ReservedPort) off
# it. The lock goes when the last holder exits.
reserve_port() {
  local dir=/tmp/nodepulse-ports low end n start i port fd
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range
  end=$((low < 30000 ? low : 30000))
  ((end > 20100)) || fail "the ephemeral port range starts at $low: no room below it for reserved ports"
  mkdir -p "$dir" && chmod 1777 "$dir" 2>/dev/null || true
  n=$((end - 20000))
  start=$((RANDOM % n))
  for ((i = 0; i < n; i++)); do
    port=$((20000 + (start + i) % n))
    exec {fd}>>"$dir/$port" || continue
    if flock -n "$fd" && ! (exec {probe}<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      RESERVED_PORT=$port
      return 0
    fi
    exec {fd}>&-
  done
  fail "no port left to reserve in 20000..$end"
}

# remember PID: records a process the scenario started, for the cleanup.
remember() {
  echo "$1 $(start_time "$1" || echo 0)" >>"$WORK/$2"
}

# start NAME LOG CMD... : runs CMD in the background with its output in LOG, and echoes LOG live
# with a [NAME] prefix (colour codes removed); NAME "-" only logs. Sets START_PID.
start() {
  local name=$1 log=$2
  shift 2
  "${DIE_WITH_US[@]}" "$@" >"$log" 2>&1 &
  START_PID=$!
  remember "$START_PID" pids
  if [[ $name != - ]]; then
    tail --pid="$START_PID" -s 0.1 -n +1 -F "$log" 2>/dev/null |
      sed -u -e $'s/\x1b\\[[0-9;]*m//g' -e "s/^/[$name] /" &
    remember "$!" followers
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
    supervised || exit 1
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
start_etcd() {
  reserve_port
  ETCD=http://127.0.0.1:$RESERVED_PORT
  say "starting etcd on $ETCD (a single member, data in $WORK/etcd)"
  # The peer listener is a unix socket named "peer:1" in the working directory (etcd wants
  # host:port even for a socket): a single member never dials it, and it collides with nothing.
  start - "$WORK/etcd.log" env -C "$WORK" "$TOOLS/etcd" --name demo --data-dir "$WORK/etcd" \
    --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
    --listen-peer-urls unix://peer:1 --initial-advertise-peer-urls unix://peer:1 \
    --initial-cluster demo=unix://peer:1 --log-level warn
  local deadline=$(($(now_ms) + 30000))
  until "$TOOLS/etcdctl" --endpoints "$ETCD" endpoint health >/dev/null 2>&1; do
    (($(now_ms) < deadline)) || { echo "[demo] FAILED: etcd did not start; $WORK/etcd.log:" >&2; cat "$WORK/etcd.log" >&2; exit 1; }
    sleep 0.2
  done
  export NODEPULSE_ETCD_ENDPOINTS=$ETCD
  export RUST_LOG=${RUST_LOG:-info}
}

kubectl() { "$TOOLS/kubectl" "$@"; }

# --- optional: kube-apiserver + controller --------------------------------------------------
# The same kube-apiserver the test harness runs (testkit): serving certificate from a throwaway
# CA, a service-account key pair, a static admin token, a kubeconfig. It keeps its objects in
# the demo's etcd under /registry, beside nodepulse's /monitor keys.
k8s_start() {
  local dir=$WORK/k8s port
  mkdir -p "$dir"
  reserve_port # kube-apiserver refuses --secure-port=0
  port=$RESERVED_PORT
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
  until kubectl get namespace default >/dev/null 2>&1; do
    (($(now_ms) < deadline)) || fail "no namespace default in kube-apiserver"
    sleep 0.2
  done
  note "kubectl apply --server-side -f manifests/00-crds.yaml"
  kubectl apply --server-side -f "$ROOT/manifests/00-crds.yaml" 2>&1 | sed 's/^/[kubectl] /'
  kubectl wait --for=condition=Established --timeout=60s \
    crd/monitornodes.nodepulse.io crd/monitorconfigs.nodepulse.io 2>&1 | sed 's/^/[kubectl] /'
  note "nodepulse-controller --leader-election-namespace default --etcd-endpoints $ETCD"
  start controller "$WORK/controller.log" "$BIN/nodepulse-controller" \
    --metrics-addr 127.0.0.1:0 --leader-election-namespace default \
    --etcd-endpoints "$ETCD"
  wait_for "$WORK/controller.log" 'became leader' 30 "\"became leader\" from the controller" >/dev/null
}

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

# The four steps, in a background job (see "Signals" at the top).
scenario() {
  # At its end, or when it fails, the scenario stops what it started itself.
  trap 'stop_started; end_followers 3000' EXIT
  # Relative to the scratch directory: etcd's peer socket.
  cd "$WORK"
  start_etcd
  if [[ $K8S == 1 ]]; then
    k8s_start
  fi

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
    --metrics-addr 127.0.0.1:0 --etcd-endpoints "$ETCD"
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
}

scenario &
SCENARIO=$!
# Returns at once when SIGINT or SIGTERM arrives (their trap runs, then the cleanup); else with
# the scenario's own status, which the cleanup passes on.
status=0
wait "$SCENARIO" || status=$?
SCENARIO=
exit "$status"
