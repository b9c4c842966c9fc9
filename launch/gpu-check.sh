#!/usr/bin/env bash
# The first command on a new GPU node: proves the GPU road of this build within a short allocation
# and brings back three files.
#
#   bash launch/gpu-check.sh [--out DIR] [--budget SECONDS] [--with-suite] [--deps-only]
#   SEDD_BIN=DIR bash launch/gpu-check.sh        (binaries from a relocatable bundle of the build)
#
# Everything runs in a temporary folder; DIR (default <project>/runs/gpu-check) receives exactly
#   gpu-check.json   every part, test and figure (rewritten after every part)
#   report.txt       the human report (at most 10,000 characters), also printed at the end
#   logs.tar.gz      every log, each cut to its last 200 lines
# also when the script is sent TERM or INT (the files then hold what ran so far). The printed
# report ends with the GPU section and the list of problems, so a tail of the output holds them.
#
# With a GPU, the parts run in this order, each under its own cap (scaled to the budget, default
# 300 s) and within what is left of the budget; a part that would start too late is "not run":
#   info        nvidia-smi (name, memory, driver, compute mode), kernel, runtime (gVisor, Firecracker),
#               torch/CUDA/cuDNN/NCCL versions
#   gpu tests   the CTest entries labelled gpu (bin/sedd-test-entries.tsv), multi-rank ones only when
#               the node has as many GPUs as ranks
#   life cycle  gpu_life_cycle: train -> checkpoint -> SIGUSR1 -> resume -> sample -> eval on CUDA
#   sanitizer   compute-sanitizer memcheck over the real-shape kernel tests, the project's kernels
#               only; racecheck over the LayerNorm kernels
#   training    sedd-bench-train, configs/sedd-small.ini, bf16: batch 32 and 64; batch 32 with the
#               fused kernels off and with the fused loss off (fewer steps)
#   sampling    sedd-bench-sample --model small, 16 x 1024 tokens, 128 and 1024 steps; --model bd3
#               (block diffusion, 8 x 1024 tokens, first hitting, with and without its KV cache)
#   attention   sedd-bench-model --shapes bd3-split, then bd3-mask (block diffusion's two forms)
#   eval        sedd-prepare -> a 20-step sedd-small run -> sedd-eval with K = 2 and 16
#   suite       (--with-suite only) every CPU CTest entry in the background
# Each part runs in a session of its own; when it ends, is cut or the script is stopped, whatever
# it started is killed. Exit 0 when every test passed and no part failed; 1 otherwise.
#
# Without a GPU (no nvidia-smi, nvidia-smi fails or lists none, or CUDA_VISIBLE_DEVICES hides every
# device) it says "no GPU", checks that everything the check needs is here, writes the three files
# and exits 0 when all is present, 1 naming what is missing. --deps-only does only that check.
#
# Environment: SEDD_BIN, SEDD_BUILD, SEDD_PYTHON (a python with torch, for the versions),
# SEDD_CHECK_BENCH_STEPS (timed training steps, default 20), SEDD_CHECK_KERNEL_FILTER (the
# sanitizers' kernel filter, default "kns=sedd"), SEDD_CHECK_MEMCHECK_FILTER /
# SEDD_CHECK_RACECHECK_FILTER (their gtest filters).
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$repo/runs/gpu-check
budget=300
with_suite=0
deps_only=0
while (($#)); do
  case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
    --budget=*) budget=${1#--budget=}; shift ;;
    --with-suite) with_suite=1; shift ;;
    --deps-only) deps_only=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $budget =~ ^[0-9]+$ ]] && ((budget >= 30)) || { echo "gpu-check: --budget takes whole seconds, at least 30" >&2; exit 2; }

t0=$SECONDS
deadline=$((t0 + budget - 8))   # the last seconds are for the report and the archive
say() { printf '[gpu-check] %s\n' "$*"; }

