#!/usr/bin/env bash
# kube-score on the chart rendered with its defaults and with each ci/*-values.yaml (`make lint`).
# Checks that do not fit nodepulse are ignored below, each with its reason; everything else must
# pass without a warning or a critical.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(bash hack/tools.sh helm kube-score)

ignores=(
  # CPU limits throttle a process that must renew its heartbeat lease on time (CFS throttling
  # delays it by whole periods); requests give each component its share.
  --ignore-container-cpu-limit
  # Pinned tags, and a node agent must start on a node that cannot reach the registry.
  --ignore-test container-image-pull-policy
  # The containers write nothing but their logs, which the kubelet rotates (read-only root
  # filesystems; etcd's data is on its volume).
  --ignore-test container-ephemeral-storage-request-and-limit
)

render() { "$BIN/helm" template nodepulse charts/nodepulse "$@"; }
status=0
for values in "" charts/nodepulse/ci/*-values.yaml; do
  echo "kube-score: chart${values:+ with $values}"
  manifests=$(render ${values:+-f "$values"})
  # kube-score exits non-zero on any critical; what it prints is what counts here.
  report=$("$BIN/kube-score" score - --output-format ci "${ignores[@]}" <<<"$manifests" || true)
  [[ $report == *"[OK]"* ]] || { echo "kube-score printed no result:"; echo "$report"; status=1; }
  if grep -Ev '^\[(OK|SKIPPED)\]' <<<"$report"; then status=1; fi
done
exit $status
