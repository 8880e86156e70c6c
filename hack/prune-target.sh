#!/usr/bin/env bash
# Keeps cargo's target dir from growing without end across CI runs: every change to a crate's
# dependencies or features gives its test and bench executables a new hash, and the old ones
# (hundreds of MB each) are never used again. Keeps the two newest executables of each name
# (a crate's lib and bin test targets share one) and drops the rest; cargo rebuilds anything
# it still wants. Incremental caches go too (CI builds with CARGO_INCREMENTAL=0).
#   hack/prune-target.sh [TARGET_DIR]
set -euo pipefail
dir=${1:-${CARGO_TARGET_DIR:-target}}
for profile in debug release; do
  deps=$dir/$profile/deps
  [[ -d $deps ]] || continue
  rm -rf "${dir:?}/$profile/incremental"
  find "$deps" -maxdepth 1 -type f -perm -u+x ! -name '*.so' -printf '%T@ %f\n' |
    sort -rn |
    awk '{ name = $2; sub(/-[0-9a-f]+$/, "", name); if (++seen[name] > 2) print $2 }' |
    while read -r f; do rm -f "$deps/$f" "$deps/$f.d"; done
done
