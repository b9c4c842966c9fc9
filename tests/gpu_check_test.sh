#!/usr/bin/env bash
# launch/gpu-check.sh without a GPU: it says "no GPU", checks that it would find everything it
# needs, writes gpu-check.json ("gpu": null, the dependency list) and exits 0; with a required
# binary missing it exits non-zero naming it; a failing nvidia-smi and a CUDA_VISIBLE_DEVICES that
# hides every device also count as no GPU.
# Exit 0: passed; 1: failed; 77: a GPU is present here (the script would run the real check).
#   gpu_check_test.sh BIN_DIR SOURCE_DIR [PYTHON]
set -uo pipefail
bin=$(cd "${1:?bin dir}" && pwd) || exit 1; src=$(cd "${2:?source dir}" && pwd) || exit 1; py=${3:-}
[[ -n $py && -x $py ]] || py=$(command -v python3 || echo "$src/.venv/bin/python")
script=$src/launch/gpu-check.sh

if command -v nvidia-smi >/dev/null 2>&1 &&
   [[ -n $(timeout 30 nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null) ]] &&
   ! [[ -n ${CUDA_VISIBLE_DEVICES+x} && ( -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ) ]]; then
  echo "SKIPPED: a GPU is present: gpu-check.sh would run the real check (run it yourself)"
  exit 77
fi

work=$(mktemp -d /tmp/sedd-gpu-check-test-XXXXXX)
trap 'rm -rf "$work"' EXIT
failures=0
fail() { echo "FAILED: $*"; failures=$((failures + 1)); }

# run NAME [ENV=VALUE...] -- ARGS...: gpu-check.sh with a time limit (a bug in the GPU detection
# must not start the 8-minute check), output in $work/NAME.out, exit code in $rc
run() {
  local name=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" timeout 120 bash "$script" --out "$work/$name" "$@" > "$work/$name.out" 2>&1
  rc=$?
  echo "--- $name: exit $rc"
  cat "$work/$name.out"
}

# (a) everything present
run a SEDD_BIN="$bin" --
((rc == 0)) || fail "(a) exit $rc, expected 0"
grep -q "no GPU" "$work/a.out" || fail "(a) no 'no GPU' in the output"
"$py" - "$work/a/gpu-check.json" <<'PY' || fail "(a) gpu-check.json"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["gpu"] is None, "gpu is not null"
assert j["no_gpu_reason"], "no reason"
deps = j["dependencies"]
names = {d["name"] for d in deps}
for need in ("sedd-train", "sedd-sample", "sedd-eval", "sedd-prepare", "sedd-bench-train", "sedd-bench-sample",
             "sedd_tests", "sedd_mpi_tests", "configs/sedd-small.ini", "mpirun", "timeout", "python3"):
    assert need in names, need + " is not in the dependency list"
bad = [d["name"] for d in deps if d["required"] and not d["present"]]
assert not bad, "required but marked missing: %s" % bad
assert all(d["path"] for d in deps if d["present"]), "a present dependency without its path"
assert j["missing"] == [] and j["ok"] is True, (j["missing"], j["ok"])
print("(a) gpu-check.json: gpu null, %d dependencies, every required one present" % len(deps))
PY

# (b) one required binary missing
mkdir -p "$work/bin"
for f in "$bin"/*; do
  [[ $(basename "$f") == sedd-bench-sample ]] || ln -s "$f" "$work/bin/"
done
run b SEDD_BIN="$work/bin" --
((rc != 0)) || fail "(b) exit 0 with sedd-bench-sample missing"
grep -q "no GPU" "$work/b.out" || fail "(b) no 'no GPU' in the output"
grep -q "missing: .*sedd-bench-sample" "$work/b.out" || fail "(b) the output does not name sedd-bench-sample as missing"
"$py" - "$work/b/gpu-check.json" <<'PY' || fail "(b) gpu-check.json"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["gpu"] is None
assert j["missing"] == ["sedd-bench-sample"], j["missing"]
assert j["ok"] is False
d = [d for d in j["dependencies"] if d["name"] == "sedd-bench-sample"][0]
assert d["required"] and not d["present"], d
print("(b) gpu-check.json names sedd-bench-sample as missing")
PY

# (c) an nvidia-smi that fails (a node without its driver) and (d) one that works while
# CUDA_VISIBLE_DEVICES hides every device: both are "no GPU"
mkdir -p "$work/smi-fails" "$work/smi-works"
printf '#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."\nexit 9\n' \
  > "$work/smi-fails/nvidia-smi"
printf '#!/bin/sh\necho "0, NVIDIA H200"\n' > "$work/smi-works/nvidia-smi"
chmod +x "$work/smi-fails/nvidia-smi" "$work/smi-works/nvidia-smi"
run c SEDD_BIN="$bin" PATH="$work/smi-fails:$PATH" --
((rc == 0)) || fail "(c) exit $rc, expected 0"
grep -q "no GPU (nvidia-smi failed" "$work/c.out" || fail "(c) a failing nvidia-smi is not 'no GPU'"
run d SEDD_BIN="$bin" PATH="$work/smi-works:$PATH" CUDA_VISIBLE_DEVICES= --
((rc == 0)) || fail "(d) exit $rc, expected 0"
grep -q "no GPU (CUDA_VISIBLE_DEVICES" "$work/d.out" || fail "(d) CUDA_VISIBLE_DEVICES='' is not 'no GPU'"

if ((failures)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "PASSED: gpu-check.sh without a GPU"
