#!/usr/bin/env bash
# Exercises launch/slurm/train-multi-node.sbatch (srun --mpi=pmix --kill-on-bad-exit=1) on a real
# two-node SLURM: two slurmd daemons ("nodeA", "nodeB") on this host, one rank on each.
#  1. The job trains across both nodes; SLURM's USR1 (scancel --batch --signal=USR1) leads to a
#     checkpoint, exit 3 and/or the REQUEUE marker, a requeue, a resume and the end of training.
#  2. kill -9 of one rank: srun ends the whole step within seconds, no rank survives, the job is
#     not requeued (no marker, exit code not 3) and checkpoints/latest names a complete checkpoint.
# Exit 0: passed; 1: failed; 77: SLURM cannot run here (CTest reports it as skipped, with why).
#   slurm_multinode_test.sh BIN_DIR SOURCE_DIR
set -uo pipefail
bin=${1:?bin dir}; src=${2:?source dir}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
skip() { echo "SKIPPED: $*"; exit 77; }
fail() {
  echo "FAILED: $*"
  [[ -n ${work:-} ]] && { echo "--- job logs"; tail -n 30 "$work"/slurm-*.out 2>/dev/null; slurm_cluster_logs; }
  exit 1
}
source "$here/slurm_cluster.sh"

work=$(mktemp -d /tmp/sedd-slurm-XXXXXX)
trap slurm_cluster_stop EXIT
t0=$SECONDS
slurm_cluster_start "$work" nodeA nodeB
srun --mpi=list 2>&1 | grep -qw pmix || skip "this SLURM has no pmix MPI plugin (srun --mpi=list: $(srun --mpi=list 2>&1 | tr '\n' ' '))"

SEDD_BUILD="$bin/.." bash "$src/datasets/make_demo.sh" "$work/demo" >/dev/null 2>&1 || fail "demo data"
sed '/--gpus-per-node/d' "$src/launch/slurm/train-multi-node.sbatch" > "$work/job.sbatch"
cd "$work"

# submit RUN_DIR STEPS [overrides...]: the template on two nodes, one rank (one CPU) on each.
submit() {
  local run=$1 steps=$2; shift 2
  OMPI_MCA_btl_vader_single_copy_mechanism=none SEDD_BIN="$bin" \
    sbatch --parsable --export=ALL --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 --time=20 \
    --output="$work/slurm-%j.out" "$work/job.sbatch" "$src/configs/tiny.ini" --run.dir "$run" \
    --data.train "$work/demo/train/*.h5" --data.valid "$work/demo/valid/*.h5" --train.steps "$steps" \
    --train.log_every 5 "$@"
}
metric_lines() { { wc -l < "$1/metrics.jsonl"; } 2>/dev/null || echo 0; }
wait_lines() {  # RUN_DIR N
  for i in $(seq 400); do [[ $(metric_lines "$1") -ge $2 ]] && return 0; sleep 0.5; done
  fail "$1: fewer than $2 metrics lines after 200 s"
}
rank_pids() { pgrep -f "^$bin/sedd-train .*--run.dir $1 " ; }
job_field() { scontrol show job "$1" 2>/dev/null | grep -oE "(^| )$2=[^ ]*" | head -1 | cut -d= -f2-; }

# --- 1. two nodes, USR1 -> checkpoint -> exit 3 / marker -> requeue -> resume -> done ----------
run="$work/run"
jobid=$(submit "$run" 200 --train.ckpt_every 0) || fail "sbatch refused the job"
log="$work/slurm-$jobid.out"
echo "[slurm] submitted job $jobid: 2 nodes x 1 rank"
wait_lines "$run" 10
grep -q "\[train\] 2 ranks x" "$log" || fail "the trainer does not report 2 ranks"
placement=""
for pid in $(rank_pids "$run"); do
  placement+="$(tr '\0' '\n' < "/proc/$pid/environ" | grep -E '^(SLURMD_NODENAME|SLURM_PROCID)=' | sort | cut -d= -f2 | tr '\n' ' ')"$'\n'
done
placement=$(sort <<< "$placement" | sed '/^$/d')
echo "[slurm] ranks (node, rank): $(tr '\n' ';' <<< "$placement")"
[[ $placement == $'nodeA 0 \nnodeB 1 ' ]] || fail "expected rank 0 on nodeA and rank 1 on nodeB, found: $placement"
echo "[slurm] training across nodeA and nodeB ($((SECONDS - t0)) s); USR1 to the batch script"
scancel --batch --signal=USR1 "$jobid" || fail "scancel"
for i in $(seq 240); do grep -q "requeueing job" "$log" && break; sleep 0.5; done
grep -q "requeueing job" "$log" || fail "the job did not requeue itself"
grep -q "REQUEUE: stopped for requeue" "$log" || fail "training did not write the REQUEUE marker"
trigger=$(grep -o "pre-empted after a checkpoint (.*): requeueing" "$log" | head -1)
echo "[slurm] $trigger"
first_ckpt=$(cat "$run/checkpoints/latest")
grep -q "\"stopped_for_requeue\": true" "$run/checkpoints/$first_ckpt/state.json" ||
  fail "$first_ckpt/state.json does not say stopped_for_requeue"