mkdir -p "$out" || { echo "gpu-check: cannot create $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
rm -f "$out/gpu-check.json" "$out/report.txt" "$out/logs.tar.gz"
work=$(mktemp -d "${TMPDIR:-/tmp}/sedd-gpu-check.XXXXXX") || { echo "gpu-check: no temporary folder" >&2; exit 2; }
mkdir -p "$work/logs" "$work/bench"
: > "$work/parts.tsv"

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
smi=$(find_tool nvidia-smi) || smi=""
entries=$bin/sedd-test-entries.tsv

# --- dependency check ---------------------------------------------------------------------------
required_bins=(sedd-train sedd-sample sedd-eval sedd-prepare sedd-bench-train sedd-bench-sample sedd-bench-model sedd_tests
               sedd_mpi_tests)
required_files=(configs/sedd-small.ini tools/gpu_check_report.py)
missing=()
dep() {  # NAME KIND REQUIRED(1|0) PATH-or-empty NOTE: one row of deps.tsv (\x1f-separated: a tab
         # would let `read` merge an empty field with the next one)
  local present=1 note=$5
  [[ -z $4 ]] && present=0
  ((present)) && note=""
  printf '%s\x1f%s\x1f%s\x1f%s\x1f%s\x1f%s\n' "$1" "$2" "$3" "$present" "$4" "$note" >> "$work/deps.tsv"
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
  : > "$work/deps.tsv"
  missing=()
  say "dependency check (SEDD_BIN=$bin, project $repo):"
  local b f p
  for b in "${required_bins[@]}"; do
    p=""; [[ -f $bin/$b && -x $bin/$b ]] && p=$bin/$b
    dep "$b" binary 1 "$p" "not in $bin"
  done
  p=""; [[ -f $entries ]] && p=$entries
  dep sedd-test-entries.tsv file 1 "$p" "not in $bin (written by the build: the CTest entries and their labels)"
  for f in "${required_files[@]}"; do
    p=""; [[ -f $repo/$f ]] && p=$repo/$f
    dep "$f" file 1 "$p" "not in $repo"
  done
  dep mpirun tool 1 "$mpirun_path" "not on PATH (nor $bin/../root/usr/bin)"
  p=$(find_tool timeout) || p=""; dep timeout tool 1 "$p" "coreutils' timeout is not on PATH"
  p=$(find_tool setsid) || p=""; dep setsid tool 1 "$p" "util-linux's setsid is not on PATH"
  dep python3 tool 1 "$report_py" "needed for the report (python3 on PATH or $repo/.venv)"
  dep nvidia-smi tool "$1" "$smi" "needed on a GPU node (the GPU's name, memory, driver)"
  dep compute-sanitizer tool 0 "$sanitizer" "optional: the memcheck/racecheck parts are not run without it"
  p=""
  [[ -n $torch_py ]] && timeout 60 "$torch_py" -c 'import torch' >/dev/null 2>&1 && p=$torch_py
  dep "python+torch" tool 0 "$p" "optional: versions are then read from the torch/version.py of the libtorch the binaries load"
}

# --- the report: gpu-check.json after every part; report.txt and logs.tar.gz at the end -----------
meta() {  # KEY VALUE: one fact for the report program
  printf '%s\t%s\n' "$1" "${2//$'\n'/ }" >> "$work/meta.tsv"
}
write_json() {
  [[ -n $report_py ]] || return 0
  "$report_py" "$repo/tools/gpu_check_report.py" "$work" --out "$out" --elapsed $((SECONDS - t0)) >/dev/null 2>"$work/logs/report_errors.log"
}
pack_logs() {  # each log cut to its last 200 lines
  local cut=$work/cut f
  rm -rf "$cut"; mkdir -p "$cut/logs"
  for f in "$work"/logs/*; do [[ -f $f ]] && tail -n 200 "$f" > "$cut/logs/$(basename "$f")"; done
  cp "$work/parts.tsv" "$work/deps.tsv" "$work/meta.tsv" "$cut/logs/" 2>/dev/null
  tar -C "$cut" -czf "$out/logs.tar.gz.tmp" logs && mv -f "$out/logs.tar.gz.tmp" "$out/logs.tar.gz"
}
finish() {  # write the three files, print the report; returns the report's verdict
  local rc=1
  if [[ -n $report_py ]]; then
    "$report_py" "$repo/tools/gpu_check_report.py" "$work" --out "$out" --elapsed $((SECONDS - t0)) --final
    rc=$?
  else
    { echo "gpu-check: no python3 here, so no report: see logs.tar.gz"; cat "$work/parts.tsv"; } | tee "$out/report.txt"
    printf '{"version": 2, "ok": false, "problems": ["no python3: the report could not be assembled"]}\n' > "$out/gpu-check.json"
  fi
  pack_logs
  say "wrote $out/gpu-check.json, report.txt, logs.tar.gz"
  return "$rc"
}

current=""        # the running part's session (its leader's pid), killed whenever we leave it
current_name=""
bg_pid=""
alive() {  # SID: is anything of the session left?
  kill -0 -- "-$1" 2>/dev/null || { command -v pgrep >/dev/null 2>&1 && pgrep -s "$1" >/dev/null 2>&1; }
}
kill_session() {  # SID: the part and everything it started (its process group and session)
  local sid=$1
  alive "$sid" || return 0
  kill -TERM -- "-$sid" 2>/dev/null
  command -v pkill >/dev/null 2>&1 && pkill -TERM -s "$sid" 2>/dev/null
  sleep 0.5
  alive "$sid" || return 0
  kill -KILL -- "-$sid" 2>/dev/null
  command -v pkill >/dev/null 2>&1 && pkill -KILL -s "$sid" 2>/dev/null
}
cleanup() {
  [[ -n $current ]] && kill_session "$current"
  [[ -n $bg_pid ]] && { kill_session "$bg_pid"; wait "$bg_pid" 2>/dev/null; }
  rm -rf "$work"
}
on_signal() {  # SIGNAL EXIT: stopped from outside: keep what ran, then leave
  trap '' TERM INT
  say "got SIG$1: stopping ${current_name:-between parts} and writing what ran so far"
  if [[ -n $current ]]; then
    kill_session "$current"
    printf '%s\t%s\t%s\t%s\t%s\n' "$current_name" "" "$((SECONDS - part_start))" 0 "stopped by SIG$1" >> "$work/parts.tsv"
    current=""
  fi
  [[ -n $bg_pid ]] && { kill_session "$bg_pid"; bg_pid=""; }
  meta stopped_by "SIG$1"
  finish
  exit "$2"
}
trap cleanup EXIT
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

have() {  # NAME...: every binary or tool present?
  local n
  for n in "$@"; do
    case " ${missing[*]} " in *" $n "*) return 1 ;; esac
  done
  return 0
}

not_run() {  # NAME REASON: a part that did not start, recorded as "not run: REASON"
  printf '%s\t\t0\t0\tnot run: %s\n' "$1" "$2" >> "$work/parts.tsv"
  say "$1: not run ($2)"
  write_json
}

# part NAME CAP NEEDS CMD...: runs CMD in a session of its own under a timeout (CAP seconds at the
# default 300 s budget, scaled to this one, and within what is left), logs to logs/NAME.log, records
# a row in parts.tsv (name, exit, seconds, timeout, state) and rewrites gpu-check.json.
part_start=0
part() {
  local name=$1 cap=$2 needs=$3; shift 3
  local log=$work/logs/$name.log left t rc state
  cap=$((cap * budget / 300)); ((cap < 5)) && cap=5
  left=$((deadline - SECONDS))
  t=$((cap < left ? cap : left))
  # shellcheck disable=SC2086  # NEEDS is a word list
  if ! have $needs; then
    not_run "$name" "missing one of: $needs"
    return 1
  fi
  if ((t < 3)); then
    not_run "$name" "budget spent"
    return 1
  fi
  part_start=$SECONDS
  local shown="$*"
  ((${#shown} > 400)) && shown="${shown:0:400} ..."
  say "$name (at most ${t} s): $shown"
  { echo "# $shown"; echo "# timeout ${t} s"; } > "$log"
  current_name=$name
  setsid timeout -k 3 "$t" "$@" >> "$log" 2>&1 < /dev/null &
  current=$!
  wait "$current"
  rc=$?
  kill_session "$current"   # what the part left running (daemons, children that ignored TERM)
  current=""
  state="done"
  ((rc == 124 || rc == 137)) && state="timed out"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - part_start))" "$t" "$state" >> "$work/parts.tsv"
  say "$name: exit $rc ($state) in $((SECONDS - part_start)) s"
  write_json
  return "$rc"
}

# --- is there a GPU? ----------------------------------------------------------------------------
meta host "$(hostname 2>/dev/null || echo unknown)"
meta repo "$repo"
meta bin "$bin"
meta budget "$budget"
meta kernel "$(uname -r 2>/dev/null)"
no_gpu=""
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
  meta no_gpu_reason "${no_gpu:-not probed (--deps-only)}"
  meta missing "${missing[*]}"
  finish
  if ((${#missing[@]})); then
    say "missing: ${missing[*]}"
    exit 1
  fi
  say "everything the GPU check needs is present"
  exit 0
fi

# ================================ with a GPU =====================================================
gpu_count=$(grep -c '[^[:space:]]' <<< "$smi_list")
say "GPU found: $(head -n 1 <<< "$smi_list" | sed 's/^ *//') ($gpu_count visible) — budget ${budget} s, results in $out"
check_dependencies 1
meta missing "${missing[*]}"
meta gpu_count "$gpu_count"
((${#missing[@]})) && say "missing: ${missing[*]} (the parts that need them are reported as not run)"

export GTEST_COLOR=no OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none \
       OMPI_MCA_rmaps_base_oversubscribe=1 PYTHONUNBUFFERED=1
mpi=("${mpirun_path:-mpirun}" --oversubscribe --bind-to none)

# --- info --------------------------------------------------------------------------------------
part nvidia_smi 20 "" "$smi" --query-gpu=index,name,memory.total,memory.used,driver_version,compute_cap,compute_mode,pci.bus_id,power.limit,clocks.max.sm --format=csv ||
  part nvidia_smi_basic 15 "" "$smi" --query-gpu=index,name,memory.total,driver_version,compute_mode --format=csv
part nvidia_smi_header 15 "" "$smi"
# the runtime under the node: gVisor (compute-sanitizer cannot attach there) or a VM such as Firecracker
part system 10 "" bash -c 'echo "uname: $(uname -a)"; echo "cmdline: $(cat /proc/cmdline 2>/dev/null)";
  echo "version: $(cat /proc/version 2>/dev/null)"; echo "product: $(cat /sys/class/dmi/id/product_name 2>/dev/null)";
  echo "dmesg:"; dmesg 2>&1 | head -n 15'
if [[ -n $torch_py ]]; then
  part torch_versions 60 "" "$torch_py" -c 'import json, torch
v = torch.cuda.nccl.version() if torch.cuda.is_available() else None
v = ".".join(map(str, v)) if isinstance(v, tuple) else v
print("TORCH_VERSIONS " + json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
      "cudnn": torch.backends.cudnn.version(), "nccl": v, "cuda_available": torch.cuda.is_available(),
      "device_count": torch.cuda.device_count(),
      "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))'
fi
if [[ -x $bin/sedd-train ]]; then   # the libtorch the binaries load, for the versions without python
  ldd "$bin/sedd-train" > "$work/logs/ldd_sedd_train.log" 2>&1
  lt=$(awk '/libtorch_cpu.so/ {print $3; exit}' "$work/logs/ldd_sedd_train.log")
  [[ -n $lt && -f $(dirname "$lt")/../version.py ]] && cp "$(dirname "$lt")/../version.py" "$work/logs/torch_version_py.log"
fi

# --- the CTest entries labelled gpu ------------------------------------------------------------
entry_cmd() {  # BINARY RANKS FILTER: sets cmd to the entry's command line, as CTest runs it
  if (($2 == 0)); then cmd=("$bin/$1" "--gtest_filter=$3")
  else cmd=("${mpi[@]}" -np "$2" "$bin/$1" "--gtest_filter=$3"); fi
}
life_cycle=()
if [[ -f $entries ]]; then
  while IFS=$'\t' read -r name labels binary ranks filter; do
    [[ ,$labels, == *,gpu,* ]] || continue
    if [[ $name == gpu_life_cycle ]]; then life_cycle=("$binary" "$ranks" "$filter"); continue; fi
    if ((ranks > gpu_count)); then
      not_run "gpu_$name" "needs $ranks GPUs, this node has $gpu_count"
      continue
    fi
    needs=$binary; ((ranks > 0)) && needs="$binary mpirun"
    entry_cmd "$binary" "$ranks" "$filter"
    part "gpu_$name" "$( ((ranks > 0)) && echo 45 || echo 100)" "$needs" env NCCL_DEBUG=VERSION "${cmd[@]}"
  done < "$entries"
else
  not_run gpu_tests "no $entries"
fi

# --- life cycle --------------------------------------------------------------------------------
if ((${#life_cycle[@]})); then
  entry_cmd "${life_cycle[@]}"
  part life_cycle 60 "${life_cycle[0]} mpirun sedd-train sedd-sample sedd-eval" "${cmd[@]}"
else
  not_run life_cycle "no gpu_life_cycle entry in $entries"
fi

# --- compute-sanitizer: the project's kernels only (its kernel-name filter) ---------------------
if [[ -n $sanitizer ]]; then
  kfilter=${SEDD_CHECK_KERNEL_FILTER:-kns=sedd}
  part memcheck 40 sedd_tests "$sanitizer" --tool memcheck --kernel-name "$kfilter" --error-exitcode 99 \
    "$bin/sedd_tests" "--gtest_filter=${SEDD_CHECK_MEMCHECK_FILTER:-FusedOpsGpu.RealShapes*:FusedOpsGpu.WholeModel*}"
  part racecheck 20 sedd_tests "$sanitizer" --tool racecheck --kernel-name "$kfilter" --error-exitcode 99 \
    "$bin/sedd_tests" "--gtest_filter=${SEDD_CHECK_RACECHECK_FILTER:-FusedOpsGpu.LayerNorm*}"
else
  not_run memcheck "no compute-sanitizer"
  not_run racecheck "no compute-sanitizer"
fi

# --- training throughput -----------------------------------------------------------------------
bench_steps=${SEDD_CHECK_BENCH_STEPS:-20}
train_bench() {  # LABEL BATCH CAP STEPS EXTRA...
  local label=$1 batch=$2 cap=$3 steps=$4; shift 4
  part "train_$label" "$cap" "sedd-bench-train mpirun" "${mpi[@]}" -np 1 "$bin/sedd-bench-train" \
    --config "$repo/configs/sedd-small.ini" --run.device cuda --train.precision bf16 \
    --train.batch_size "$batch" --train.micro_batch_size "$batch" --bench.steps "$steps" --bench.warmup 3 \
    --bench.json "$work/bench/train_$label.json" "$@"
}
train_bench b32 32 35 "$bench_steps"
train_bench b64 64 35 "$bench_steps"
train_bench b32_no_fused_kernels 32 25 10 --train.fused_kernels false
train_bench b32_no_fused_loss 32 25 10 --train.fused_loss false

# --- sampling ----------------------------------------------------------------------------------
part sample_128 35 "sedd-bench-sample mpirun" "${mpi[@]}" -np 1 "$bin/sedd-bench-sample" --device cuda --model small \
  --samples 16 --length 1024 --steps 128 --json "$work/bench/sample_128.json"
part sample_1024 90 "sedd-bench-sample mpirun" "${mpi[@]}" -np 1 "$bin/sedd-bench-sample" --device cuda --model small \
  --samples 16 --length 1024 --steps 1024 --json "$work/bench/sample_1024.json"
part sample_bd3 25 "sedd-bench-sample mpirun" "${mpi[@]}" -np 1 "$bin/sedd-bench-sample" --device cuda --model bd3 \
  --samples 8 --json "$work/bench/sample_bd3.json"
for form in split mask; do  # one process each: its peak memory is its own
  part "attention_bd3_$form" 15 "sedd-bench-model" "$bin/sedd-bench-model" --device cuda --shapes "bd3-$form" \
    --json "$work/bench/attention_bd3_$form.json"
done

# --- evaluation: data from this tree's text, a short sedd-small run, sedd-eval x K ---------------
mapfile -t texts < <(find "$repo/src" "$repo/tools" "$repo/docs" -type f \
                      \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.md' \) 2>/dev/null | sort)
if part eval_prepare 15 "sedd-prepare mpirun" "${mpi[@]}" -np 1 "$bin/sedd-prepare" --input "${texts[@]}" \
     --tokenizer byte --out "$work/data" --shard-tokens 1000000 &&
   part eval_train 40 "sedd-train mpirun" "${mpi[@]}" -np 1 "$bin/sedd-train" --config "$repo/configs/sedd-small.ini" \
     --data.train "$work/data/*.h5" --data.valid "$work/data/*.h5" --run.dir "$work/run" --run.device cuda \
     --train.precision bf16 --train.steps 20 --train.batch_size 16 --train.micro_batch_size 16 --train.warmup 0 \
     --train.log_every 5 --train.eval_every 0 --train.ckpt_every 0; then
  for k in 2 16; do   # antithetic draws (sedd-eval's default): K even
    part "eval_k$k" 20 "sedd-eval mpirun" "${mpi[@]}" -np 1 "$bin/sedd-eval" --checkpoint "$work/run" --device cuda \
      --data "code=$work/data/*.h5" --mc-samples "$k" --batch-size 16 --max-sequences 64 --json "$work/bench/eval_k$k.json"
  done
else
  not_run eval_k2 "no checkpoint"
  not_run eval_k16 "no checkpoint"
fi

# --- the CPU suite (--with-suite): on a GPU node it only adds noise to the figures above ---------
if ((with_suite)) && [[ -f $entries ]] && have sedd_tests mpirun; then
  left=$((deadline - SECONDS))
  if ((left > 30)); then
    grep -v $'\t[^\t]*gpu[^\t]*\t' "$entries" > "$work/suite.tsv"
    # one entry after the other, as CTest would run them; logs/suite_NAME.log and suite_status.log
    suite_script='while IFS=$'"'\\t'"' read -r name _ binary ranks filter; do
        if ((ranks == 0)); then "$1/$binary" "--gtest_filter=$filter" > "$2/suite_$name.log" 2>&1
        else "${@:3}" -np "$ranks" "$1/$binary" "--gtest_filter=$filter" > "$2/suite_$name.log" 2>&1; fi
        echo "$name $?" >> "$2/suite_status.log"
      done < "$0"'
    part suite $((left * 300 / budget)) "sedd_tests mpirun" bash -c "$suite_script" "$work/suite.tsv" "$bin" "$work/logs" "${mpi[@]}"
  else
    not_run suite "budget spent"
  fi
fi

{ "$smi" --query-gpu=memory.used --format=csv,noheader 2>&1 || true; } > "$work/logs/nvidia_smi_after.log"
finish
