#!/usr/bin/env bash
# launch/gpu-check.sh on a fake GPU node: a fake nvidia-smi, mpirun and compute-sanitizer, and fake
# test and benchmark binaries that print canned output, sleep, hang (with a child that ignores
# TERM) or fail, selected through the build's real bin/sedd-test-entries.tsv. With --budget 60:
#   (e) it ends inside the budget, writes exactly gpu-check.json, report.txt and logs.tar.gz, cuts
#       and reports the hanging part, leaves no process behind, keeps the multi-rank GPU entry for a
#       node with more GPUs, the failing benchmark is a problem, logs are cut to 200 lines, and the
#       last 12,000 characters of its output hold the GPU section and the problems;
#   (f) sent TERM halfway, it stops within seconds and still writes the three files with what ran.
#   gpu_check_fake_node_test.sh BIN_DIR SOURCE_DIR
set -uo pipefail
bin=$(cd "${1:?bin dir}" && pwd) || exit 1; src=$(cd "${2:?source dir}" && pwd) || exit 1
script=$src/launch/gpu-check.sh
[[ -f $bin/sedd-test-entries.tsv ]] || { echo "FAILED: no $bin/sedd-test-entries.tsv (build first)"; exit 1; }

work=$(mktemp -d /tmp/sedd-fake-gpu-node-XXXXXX)
fake=$work/fake-node-bin   # every fake process has this path in its command line
cleanup() { pkill -KILL -f "$fake" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
failures=0
fail() { echo "FAILED: $*"; failures=$((failures + 1)); }
mkdir -p "$fake"
cp "$bin/sedd-test-entries.tsv" "$fake/"

# Every fake starts with value_of OPTION ARGS...: the value given after OPTION, or nothing.
fake_prologue='value_of() { local want=$1 prev="" a; shift; for a; do [[ $prev == "$want" ]] && { echo "$a"; return; }; prev=$a; done; }'
fake_tool() {  # NAME BODY: a bash script in the fake bin folder
  printf '#!/usr/bin/env bash\n%s\n%s\n' "$fake_prologue" "$2" > "$fake/$1"
  chmod +x "$fake/$1"
}
fake_tool nvidia-smi '
case "$*" in
  *index,name,memory.total*) echo "index, name, memory.total [MiB], memory.used [MiB], driver_version, compute_cap, compute_mode, pci.bus_id, power.limit [W], clocks.max.sm [MHz]"
                             echo "0, NVIDIA H100 80GB HBM3, 81559 MiB, 1 MiB, 580.65, 9.0, Default, 00000000:19:00.0, 700.00 W, 1980 MHz" ;;
  *index,name*) echo "0, NVIDIA H100 80GB HBM3" ;;
  *memory.used*) echo "1 MiB" ;;
  *) echo "| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: 13.0 |" ;;
