#!/usr/bin/env bash
# The first command on a new GPU node: proves the GPU road of this build in at most 8 minutes and
# leaves one report.
#
#   bash launch/gpu-check.sh [--out DIR] [--budget SECONDS] [--no-suite] [--deps-only]
#   SEDD_BIN=DIR bash launch/gpu-check.sh               (binaries from a relocatable bundle of the build)
#
# Executables and test binaries come from $SEDD_BIN, else $SEDD_BUILD/bin (default build/bin),
# else the folder of `sedd-train` on PATH; mpirun and compute-sanitizer from PATH or beside SEDD_BIN
# (a bundle's root/usr/bin and sanitizer/bin).
#
# With a GPU, every part runs under its own timeout, whatever happened before it, within the budget
# (default 480 s):
#   info        GPU name, memory, driver (nvidia-smi); torch, CUDA, cuDNN, NCCL versions
#   gpu tests   every *_tests binary with --gtest_filter '*Gpu*:*Nccl*:*Cuda*:Libraries*', the MPI
#               test binary under mpirun -np 1, then (as CTest does) under -np 2 and -np 3
#   life cycle  TrainGpu.* (train -> checkpoint -> SIGUSR1 -> resume -> sample -> eval) and its figures
#   training    sedd-bench-train on configs/sedd-small.ini, bf16 on cuda, batch 32 and 64; batch 32
#               again with --train.fused_kernels false and with --train.fused_loss false
#   sampling    sedd-bench-sample --model small, 16 x 1024 tokens, analytic, 128 and 1024 steps
#   sanitizer   compute-sanitizer memcheck over FusedOpsGpu*, racecheck over FusedOpsGpu.LayerNorm*
#   eval        sedd-prepare (this tree's text, byte tokenizer) -> a 20-step sedd-small sedd-train ->
#               sedd-eval with K = 2 and 16 (antithetic) draws per sequence: tokens/s, tokens x K / s
#   suite       every other CTest entry of tests/CMakeLists.txt (GPU tests excluded: they ran above),
#               in the background on the cores the foreground does not use
# then prints one report and writes DIR/gpu-check.json (default <project>/runs/gpu-check); logs in DIR/logs.
# Exit 0 when every test passed, no part failed and the sanitizers found nothing; 1 otherwise.
#
# Without a GPU (no nvidia-smi, nvidia-smi fails or lists none, or CUDA_VISIBLE_DEVICES hides every
# device) it says "no GPU", checks that it would find every binary, test binary, config and tool it
# needs, writes gpu-check.json with "gpu": null and that list, and exits 0 when all are present,
# 1 naming what is missing otherwise. --deps-only does only that check, GPU or not.
#
# Environment: SEDD_BIN, SEDD_BUILD, SEDD_PYTHON (a python with torch, for the versions),
# SEDD_CHECK_BENCH_STEPS (timed training steps, default 20), SEDD_CHECK_SUITE_JOBS (parallel suites),
# SEDD_CHECK_MEMCHECK_FILTER / SEDD_CHECK_RACECHECK_FILTER (the sanitizers' gtest filters).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$repo/runs/gpu-check
budget=480
run_suite=1
deps_only=0
while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    --budget=*) budget=${1#--budget=}; shift ;;
    --no-suite) run_suite=0; shift ;;
    --deps-only) deps_only=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $budget =~ ^[0-9]+$ ]] || { echo "gpu-check: --budget takes whole seconds" >&2; exit 2; }

t0=$SECONDS
deadline=$((t0 + budget - 15))   # the last 15 s are for the report
say() { printf '[gpu-check] %s\n' "$*"; }

