#!/usr/bin/env bash
# Sets up (idempotent), builds, and runs every test through CTest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/launch/setup.sh"
cd "${SEDD_BUILD:-$repo/build}"
ctest --output-on-failure -j 2 "$@"