esac'
fake_tool mpirun '
while (($#)) && [[ $1 != -np ]]; do shift; done
shift 2
exec "$@"'
fake_tool compute-sanitizer '
while (($#)) && [[ $1 == --* ]]; do shift 2; done
echo "========= COMPUTE-SANITIZER"
"$@"; rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc'
fake_tool python-torch '
[[ $* == *TORCH_VERSIONS* ]] && echo "TORCH_VERSIONS {\"torch\": \"2.11.0\", \"cuda\": \"13.0\", \"cudnn\": 91000, \"nccl\": \"2.27.5\", \"cuda_available\": true, \"device_count\": 1, \"device\": \"NVIDIA H100 80GB HBM3\"}"
exit 0'
gtest_body='
filter=""; for a in "$@"; do [[ $a == --gtest_filter=* ]] && filter=${a#--gtest_filter=}; done
if [[ $filter == TrainGpu* ]]; then   # the life cycle hangs, with a child that ignores TERM
  bash -c "trap \"\" TERM; while :; do sleep 0.2; done; : $0" &
  echo "[ RUN      ] TrainGpu.LifeCycleOnGpuTrainCheckpointPreemptResumeSampleEval"
  while :; do sleep 0.2; done
fi
echo "NCCL version 2.27.5+cuda13.0"
echo "[ RUN      ] FusedOpsGpu.LayerNormModulateMatchesPlain"
echo "[       OK ] FusedOpsGpu.LayerNormModulateMatchesPlain (12 ms)"
echo "[ RUN      ] ModelGpu.Bf16AutocastStaysCloseToFp32"
echo "[       OK ] ModelGpu.Bf16AutocastStaysCloseToFp32 (40 ms)"
echo "[ RUN      ] NcclWatchdogGpu.StalledNcclCollectiveEndsTheJob"
echo "/src/tests/distributed_test.cpp:164: Skipped"
echo "the GPU is in exclusive-process compute mode"
echo "[  SKIPPED ] NcclWatchdogGpu.StalledNcclCollectiveEndsTheJob (1 ms)"
exit 0'
fake_tool sedd_tests "$gtest_body"
fake_tool sedd_mpi_tests "$gtest_body"
fake_tool sedd-bench-train '
json=$(value_of --bench.json "$@")
[[ $* == *"fused_loss false"* ]] && { echo "sedd-bench-train: error: out of memory (canned)"; exit 1; }
sleep 1
echo "[{\"tokens_per_s\": 250000.0, \"mfu\": 0.21, \"peak_memory_gb\": 21.5, \"split_data\": 0.01, \"split_forward_backward\": 0.9, \"split_optimizer_and_communication\": 0.09}]" > "$json"'
fake_tool sedd-bench-sample '
json=$(value_of --json "$@")
for i in $(seq 500); do echo "progress line $i"; done
sleep 1
echo "{\"results\": [{\"plain_seconds\": 9.0, \"cached_seconds\": 3.0, \"cached_tokens_per_s\": 5461.0, \"identical\": true, \"equal_token_fraction\": 1.0}]}" > "$json"'
fake_tool sedd-prepare '
out=$(value_of --out "$@")
mkdir -p "$out" && echo data > "$out/shard-00000.h5"'
fake_tool sedd-train '
dir=$(value_of --run.dir "$@")
mkdir -p "$dir" && echo "{}" > "$dir/metrics.jsonl"'
fake_tool sedd-eval '
json=$(value_of --json "$@")
echo "{\"tokens\": 65536, \"seconds\": 2.0, \"nats_per_token\": 3.1, \"tokens_x_draws_per_s\": 65536.0, \"mc_samples\": 2}" > "$json"'
fake_tool sedd-sample 'exit 0'

three_files_and_no_process_left() {  # CASE: --out holds exactly the three files; no fake process runs
  local files left
  files=$(cd "$work/$1" && ls -A | sort | tr '\n' ' ')
  [[ $files == "gpu-check.json logs.tar.gz report.txt " ]] || fail "($1) --out holds '$files', not exactly the three files"
  left=$(pgrep -f "$fake" | grep -v "^$$\$")
  [[ -z $left ]] || fail "($1) processes outlived the check: $(ps -o pid,args -p "${left//$'\n'/,}" 2>/dev/null)"
}

fake_env=(env PATH="$fake:$PATH" SEDD_BIN="$fake" SEDD_PYTHON="$fake/python-torch" SEDD_CHECK_BENCH_STEPS=5)

# (e) a whole run on the fake node
start=$SECONDS
"${fake_env[@]}" bash "$script" --out "$work/e" --budget 60 > "$work/e.out" 2>&1
rc=$? took=$((SECONDS - start))
echo "--- (e): exit $rc in $took s"
cat "$work/e.out"
((rc == 1)) || fail "(e) exit $rc, expected 1 (a part hung and a benchmark failed)"
((took <= 60)) || fail "(e) took $took s, over the 60 s budget"
three_files_and_no_process_left e
tail -c 12000 "$work/e.out" | grep -q "^GPU tests: " || fail "(e) the last 12,000 characters have no GPU section"
tail -c 12000 "$work/e.out" | grep -q "^PROBLEMS" || fail "(e) the last 12,000 characters have no problem list"
(( $(wc -c < "$work/e/report.txt") <= 10000 )) || fail "(e) report.txt is over 10,000 characters"
mkdir -p "$work/e/untar" && tar -C "$work/e/untar" -xzf "$work/e/logs.tar.gz" || fail "(e) logs.tar.gz does not unpack"
[[ -f $work/e/untar/logs/sample_128.log ]] || fail "(e) logs.tar.gz has no logs/sample_128.log"
(( $(wc -l < "$work/e/untar/logs/sample_128.log") == 200 )) || fail "(e) sample_128.log is not cut to 200 lines"
python3 - "$work/e/gpu-check.json" <<'PY' || fail "(e) gpu-check.json"
import json, sys
j = json.load(open(sys.argv[1]))
parts = {p["name"]: p for p in j["parts"]}
assert j["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and j["gpu"]["compute_mode"] == "Default", j["gpu"]
assert parts["life_cycle"]["state"] == "timed out", parts["life_cycle"]
assert any("life_cycle timed out" in p for p in j["problems"]), j["problems"]
assert parts["gpu_nccl_collectives_np2"]["state"].startswith("not run: needs 2 GPUs"), parts["gpu_nccl_collectives_np2"]
assert parts["gpu_gpu_tests"]["state"] == "done" and parts["gpu_nccl_collectives_np1"]["state"] == "done"
g = j["gpu_tests"]["gpu_gpu_tests"]
assert len(g["passed"]) == 2 and g["skipped"][0]["reason"].startswith("the GPU is in exclusive"), g
assert j["training"]["b32"]["tokens_per_s"] == 250000.0, j["training"]["b32"]
assert any(p.startswith("train_b32_no_fused_loss exited 1") for p in j["problems"]), j["problems"]
assert j["sampling"]["128"]["cached_seconds"] == 3.0 and j["eval"]["k2"]["tokens_per_s"] == 32768.0
assert j["versions"]["torch"] == "2.11.0" and j["versions"]["nccl_loaded_by_binaries"] == "2.27.5+cuda13.0"
assert j["sanitizer"]["memcheck"]["errors"] == 0, j["sanitizer"]
assert j["ok"] is False and j["elapsed_s"] <= 60
print("(e) gpu-check.json: life cycle cut and reported, np2 entry kept for a 2-GPU node, figures read, %d problems"
      % len(j["problems"]))
PY

# (f) TERM halfway (during the hanging life cycle)
start=$SECONDS
"${fake_env[@]}" bash "$script" --out "$work/f" --budget 60 > "$work/f.out" 2>&1 &
pid=$!
for _ in $(seq 100); do grep -q "life_cycle (at most" "$work/f.out" 2>/dev/null && break; sleep 0.2; done
sleep 1
kill -TERM "$pid"
wait "$pid"; rc=$?
took=$((SECONDS - start))
echo "--- (f): exit $rc in $took s"
tail -n 30 "$work/f.out"
((rc == 143)) || fail "(f) exit $rc after TERM, expected 143"
((took <= 30)) || fail "(f) took $took s to stop"
three_files_and_no_process_left f
python3 - "$work/f/gpu-check.json" <<'PY' || fail "(f) gpu-check.json"
import json, sys
j = json.load(open(sys.argv[1]))
parts = {p["name"]: p for p in j["parts"]}
assert j["stopped_by"] == "SIGTERM", j.get("stopped_by")
assert parts["life_cycle"]["state"] == "stopped by SIGTERM", parts["life_cycle"]
assert parts["gpu_gpu_tests"]["state"] == "done" and "train_b32" not in parts, list(parts)
assert any(p.startswith("stopped by SIGTERM") for p in j["problems"]), j["problems"]
print("(f) gpu-check.json after TERM: the parts before it, the stopped life cycle, nothing after")
PY

if ((failures)); then
  echo "$failures check(s) failed"
  exit 1
fi
echo "PASSED: gpu-check.sh on a fake GPU node"
