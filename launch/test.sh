#!/usr/bin/env bash
# Sets up (idempotent), builds, and runs the tests through CTest: every entry by default,
#   --quick   the quick tier only (CTest label `quick`: every suite's core, a few minutes)
# Any other arguments go to ctest (e.g. -R NAME, -L mpi, -LE slow).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=()
for a in "$@"; do
  if [[ $a == --quick ]]; then args+=(-L quick); else args+=("$a"); fi
done
bash "$repo/launch/setup.sh"
cd "${SEDD_BUILD:-$repo/build}"
ctest --output-on-failure -j 2 "${args[@]}"