mkdir -p "$out/logs" || { echo "gpu-check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
rm -f "$out/gpu-check.json" "$out/parts.tsv" "$out/deps.tsv" "$out"/logs/*.log "$out"/bench/*.json "$out"/bench/*.jsonl
: > "$out/parts.tsv"

# --- where things are ---------------------------------------------------------------------------
if [[ -n ${SEDD_BIN:-} ]]; then
  bin=$SEDD_BIN
elif [[ -x ${SEDD_BUILD:-$repo/build}/bin/sedd-train ]]; then
  bin=${SEDD_BUILD:-$repo/build}/bin
elif command -v sedd-train >/dev/null 2>&1; then
  bin=$(dirname "$(command -v sedd-train)")
else
  bin=${SEDD_BUILD:-$repo/build}/bin
fi
[[ -d $bin ]] && bin=$(cd "$bin" && pwd)

find_tool() {  # NAME [FALLBACK...]: the first executable found, or nothing
  local name=$1 p; shift
  if p=$(command -v "$name" 2>/dev/null); then echo "$p"; return 0; fi
  for p in "$@"; do [[ -x $p && -f $p ]] && { echo "$p"; return 0; }; done
  return 1
}
mpirun_path=$(find_tool mpirun "$bin/../root/usr/bin/mpirun") || mpirun_path=""
if [[ -n $mpirun_path && $mpirun_path == "$bin/../root/usr/bin/mpirun" && -z ${OPAL_PREFIX:-} ]]; then
  OPAL_PREFIX=$(cd "$bin/../root/usr" && pwd); export OPAL_PREFIX   # a relocated Open MPI
fi
sanitizer=$(find_tool compute-sanitizer "$bin/../sanitizer/bin/compute-sanitizer" \
            "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer") || sanitizer=""
report_py=$(find_tool python3 "$repo/.venv/bin/python") || report_py=""
torch_py=""
for p in "${SEDD_PYTHON:-}" "$repo/.venv/bin/python" python3; do
  [[ -n $p ]] && command -v "$p" >/dev/null 2>&1 && { torch_py=$(command -v "$p"); break; }
done

# --- dependency check ---------------------------------------------------------------------------
required_bins=(sedd-train sedd-sample sedd-eval sedd-prepare sedd-bench-train sedd-bench-sample sedd_tests sedd_mpi_tests)
required_files=(configs/sedd-small.ini tests/CMakeLists.txt tests/data/sedd_reference.h5
                tests/slurm/slurm_requeue_test.sh tests/slurm/slurm_multinode_test.sh)
missing=()
dep() {  # NAME KIND REQUIRED(1|0) PATH-or-empty NOTE
  local present=1 note=$5
  [[ -z $4 ]] && present=0
  ((present)) && note=""
  # fields separated by \x1f: a tab would let `read` merge an empty field with the next one
  printf '%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\n' "$1" "$2" "$3" "$present" "$4" "$note" >> "$out/deps.tsv"
  if ((present)); then
    printf '  %-8s %-7s %-36s %s\n' present "$2" "$1" "$4"
  elif (($3)); then
    printf '  %-8s %-7s %-36s %s\n' MISSING "$2" "$1" "$5"
    missing+=("$1")
  else
    printf '  %-8s %-7s %-36s %s\n' absent "$2" "$1" "$5"
  fi
}
check_dependencies() {  # GPU(1|0)
  : > "$out/deps.tsv"
  missing=()
  say "dependency check (SEDD_BIN=$bin, project $repo):"
  local b f p
  for b in "${required_bins[@]}"; do
    p=""; [[ -f $bin/$b && -x $bin/$b ]] && p=$bin/$b
    dep "$b" binary 1 "$p" "not in $bin"
  done
  for f in "${required_files[@]}"; do
    p=""; [[ -f $repo/$f ]] && p=$repo/$f
    dep "$f" file 1 "$p" "not in $repo"
  done
  dep mpirun tool 1 "$mpirun_path" "not on PATH (nor $bin/../root/usr/bin)"
  p=$(find_tool timeout) || p=""; dep timeout tool 1 "$p" "coreutils' timeout is not on PATH"
  dep python3 tool 1 "$report_py" "needed for the report (python3 on PATH or $repo/.venv)"
  p=$(find_tool nvidia-smi) || p=""; dep nvidia-smi tool "$1" "$p" "needed on a GPU node (the GPU's name, memory, driver)"
  dep compute-sanitizer tool 0 "$sanitizer" "optional: the memcheck/racecheck parts are skipped without it"
  p=$(find_tool taskset) || p=""; dep taskset tool 0 "$p" "optional: the background suite then shares the benchmarks' cores"
  p=""
  [[ -n $torch_py ]] && timeout 60 "$torch_py" -c 'import torch' >/dev/null 2>&1 && p=$torch_py
  dep "python+torch" tool 0 "$p" "optional: versions are then read from the torch/version.py of the libtorch the binaries load"
}

json_str() {  # a JSON string literal
  local s=$1
  s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}; s=${s//$'\r'/\\r}
  printf '"%s"' "$s"
}
write_deps_only_json() {  # REASON: gpu-check.json without a GPU (plain bash: works without python)
  local first=1 name kind req present path note
  {
    printf '{\n  "version": 1,\n  "time": %s,\n  "host": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" \
      "$(json_str "$(hostname 2>/dev/null || echo unknown)")"
    printf '  "repo": %s,\n  "sedd_bin": %s,\n  "gpu": null,\n  "no_gpu_reason": %s,\n' \
      "$(json_str "$repo")" "$(json_str "$bin")" "$(json_str "$1")"
    printf '  "dependencies": ['
    while IFS=$'\x1f' read -r name kind req present path note; do
      ((first)) || printf ','
      first=0
      printf '\n    {"name": %s, "kind": %s, "required": %s, "present": %s, "path": %s, "note": %s}' \
        "$(json_str "$name")" "$(json_str "$kind")" "$( ((req)) && echo true || echo false)" \
        "$( ((present)) && echo true || echo false)" "$(json_str "$path")" "$(json_str "$note")"
    done < "$out/deps.tsv"
    printf '\n  ],\n  "missing": ['
    first=1
    for name in "${missing[@]}"; do ((first)) || printf ', '; first=0; json_str "$name"; done
    printf '],\n  "ok": %s\n}\n' "$( ((${#missing[@]})) && echo false || echo true)"
  } > "$out/gpu-check.json"
}

# --- is there a GPU? ----------------------------------------------------------------------------
no_gpu=""
smi=$(find_tool nvidia-smi) || smi=""
if [[ -z $smi ]]; then
  no_gpu="nvidia-smi not found"
elif ! smi_list=$(timeout 30 "$smi" --query-gpu=index,name --format=csv,noheader 2>&1); then
  no_gpu="nvidia-smi failed: $(printf '%s' "$smi_list" | head -n 2 | tr '\n' ' ')"
elif ! grep -q '[^[:space:]]' <<< "$smi_list"; then
  no_gpu="nvidia-smi lists no GPU"
elif [[ -n ${CUDA_VISIBLE_DEVICES+x} && ( -z ${CUDA_VISIBLE_DEVICES} || ${CUDA_VISIBLE_DEVICES} == -1 ||
        ${CUDA_VISIBLE_DEVICES,,} == none || ${CUDA_VISIBLE_DEVICES} == NoDevFiles ) ]]; then
  no_gpu="CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU"
fi

if [[ -n $no_gpu || $deps_only == 1 ]]; then
  if [[ -n $no_gpu ]]; then
    say "no GPU ($no_gpu): checking only that everything the GPU check needs is here"
    check_dependencies 0
  else
    say "dependency check only (--deps-only)"
    check_dependencies 1
  fi
  write_deps_only_json "${no_gpu:-not probed (--deps-only)}"
  if ((${#missing[@]})); then
    say "missing: ${missing[*]}"
    say "wrote $out/gpu-check.json"
    exit 1
  fi
  say "everything the GPU check needs is present; wrote $out/gpu-check.json"
  exit 0
fi

# ================================ with a GPU =====================================================
say "GPU found: $(head -n 1 <<< "$smi_list" | sed 's/^ *//') — budget ${budget} s, report in $out"
check_dependencies 1
((${#missing[@]})) && say "missing: ${missing[*]} (the parts that need them are reported as not run)"

export GTEST_COLOR=no OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
       OMPI_MCA_rmaps_base_oversubscribe=1 PYTHONUNBUFFERED=1
mpi=("${mpirun_path:-mpirun}" --oversubscribe --bind-to none)
work=$(mktemp -d "${TMPDIR:-/tmp}/sedd-gpu-check.XXXXXX")
bg_pid=""
cleanup() {
  [[ -n $bg_pid ]] && kill "$bg_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# Cores: the foreground (GPU parts) keeps the first 4 allowed cores, the background suite the rest.
fg_cpus="" bg_cpus="" ncpu=$(nproc 2>/dev/null || echo 1)
if [[ -n $report_py ]] && command -v taskset >/dev/null 2>&1 && ((ncpu >= 8)); then
  read -r fg_cpus bg_cpus < <("$report_py" -c 'import os
c = sorted(os.sched_getaffinity(0)); print(",".join(map(str, c[:4])), ",".join(map(str, c[4:])))')
fi
pin() {  # CPULIST CMD...: run pinned when a list is given
  local cpus=$1; shift
  if [[ -n $cpus ]]; then taskset -c "$cpus" "$@"; else "$@"; fi
}
fg_cores=$ncpu; [[ -n $fg_cpus ]] && fg_cores=4

have() {  # NAME...: every binary or tool present?
  local n
  for n in "$@"; do
    case " ${missing[*]} " in *" $n "*) return 1 ;; esac
  done
  return 0
}

# part NAME CAP_S NEEDS CMD...: runs CMD under a timeout (its cap, within the budget), logs to
# logs/NAME.log, records one row in parts.tsv: name, rc, seconds, timeout, state.
part() {
  local name=$1 cap=$2 needs=$3; shift 3
  local log=$out/logs/$name.log left t start rc
  left=$((deadline - SECONDS))
  t=$((cap < left ? cap : left))
  # shellcheck disable=SC2086  # NEEDS is a word list
  if ! have $needs; then
    printf '%s\t\t0\t0\tnot run: missing %s\n' "$name" "$needs" >> "$out/parts.tsv"
    say "$name: not run (missing one of: $needs)"
    return 1
  fi
  if ((t < 5)); then
    printf '%s\t\t0\t0\tnot run: budget spent\n' "$name" >> "$out/parts.tsv"
    say "$name: not run (the ${budget} s budget is spent)"
    return 1
  fi
  start=$SECONDS
  local shown="$*"
  ((${#shown} > 400)) && shown="${shown:0:400} ..."
  say "$name (timeout ${t} s): $shown"
  { echo "# $shown"; echo "# timeout ${t} s"; } > "$log"
  pin "$fg_cpus" env SEDD_CORES="$fg_cores" timeout -k 10 "$t" "$@" >> "$log" 2>&1 < /dev/null
  rc=$?
  local state="done"
  ((rc == 124 || rc == 137)) && state="timed out"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$t" "$state" >> "$out/parts.tsv"
  say "$name: exit $rc ($state) in $((SECONDS - start)) s"
  return "$rc"
}

# --- the whole CTest suite, GPU tests excluded, in the background -----------------------------------
gpu_filter='*Gpu*:*Nccl*:*Cuda*'
suite_entry() {  # NAME CAP CMD...: one CTest-equivalent entry, logs/suite_NAME.log
  local name=$1 cap=$2 left t start rc state="done"; shift 2
  local log=$out/logs/suite_$name.log
  left=$((deadline - SECONDS))
  t=$((cap < left ? cap : left))
  if ((t < 5)); then
    printf 'suite_%s\t\t0\t0\tnot run: budget spent\n' "$name" >> "$out/parts.tsv"
    return
  fi
  start=$SECONDS
  echo "# $*" > "$log"
  pin "$bg_cpus" env SEDD_CORES=2 timeout -k 10 "$t" "$@" >> "$log" 2>&1 < /dev/null
  rc=$?
  ((rc == 124 || rc == 137)) && state="timed out"
  ((rc == 77)) && state=skipped
  printf 'suite_%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$t" "$state" >> "$out/parts.tsv"
}
run_suite_background() {
  local jobs=$1 line name filter cap neg n=0
  # sedd_suite(NAME "FILTER" [TIMEOUT S]) lines of tests/CMakeLists.txt, the long ones first
  local entries=()
  # (rank cap name filter: the entries with a TIMEOUT of their own are the long ones; CTest's
  # default timeout is 1500 s)
  while IFS= read -r line; do entries+=("$line"); done < <(
    sed -nE 's/^[[:space:]]*sedd_suite\(([A-Za-z0-9_]+)[[:space:]]+"([^"]*)"(.*TIMEOUT[[:space:]]+([0-9]+))?.*/\1 \2 T\4/p' \
      "$repo/tests/CMakeLists.txt" |
      awk '{ t = substr($3, 2); if (t == "") print 0, 1500, $1, $2; else print 1, t, $1, $2 }' | sort -s -rn -k1,1)
  for line in "${entries[@]}"; do
    read -r _ cap name filter <<< "$line"
    # the GPU tests ran in the foreground: leave them out here
    if [[ $filter == *:-* || $filter == -* ]]; then neg=":$gpu_filter"; else neg=":-$gpu_filter"; fi
    suite_entry "$name" "$cap" "$bin/sedd_tests" "--gtest_filter=$filter$neg" &
    ((++n >= jobs)) && { wait -n; n=$((n - 1)); }
  done
  # the SLURM suites (each skips with exit 77 where SLURM cannot start), one at a time as in CTest
  wait
  local s
  for s in slurm_requeue slurm_multinode; do
    [[ -f $repo/tests/slurm/${s}_test.sh ]] && suite_entry "$s" 900 bash "$repo/tests/slurm/${s}_test.sh" "$bin" "$repo"
  done
}
if ((run_suite)) && have sedd_tests mpirun; then
  jobs=${SEDD_CHECK_SUITE_JOBS:-}
  if [[ -z $jobs ]]; then
    if [[ -n $bg_cpus ]]; then jobs=$(( (ncpu - 4) / 2 )); else jobs=1; fi
    ((jobs > 8)) && jobs=8
    ((jobs < 1)) && jobs=1
  fi
  say "suite: the CTest entries without their GPU tests, $jobs at a time in the background${bg_cpus:+ on cores $bg_cpus}"
  run_suite_background "$jobs" > "$out/logs/suite_runner.log" 2>&1 &
  bg_pid=$!
fi

# --- info --------------------------------------------------------------------------------------
part nvidia_smi 30 "" "$smi" --query-gpu=index,name,memory.total,memory.used,driver_version,compute_cap,pci.bus_id,power.limit,clocks.max.sm --format=csv ||
  part nvidia_smi_basic 30 "" "$smi" --query-gpu=index,name,memory.total,driver_version --format=csv
part nvidia_smi_header 30 "" "$smi"
if [[ -n $torch_py ]]; then
  part torch_versions 90 "" "$torch_py" -c 'import json, torch
v = torch.cuda.nccl.version() if torch.cuda.is_available() else None
v = ".".join(map(str, v)) if isinstance(v, tuple) else v
print("TORCH_VERSIONS " + json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
      "cudnn": torch.backends.cudnn.version(), "nccl": v, "cuda_available": torch.cuda.is_available(),
      "device_count": torch.cuda.device_count(),
      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))'
fi
# the libtorch the binaries load, for the versions without python
if [[ -x $bin/sedd-train ]]; then
  { ldd "$bin/sedd-train" 2>&1; } > "$out/logs/ldd_sedd_train.log"
  lt=$(awk '/libtorch_cpu.so/ {print $3; exit}' "$out/logs/ldd_sedd_train.log")
  [[ -n $lt && -f $(dirname "$lt")/../version.py ]] && cp "$(dirname "$lt")/../version.py" "$out/logs/torch_version_py.log"
fi

# --- every GPU test ----------------------------------------------------------------------------
for t in "$bin"/*_tests; do
  [[ -x $t ]] || continue
  b=$(basename "$t")
  [[ $b == *mpi* ]] && continue
  part "gpu_tests_$b" 200 "$b" "$t" "--gtest_filter=$gpu_filter:Libraries*:-TrainGpu.*"
done
for t in "$bin"/*mpi*_tests; do
  [[ -x $t ]] || continue
  b=$(basename "$t")
  part "gpu_tests_${b}_np1" 120 "$b mpirun" env NCCL_DEBUG=VERSION "${mpi[@]}" -np 1 "$t" "--gtest_filter=$gpu_filter"
done
# the CTest entries mpi_collectives_np2/np3 (whole binary; NCCL tests skip when ranks > GPUs)
for np in 2 3; do
  part "suite_mpi_collectives_np$np" 120 "sedd_mpi_tests mpirun" "${mpi[@]}" -np "$np" "$bin/sedd_mpi_tests"
done
part life_cycle 200 "sedd_tests mpirun sedd-train sedd-sample sedd-eval" "$bin/sedd_tests" '--gtest_filter=TrainGpu.*'

# --- training throughput -----------------------------------------------------------------------
mkdir -p "$out/bench"
bench_steps=${SEDD_CHECK_BENCH_STEPS:-20}
train_bench() {  # LABEL BATCH EXTRA...
  local label=$1 batch=$2; shift 2
  part "train_$label" 120 "sedd-bench-train mpirun" "${mpi[@]}" -np 1 "$bin/sedd-bench-train" \
    --config "$repo/configs/sedd-small.ini" --run.device cuda --train.precision bf16 \
    --train.batch_size "$batch" --train.micro_batch_size "$batch" --bench.steps "$bench_steps" --bench.warmup 3 \
    --bench.json "$out/bench/train_$label.json" "$@"
}
train_bench b32 32
train_bench b64 64
train_bench b32_no_fused_kernels 32 --train.fused_kernels false
train_bench b32_no_fused_loss 32 --train.fused_loss false

# --- sampling ----------------------------------------------------------------------------------
for steps in 128 1024; do
  part "sample_$steps" "$((steps == 128 ? 90 : 180))" "sedd-bench-sample mpirun" "${mpi[@]}" -np 1 \
    "$bin/sedd-bench-sample" --device cuda --model small --samples 16 --length 1024 --steps "$steps" \
    --json "$out/bench/sample_$steps.json"
done

# --- compute-sanitizer -------------------------------------------------------------------------
if [[ -n $sanitizer ]]; then
  # no caching allocator: memcheck sees every allocation's real bounds
  part memcheck 180 sedd_tests env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 99 \
    "$bin/sedd_tests" "--gtest_filter=${SEDD_CHECK_MEMCHECK_FILTER:-FusedOpsGpu*}"
  part racecheck 150 sedd_tests "$sanitizer" --tool racecheck --error-exitcode 99 \
    "$bin/sedd_tests" "--gtest_filter=${SEDD_CHECK_RACECHECK_FILTER:-FusedOpsGpu.LayerNorm*}"
else
  printf 'memcheck\t\t0\t0\tnot run: no compute-sanitizer\nracecheck\t\t0\t0\tnot run: no compute-sanitizer\n' >> "$out/parts.tsv"
  say "sanitizer: no compute-sanitizer on PATH or beside SEDD_BIN: memcheck/racecheck not run"
fi

# --- evaluation throughput: data from this tree's text, a short sedd-small run, sedd-eval x K -----
mapfile -t texts < <(find "$repo/src" "$repo/tools" "$repo/tests" "$repo/docs" -type f \
                      \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.md' \) 2>/dev/null | sort)
[[ -f $repo/README.md ]] && texts+=("$repo/README.md")
if part eval_prepare 60 "sedd-prepare mpirun" "${mpi[@]}" -np 1 "$bin/sedd-prepare" --input "${texts[@]}" \
     --tokenizer byte --out "$work/data" --shard-tokens 1000000 &&
   part eval_train 150 "sedd-train mpirun" "${mpi[@]}" -np 1 "$bin/sedd-train" --config "$repo/configs/sedd-small.ini" \
     --data.train "$work/data/*.h5" --data.valid "$work/data/*.h5" --run.dir "$work/run" --run.device cuda \
     --train.precision bf16 --train.steps 20 --train.batch_size 16 --train.micro_batch_size 16 --train.warmup 0 \
     --train.log_every 5 --train.eval_every 0 --train.ckpt_every 0; then
  for k in 2 16; do   # antithetic draws (sedd-eval's default): K even
    part "eval_k$k" 90 "sedd-eval mpirun" "${mpi[@]}" -np 1 "$bin/sedd-eval" --checkpoint "$work/run" --device cuda \
      --data "code=$work/data/*.h5" --mc-samples "$k" --batch-size 16 --max-sequences 64 --json "$out/bench/eval_k$k.json"
  done
  cp "$work/run/metrics.jsonl" "$out/bench/eval_train_metrics.jsonl" 2>/dev/null
else
  printf 'eval_k2\t\t0\t0\tnot run: no checkpoint\neval_k16\t\t0\t0\tnot run: no checkpoint\n' >> "$out/parts.tsv"
fi

# --- wait for the background suite, then the report ----------------------------------------------
if [[ -n $bg_pid ]]; then
  say "waiting for the background suite (at most $((deadline - SECONDS > 0 ? deadline - SECONDS : 0)) s)"
  wait "$bg_pid"
  bg_pid=""
fi
{ nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>&1 || true; } > "$out/logs/nvidia_smi_after.log"
elapsed=$((SECONDS - t0))

if [[ -z $report_py ]]; then
  write_deps_only_json "a GPU is present, but without python3 the report could not be assembled: see logs/"
  say "no python3: the logs are in $out/logs"
  exit 1
fi
"$report_py" - "$out" "$repo" "$bin" "$elapsed" "$budget" "$(json_str "${missing[*]}")" <<'PY'
import datetime, json, os, re, socket, sys

out, repo, binp, elapsed, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
missing = json.loads(sys.argv[6]).split()
logs = os.path.join(out, "logs")

def read(path):
    try:
        with open(path, errors="replace") as f:
            return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f.read())  # gtest colours under mpirun's pty
    except OSError:
        return ""

def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

parts = {}
for line in read(os.path.join(out, "parts.tsv")).splitlines():
    f = line.split("\t")
    if len(f) < 5:
        continue
    parts[f[0]] = {"rc": int(f[1]) if f[1] else None, "seconds": int(f[2] or 0), "timeout_s": int(f[3] or 0),
                   "state": f[4], "log": os.path.join("logs", f[0] + ".log")}

def gtest(text):
    """passed / failed / skipped (with reasons) / unfinished test names from a gtest log."""
    res, order, cur, buf = {}, [], None, []
    for line in text.splitlines():
        m = re.match(r"\[ RUN      \] (\S+)", line)
        if m:
            cur, buf = m.group(1), []
            if cur not in res:
                order.append(cur)
            res.setdefault(cur, ("unfinished", ""))
            continue
        m = re.match(r"\[\s+(OK|FAILED|SKIPPED)\s+\] (\S+)(?: \(\d+ ms\))?", line)
        if m and m.group(2) in res and res[m.group(2)][0] == "unfinished":
            kind = {"OK": "passed", "FAILED": "failed", "SKIPPED": "skipped"}[m.group(1)]
            reason = ""
            if kind == "skipped":
                lines = [l.strip() for l in buf if l.strip()]
                if lines and lines[0].endswith("Skipped"):
                    lines = lines[1:]
                reason = " ".join(lines)[:300]
            res[m.group(2)] = (kind, reason)
            cur = None
            continue
        if cur:
            buf.append(line)
    r = {"passed": [], "failed": [], "skipped": [], "unfinished": []}
    for name in order:
        kind, reason = res[name]
        r[kind].append({"name": name, "reason": reason} if kind == "skipped" else name)
    return r

def test_part(name):
    p = dict(parts.get(name, {"rc": None, "state": "not run", "seconds": 0, "timeout_s": 0}))
    text = read(os.path.join(logs, name + ".log"))
    p["command"] = text.splitlines()[0][2:] if text.startswith("# ") else ""
    p.update(gtest(text))
    if name.startswith("suite_slurm") and p["rc"] == 77:
        m = re.search(r"SKIPPED: (.*)", text)
        p["skipped"] = [{"name": name[6:], "reason": m.group(1) if m else ""}]
    ok = p["rc"] in (0, 77) and not p["failed"] and not p["unfinished"]
    p["ok"] = ok if p["rc"] is not None else False
    return p

problems = []

# --- GPU and versions
gpu = None
smi = read(os.path.join(logs, "nvidia_smi.log" if parts.get("nvidia_smi", {}).get("rc") == 0 else "nvidia_smi_basic.log"))
rows = [l for l in smi.splitlines() if l and not l.startswith("#")]
if len(rows) >= 2:
    head = [h.strip() for h in rows[0].split(",")]
    gpus = [dict(zip(head, [v.strip() for v in r.split(",")])) for r in rows[1:] if "," in r]
    if gpus:
        g = gpus[0]
        gpu = {"name": g.get("name"), "memory_total": g.get("memory.total [MiB]"),
               "driver": g.get("driver_version"), "compute_cap": g.get("compute_cap"),
               "count": len(gpus), "all": gpus}
header = read(os.path.join(logs, "nvidia_smi_header.log"))
m = re.search(r"CUDA Version:\s*([\d.]+)", header)
if gpu is not None:
    gpu["cuda_driver_version"] = m.group(1) if m else None
if gpu is None:
    gpu = {"name": None, "error": "nvidia-smi gave no GPU rows (see logs/nvidia_smi*.log)"}
    problems.append("nvidia-smi query failed")

versions = {}
m = re.search(r"^TORCH_VERSIONS (.*)$", read(os.path.join(logs, "torch_versions.log")), re.M)
if m:
    versions = json.loads(m.group(1))
    versions["source"] = "python: " + (read(os.path.join(logs, "torch_versions.log")).splitlines() or ["# ?"])[0][2:40]
vp = read(os.path.join(logs, "torch_version_py.log"))
if vp:
    for key, field in (("libtorch", "__version__"), ("libtorch_cuda", "cuda")):
        m = re.search(r"^%s\s*(?::[^=]*)?=\s*'([^']*)'" % field, vp, re.M)
        if m:
            versions[key] = m.group(1)
m = re.search(r"NCCL version (\S+)", "".join(read(os.path.join(logs, f)) for f in sorted(os.listdir(logs))
                                              if f.startswith("gpu_tests_") and "np1" in f))
versions["nccl_loaded_by_binaries"] = m.group(1) if m else None
if versions.get("libtorch") and versions.get("torch") and versions["libtorch"] != versions["torch"]:
    problems.append("the python torch (%s) is not the libtorch the binaries load (%s)" % (versions["torch"], versions["libtorch"]))

# --- GPU tests and the suite
gpu_tests = {n: test_part(n) for n in sorted(parts) if n.startswith("gpu_tests_")}
life = test_part("life_cycle")
text = read(os.path.join(logs, "life_cycle.log"))
m = re.search(r"GPU bf16 loss ([-\d.e+]+) -> ([-\d.e+]+)", text)
if m:
    life["loss_first5"], life["loss_last5"] = float(m.group(1)), float(m.group(2))
m = re.search(r"GPU resume: worst per-step loss difference ([-\d.e+]+)", text)
if m:
    life["resume_worst_relative_loss_difference"] = float(m.group(1))
gpu_tests["life_cycle"] = life

suite = {n[6:]: test_part(n) for n in sorted(parts) if n.startswith("suite_")}
cm = read(os.path.join(repo, "tests", "CMakeLists.txt"))
declared = re.findall(r"add_test\(NAME\s+(\S+)", cm)
declared += re.findall(r"^\s*sedd_suite\((\w+)", cm, re.M)
declared += ["mpi_collectives_np%d" % n for n in (2, 3) if "mpi_collectives_np${np}" in cm]
not_run = []
for d in sorted(set(declared)):
    if "${" in d or d in suite:
        continue
    if d == "nccl_collectives_np1" and any("np1" in n for n in gpu_tests):
        suite[d] = {"ok": True, "rc": None, "state": "covered by gpu_tests (mpirun -np 1)", "passed": [],
                    "failed": [], "skipped": [], "unfinished": []}
    elif d == "gpu_check_script":
        suite[d] = {"ok": True, "rc": 77, "state": "skipped: it tests this script's no-GPU mode", "passed": [],
                    "failed": [], "skipped": [{"name": d, "reason": "a GPU is present"}], "unfinished": []}
    else:
        not_run.append(d)

def totals(group):
    t = {"passed": 0, "failed": 0, "skipped": 0, "unfinished": 0, "parts_not_ok": []}
    for name, p in group.items():
        for k in ("passed", "failed", "skipped", "unfinished"):
            t[k] += len(p.get(k, []))
        if not p.get("ok"):
            t["parts_not_ok"].append("%s (%s%s)" % (name, p.get("state"), ", exit %s" % p["rc"] if p.get("rc") is not None else ""))
    return t

gt, st = totals(gpu_tests), totals(suite)
for label, group, t in (("GPU test", gpu_tests, gt), ("suite", suite, st)):
    for name, p in group.items():
        for f in p.get("failed", []):
            problems.append("%s failed: %s" % (label, f))
        for f in p.get("unfinished", []):
            problems.append("%s did not finish (crash or timeout): %s" % (label, f))
    unrun = [x.split(" (")[0] for x in t["parts_not_ok"] if "budget spent" in x]
    if unrun:
        problems.append("%s parts not run, the budget was spent: %s" % (label, ", ".join(unrun)))
    for x in t["parts_not_ok"]:
        if "budget spent" not in x:
            problems.append("%s part not ok: %s" % (label, x))
suite_ran = os.path.exists(os.path.join(logs, "suite_runner.log"))
if not_run and suite_ran:
    problems.append("CTest entries not run: " + ", ".join(not_run))
# a GPU test that skips on a GPU node may be fine (a multi-rank test under -np 1) or not: say so
warnings = ["GPU test skipped: %s (%s)" % (s["name"], s["reason"]) for p in gpu_tests.values() for s in p.get("skipped", [])]

# --- sanitizer
sanitizer = {}
for tool in ("memcheck", "racecheck"):
    p = parts.get(tool, {"state": "not run"})
    text = read(os.path.join(logs, tool + ".log"))
    s = {"state": p.get("state"), "rc": p.get("rc"), "seconds": p.get("seconds")}
    s.update(gtest(text))
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    s["errors"] = int(m.group(1)) if m else None
    m = re.search(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    if m:
        s["hazards"], s["errors"], s["warnings"] = int(m.group(1)), int(m.group(2)), int(m.group(3))
    sanitizer[tool] = s
    if p.get("state", "").startswith("not run"):
        if "compute-sanitizer" not in p.get("state", ""):
            problems.append("%s: %s" % (tool, p.get("state")))
    elif s["errors"] is None or s["errors"] > 0 or p.get("rc") != 0 or s["failed"] or s["unfinished"]:
        problems.append("%s: %s errors, exit %s (%s)" % (tool, s["errors"], p.get("rc"), p.get("state")))

# --- benchmarks
def bench(name, path):
    p = parts.get(name, {"state": "not run", "rc": None, "seconds": 0})
    j = load_json(os.path.join(out, "bench", path))
    r = {"state": p.get("state"), "rc": p.get("rc"), "wall_s": p.get("seconds")}
    if j is None and p.get("state") != "not run":
        problems.append("%s: no figures (%s, exit %s; see logs/%s.log)" % (name, p.get("state"), p.get("rc"), name))
    elif j is None:
        problems.append("%s: not run" % name)
    return r, j

training = {}
for label in ("b32", "b64", "b32_no_fused_kernels", "b32_no_fused_loss"):
    r, j = bench("train_" + label, "train_%s.json" % label)
    if isinstance(j, list) and j:
        r.update(j[0])
    training[label] = r
sampling = {}
for steps in (128, 1024):
    r, j = bench("sample_%d" % steps, "sample_%d.json" % steps)
    if j:
        r.update({k: v for k, v in j.items() if k != "results"})
        if j.get("results"):
            r.update(j["results"][0])
            if not j["results"][0].get("identical", True):
                problems.append("sampling %d steps: cached and plain samples differ" % steps)
    sampling[str(steps)] = r
evaluation = {"data": "this tree's sources and docs, byte tokenizer (vocabulary 257), 64 sequences of 1024",
              "checkpoint": "sedd-small shape (configs/sedd-small.ini), 20 steps of sedd-train on that data"}
for k in (2, 16):
    r, j = bench("eval_k%d" % k, "eval_k%d.json" % k)
    if j:
        for key in ("tokens", "sequences", "seconds", "nats_per_token", "tokens_x_draws_per_s", "mc_samples", "precision", "device"):
            r[key] = j.get(key)
        if j.get("seconds"):
            r["tokens_per_s"] = j["tokens"] / j["seconds"]
    evaluation["k%d" % k] = r
for n in ("eval_prepare", "eval_train"):
    p = parts.get(n)
    if p and p.get("rc") != 0:
        problems.append("%s: exit %s (%s)" % (n, p.get("rc"), p.get("state")))

# --- targets (figures to reach; reported, not part of the exit code)
def fig(d, k):
    v = d.get(k)
    return v if isinstance(v, (int, float)) else None
b32 = training["b32"]
targets = []
def target(what, value, ok_if, goal):
    targets.append({"what": what, "value": value, "goal": goal, "met": None if value is None else ok_if(value)})
target("train b32 tokens/s", fig(b32, "tokens_per_s"), lambda v: v >= 400e3, ">= 400000")
target("train b32 MFU", fig(b32, "mfu"), lambda v: v >= 0.35, ">= 0.35")
target("train b32 peak memory GB", fig(b32, "peak_memory_gb"), lambda v: v <= 24, "<= 24")
target("sample 16x1024, 128 steps, cached s", fig(sampling["128"], "cached_seconds"), lambda v: v <= 4, "<= 4")
target("sample 16x1024, 1024 steps, cached s", fig(sampling["1024"], "cached_seconds"), lambda v: v <= 16, "<= 16")

report = {
    "version": 1,
    "time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "host": socket.gethostname(), "repo": repo, "sedd_bin": binp,
    "elapsed_s": elapsed, "budget_s": budget,
    "gpu": gpu, "versions": versions,
    "dependencies": [dict(zip(("name", "kind", "required", "present", "path", "note"), l.split("\x1f")))
                     for l in read(os.path.join(out, "deps.tsv")).split("\n") if l],
    "missing": missing,
    "gpu_tests": {"runs": gpu_tests, "totals": gt},
    "suite": {"entries": suite, "totals": st, "not_run": not_run, "background_suite_ran": suite_ran,
              "note": "GPU tests are left out here: they ran under gpu_tests"},
    "sanitizer": sanitizer, "training": training, "sampling": sampling, "eval": evaluation,
    "targets": targets, "problems": problems, "warnings": warnings, "ok": not problems,
}
for d in report["dependencies"]:
    d["required"], d["present"] = d["required"] == "1", d["present"] == "1"
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")

# --- the printed report
def num(v, fmt="%.0f"):
    return fmt % v if isinstance(v, (int, float)) else "-"
P = print
P("")
P("=" * 100)
P("gpu-check report — %s, %s, %d s of %d" % (report["host"], report["time"], elapsed, budget))
P("=" * 100)
if gpu.get("name"):
    P("GPU        %s, %s, driver %s, CUDA (driver) %s, compute capability %s, %d visible"
      % (gpu["name"], gpu.get("memory_total"), gpu.get("driver"), gpu.get("cuda_driver_version"),
         gpu.get("compute_cap"), gpu.get("count", 0)))
P("versions   torch %s, CUDA %s, cuDNN %s, NCCL %s (python); libtorch of the binaries %s (CUDA %s); NCCL loaded by the binaries %s"
  % (versions.get("torch"), versions.get("cuda"), versions.get("cudnn"), versions.get("nccl"),
     versions.get("libtorch"), versions.get("libtorch_cuda"), versions.get("nccl_loaded_by_binaries")))
if missing:
    P("MISSING    " + " ".join(missing))

def show_group(title, group, t):
    P("")
    P("%s: %d passed, %d failed, %d skipped, %d unfinished" % (title, t["passed"], t["failed"], t["skipped"], t["unfinished"]))
    for name, p in group.items():
        P("  %-40s %-10s %4ss  %3d passed %2d failed %2d skipped%s" % (
            name, "ok" if p.get("ok") else "NOT OK", p.get("seconds", "-"), len(p.get("passed", [])),
            len(p.get("failed", [])), len(p.get("skipped", [])),
            "" if p.get("state") in ("done", None) else "  [%s]" % p.get("state")))
        for f in p.get("failed", []):
            P("      FAILED     " + f)
        for f in p.get("unfinished", []):
            P("      UNFINISHED " + f)
        for s in p.get("skipped", []):
            P("      skipped    %s: %s" % (s["name"], s["reason"]))
show_group("GPU tests", gpu_tests, gt)
if "loss_first5" in life:
    P("  life cycle: bf16 loss %.3f -> %.3f; resume: worst relative per-step loss difference %s"
      % (life["loss_first5"], life["loss_last5"], life.get("resume_worst_relative_loss_difference")))
show_group("suite (CTest entries; GPU tests counted above)", suite, st)
if not_run:
    P("  not run%s: %s" % ("" if suite_ran else " (--no-suite, or no sedd_tests/mpirun)", ", ".join(not_run)))

P("")
P("sanitizer")
for tool, s in sanitizer.items():
    extra = " (%s hazards, %s warnings)" % (s.get("hazards"), s.get("warnings")) if tool == "racecheck" and "hazards" in s else ""
    P("  %-10s %s: %s errors%s, %d tests passed, %d failed, %ss" % (
        tool, s["state"], s["errors"], extra, len(s.get("passed", [])), len(s.get("failed", [])), s.get("seconds")))

P("")
P("training   sedd-bench-train, configs/sedd-small.ini, bf16, cuda (batch = micro batch)")
P("  %-22s %12s %7s %9s %8s %8s %8s %11s" % ("run", "tokens/s", "MFU", "peak GB", "data", "fwd+bwd", "opt+comm", "collectives"))
for label, r in training.items():
    P("  %-22s %12s %7s %9s %8s %8s %8s %11s%s" % (
        label, num(r.get("tokens_per_s")), num(100 * r["mfu"], "%.1f%%") if "mfu" in r else "-",
        num(r.get("peak_memory_gb"), "%.2f"),
        num(100 * r["split_data"], "%.1f%%") if "split_data" in r else "-",
        num(100 * r["split_forward_backward"], "%.1f%%") if "split_forward_backward" in r else "-",
        num(100 * r["split_optimizer_and_communication"], "%.1f%%") if "split_optimizer_and_communication" in r else "-",
        num(100 * r["collective_host_time_share"], "%.1f%%") if "collective_host_time_share" in r else "-",
        "" if r.get("state") == "done" else "  [%s, exit %s]" % (r.get("state"), r.get("rc"))))
P("")
P("sampling   sedd-bench-sample --model small, 16 x 1024 tokens, analytic")
P("  %6s %10s %10s %13s %10s %9s %9s" % ("steps", "plain s", "cached s", "cached tok/s", "forwards", "speedup", "identical"))
for steps, r in sampling.items():
    P("  %6s %10s %10s %13s %10s %9s %9s%s" % (
        steps, num(r.get("plain_seconds"), "%.2f"), num(r.get("cached_seconds"), "%.2f"),
        num(r.get("cached_tokens_per_s")), "%s/%s" % (r.get("cached_forwards", "-"), r.get("plain_forwards", "-")),
        num(r["plain_seconds"] / r["cached_seconds"], "%.2fx") if r.get("cached_seconds") else "-",
        r.get("identical", "-"), "" if r.get("state") == "done" else "  [%s, exit %s]" % (r.get("state"), r.get("rc"))))
P("")
P("eval       sedd-eval on a 20-step sedd-small checkpoint, %s" % evaluation["data"])
for k in (2, 16):
    r = evaluation["k%d" % k]
    P("  K = %d: %s tokens in %s s: %s tokens/s, %s tokens x K / s, %s nats/token%s" % (
        k, r.get("tokens", "-"), num(r.get("seconds"), "%.2f"), num(r.get("tokens_per_s")),
        num(r.get("tokens_x_draws_per_s")), num(r.get("nats_per_token"), "%.3f"),
        "" if r.get("state") == "done" else "  [%s, exit %s]" % (r.get("state"), r.get("rc"))))
P("")
P("targets")
for t in targets:
    P("  %-40s %14s  goal %-10s %s" % (t["what"], num(t["value"], "%.3f") if isinstance(t["value"], float) and t["value"] < 100 else num(t["value"]),
                                      t["goal"], {True: "met", False: "MISSED", None: "-"}[t["met"]]))
P("")
for w in warnings:
    P("warning: " + w)
if problems:
    P("PROBLEMS (%d)" % len(problems))
    for p in problems:
        P("  - " + p)
else:
    P("no problems: every GPU test passed, every part finished, the sanitizers found nothing")
P("report: %s   logs: %s" % (os.path.join(out, "gpu-check.json"), logs))
sys.exit(0 if not problems else 1)
PY