echo "[slurm] pre-empted at $first_ckpt and requeued ($((SECONDS - t0)) s); waiting for the second run"
for i in $(seq 600); do [[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] && break; sleep 0.5; done
[[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] || fail "the requeued job did not finish in 5 minutes"
[[ $(job_field "$jobid" Restarts) == 1 ]] || fail "job $jobid restarted $(job_field "$jobid" Restarts) times, not once"
grep -q "resumed from .*$first_ckpt.*pre-empted at step ${first_ckpt#step_} " "$log" ||
  fail "the requeued run did not resume from $first_ckpt (or did not report the pre-emption)"
[[ $(grep -c "\[train\] 2 ranks x" "$log") -eq 2 ]] || fail "the requeued run does not report 2 ranks"
grep -q "done: 200 steps" "$log" || fail "the requeued run did not finish"
[[ $(cat "$run/checkpoints/latest") == step_200 ]] || fail "latest is not step_200"
[[ ! -e $run/REQUEUE ]] || fail "the resumed run left the REQUEUE marker behind"
steps=$(python3 -c "import json; s=[json.loads(l)['step'] for l in open('$run/metrics.jsonl')]; print(len(s)==len(set(s)) and s==sorted(s))")
[[ $steps == True ]] || fail "metrics.jsonl repeats or misorders steps after the resume"
echo "[slurm] part 1 passed ($((SECONDS - t0)) s): 2 nodes, USR1 -> $first_ckpt -> requeue -> resume -> step_200"

# --- 2. kill -9 of one rank: the step ends quickly, nothing is requeued ------------------------
run2="$work/run2"
jobid2=$(submit "$run2" 100000 --train.ckpt_every 5 --train.keep_ckpts 2) || fail "sbatch refused the second job"
log2="$work/slurm-$jobid2.out"
wait_lines "$run2" 6
[[ -f $run2/checkpoints/latest ]] || fail "no checkpoint before the kill"
pids=($(rank_pids "$run2"))
[[ ${#pids[@]} -eq 2 ]] || fail "expected 2 ranks of job $jobid2, found ${#pids[@]}"
victim=${pids[RANDOM % 2]}
victim_node=$(tr '\0' '\n' < "/proc/$victim/environ" | grep '^SLURMD_NODENAME=' | cut -d= -f2)
killed_at=$SECONDS
kill -9 "$victim"
echo "[slurm] job $jobid2: kill -9 of the rank on $victim_node (pid $victim)"
for i in $(seq 120); do [[ -z $(rank_pids "$run2") ]] && break; sleep 0.25; done
[[ -z $(rank_pids "$run2") ]] || fail "a rank survived 30 s after kill -9 of the other (pids $(rank_pids "$run2" | tr '\n' ' '))"
ranks_gone=$((SECONDS - killed_at))
state=""
for i in $(seq 120); do
  state=$(job_field "$jobid2" JobState)
  [[ $state == @(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) ]] && break
  sleep 0.25
done
exit_code=$(job_field "$jobid2" ExitCode); restarts=$(job_field "$jobid2" Restarts)
echo "[slurm] all ranks gone ${ranks_gone} s after the kill; job $jobid2 $state, exit code $exit_code, restarts $restarts"
((ranks_gone <= 15)) || fail "the step took ${ranks_gone} s to end after kill -9 of one rank"
[[ $state == FAILED ]] || fail "job $jobid2 ended as '$state', not FAILED"
[[ ${exit_code%%:*} != 3 ]] || fail "job $jobid2 exited 3 after a rank was killed"
[[ $restarts == 0 ]] || fail "job $jobid2 was requeued"
[[ ! -e $run2/REQUEUE ]] || fail "a REQUEUE marker was written after kill -9"
! grep -q "requeueing job" "$log2" || fail "the batch script requeued job $jobid2"
latest=$(cat "$run2/checkpoints/latest")
ckpt="$run2/checkpoints/$latest"
[[ -f $ckpt/model.h5 && -f $ckpt/state.json && -f $ckpt/optim/rank_0.h5 && -f $ckpt/optim/rank_1.h5 ]] ||
  fail "checkpoints/latest names $latest, which is incomplete: $(ls -R "$ckpt" 2>&1 | tr '\n' ' ')"
python3 -c "import json,sys; s=json.load(open('$ckpt/state.json')); sys.exit(0 if 'step_%d' % s['step'] == '$latest' else 1)" ||
  fail "$ckpt/state.json is unreadable or names another step"
for f in "$ckpt/model.h5" "$ckpt/optim/rank_0.h5" "$ckpt/optim/rank_1.h5"; do
  h5ls -r "$f" >/dev/null 2>&1 || fail "$f is not a readable HDF5 file"
done
echo "[slurm] PASSED in $((SECONDS - t0)) s: 2-node train/pre-empt/requeue/resume; kill -9 of one rank ended" \
     "the job in ${ranks_gone} s without a requeue; latest = $latest (complete)"
