#!/usr/bin/env bash
# Least-privilege etcd users for nodepulse, then `auth enable` (etcd has no flag for it).
#
#   nodepulse-agent       readwrite /monitor/heartbeat/  (its own lease-bound heartbeat key)
#                         read      /monitor/config/     (get + watch its configuration key)
#   nodepulse-controller  read      /monitor/heartbeat/  (list + watch every heartbeat)
#                         readwrite /monitor/config/     (write the keys MonitorConfigs produce)
#   root                  needed by etcd before `auth enable`; keep its password for operators only.
#
# Leases need no permission of their own: any authenticated user may grant and keep alive a lease,
# and a put with a lease is checked against the key only.
#
# etcdctl takes its connection from the environment (ETCDCTL_ENDPOINTS, ETCDCTL_CACERT,
# ETCDCTL_CERT, ETCDCTL_KEY) or from the flags in $ETCDCTL_FLAGS. Passwords come from the
# environment, never from the command line of this script:
#
#   ROOT_PASSWORD=... AGENT_PASSWORD=... CONTROLLER_PASSWORD=... \
#   ETCDCTL_ENDPOINTS=https://etcd-0.etcd-service.etcd.svc.cluster.local:2379 hack/etcd-roles.sh
#
# The etcd image has no shell: run this where etcdctl reaches etcd (e.g. through
# `kubectl -n etcd port-forward etcd-0 2379`). It is meant for the first setup, before auth is on.
set -euo pipefail

ETCDCTL=${ETCDCTL:-etcdctl}
: "${ROOT_PASSWORD:?set ROOT_PASSWORD}"
: "${AGENT_PASSWORD:?set AGENT_PASSWORD}"
: "${CONTROLLER_PASSWORD:?set CONTROLLER_PASSWORD}"
AGENT_USER=${AGENT_USER:-nodepulse-agent}
CONTROLLER_USER=${CONTROLLER_USER:-nodepulse-controller}

# shellcheck disable=SC2086 # ETCDCTL_FLAGS is a list of flags
ctl() { "$ETCDCTL" ${ETCDCTL_FLAGS:-} "$@" >/dev/null; }

# --interactive=false reads the password from the argument instead of a terminal; stdin keeps it
# off the process list.
add_user() { printf '%s' "$2" | "$ETCDCTL" ${ETCDCTL_FLAGS:-} user add "$1" --interactive=false >/dev/null; }

add_user root "$ROOT_PASSWORD"
ctl user grant-role root root

ctl role add nodepulse-agent
ctl role grant-permission nodepulse-agent --prefix=true readwrite /monitor/heartbeat/
ctl role grant-permission nodepulse-agent --prefix=true read /monitor/config/
add_user "$AGENT_USER" "$AGENT_PASSWORD"
ctl user grant-role "$AGENT_USER" nodepulse-agent

ctl role add nodepulse-controller
ctl role grant-permission nodepulse-controller --prefix=true read /monitor/heartbeat/
ctl role grant-permission nodepulse-controller --prefix=true readwrite /monitor/config/
add_user "$CONTROLLER_USER" "$CONTROLLER_PASSWORD"
ctl user grant-role "$CONTROLLER_USER" nodepulse-controller

ctl auth enable
echo "etcd auth enabled: users $AGENT_USER, $CONTROLLER_USER (and root)"
