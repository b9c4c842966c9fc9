#!/usr/bin/env bash
# Exercises launch/slurm/train-single-node.sbatch on a real one-node SLURM (Debian's slurm-wlm,
# started by slurm_cluster.sh with a private configuration): the job trains, receives SLURM's USR1
# pre-emption signal, checkpoints, exits 3, is requeued by the script and resumes; then mpirun
# itself gets SIGTERM (it reports its own exit code) and the REQUEUE marker has the job requeued
# again; the third run finishes.
# Exit 0: passed; 1: failed; 77: SLURM cannot run here (CTest reports it as skipped, with why).
#   slurm_requeue_test.sh BIN_DIR SOURCE_DIR
set -uo pipefail
bin=${1:?bin dir}; src=${2:?source dir}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
skip() { echo "SKIPPED: $*"; exit 77; }
fail() {
  echo "FAILED: $*"
  [[ -n ${work:-} ]] && { echo "--- job log"; cat "$work"/slurm-*.out 2>/dev/null | tail -40; slurm_cluster_logs; }
  exit 1
}
source "$here/slurm_cluster.sh"

work=$(mktemp -d /tmp/sedd-slurm-XXXXXX)
trap slurm_cluster_stop EXIT
t0=$SECONDS
slurm_cluster_start "$work" nodeA

# Data and the job: the template as shipped, minus its GPU request (this node has none).
SEDD_BUILD="$bin/.." bash "$src/datasets/make_demo.sh" "$work/demo" >/dev/null 2>&1 || fail "demo data"
sed '/--gpus-per-node/d' "$src/launch/slurm/train-single-node.sbatch" > "$work/job.sbatch"
run="$work/run"
cd "$work"
# odls_base_sigkill_timeout: mpirun, sent TERM, gives the ranks that long (default 1 s) to save
# before SIGKILL; a loaded machine may need more.
jobid=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_odls_base_sigkill_timeout=3 SEDD_BIN="$bin" \
  sbatch --parsable --export=ALL --ntasks-per-node=2 --cpus-per-task=1 --time=20 --output="$work/slurm-%j.out" \
  "$work/job.sbatch" "$src/configs/tiny.ini" --run.dir "$run" --data.train "$work/demo/train/*.h5" \
  --data.valid "$work/demo/valid/*.h5" --train.steps 300 --train.ckpt_every 0 --train.log_every 5) ||
  fail "sbatch refused the job"
echo "[slurm] submitted job $jobid"
for i in $(seq 300); do [[ $( { wc -l < "$run/metrics.jsonl"; } 2>/dev/null || echo 0) -ge 10 ]] && break; sleep 0.5; done
[[ -f $run/metrics.jsonl ]] || fail "the job never started training"
echo "[slurm] training ($((SECONDS - t0)) s); sending USR1 to the batch script, as SLURM does before a time limit or pre-emption"
scancel --batch --signal=USR1 "$jobid" || fail "scancel"
for i in $(seq 240); do
  grep -q "requeueing job" "$work"/slurm-*.out 2>/dev/null && break
  sleep 0.5
done
grep -q "requeueing job" "$work"/slurm-*.out || fail "the job did not requeue itself"
grep -q "exit 3" "$work"/slurm-*.out || fail "training did not stop with exit code 3"
grep -q "pre-empted after a checkpoint (training exited 3)" "$work"/slurm-*.out ||
  fail "the requeue line does not say that training exited 3"
first_ckpt=$(cat "$run/checkpoints/latest")
echo "[slurm] pre-empted at $first_ckpt and requeued ($((SECONDS - t0)) s); waiting for the second run"
for i in $(seq 300); do grep -q "resumed from" "$work"/slurm-*.out && break; sleep 0.5; done
grep -q "resumed from .*$first_ckpt.*pre-empted at step ${first_ckpt#step_} " "$work"/slurm-*.out ||
  fail "the requeued run did not resume from $first_ckpt (or did not report the pre-emption)"
[[ ! -e $run/REQUEUE ]] || fail "the resumed run did not remove the REQUEUE marker"

# Second pre-emption: TERM to mpirun itself. Open MPI passes TERM on to the ranks (which save and
# exit 3) but exits with its own code; the marker is what has the script requeue the job.
wait_for_step() { for i in $(seq 300); do
  [[ $(python3 -c "import json; print(json.loads(open('$run/metrics.jsonl').readlines()[-1])['step'])" 2>/dev/null) -ge $1 ]] && return
  sleep 0.5; done; fail "training did not reach step $1"; }
wait_for_step $(( ${first_ckpt#step_} + 30 ))
mpirun_pid=$(pgrep -f "^mpirun .*--run.dir $run ") || fail "no mpirun for $run"
kill -TERM "$mpirun_pid"
echo "[slurm] TERM to mpirun (pid $mpirun_pid)"
for i in $(seq 240); do [[ $(grep -c "requeueing job" "$work"/slurm-*.out) -ge 2 ]] && break; sleep 0.5; done
[[ $(grep -c "requeueing job" "$work"/slurm-*.out) -ge 2 ]] || fail "the job was not requeued after TERM to mpirun"
second=$(grep "requeueing job" "$work"/slurm-*.out | tail -1)
echo "$second"
second_ckpt=$(cat "$run/checkpoints/latest")
[[ $second == *"REQUEUE: {"*"\"checkpoint\":\"$second_ckpt\""*"mpirun exited "* ]] ||
  fail "the second requeue was not triggered by the REQUEUE marker naming $second_ckpt"
[[ $second != *"mpirun exited 3)"* ]] || fail "mpirun exited 3 after TERM: the marker was not needed (Open MPI changed?)"
echo "[slurm] pre-empted again at $second_ckpt and requeued ($((SECONDS - t0)) s); waiting for the third run"

for i in $(seq 600); do
  [[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] && break
  sleep 0.5
done
[[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] || fail "the requeued job did not finish in 5 minutes"
grep -q "resumed from .*$second_ckpt.*pre-empted at step ${second_ckpt#step_} (signal 15)" "$work"/slurm-*.out ||
  fail "the third run did not resume from $second_ckpt (or did not report the pre-emption by TERM)"
grep -q "done: 300 steps" "$work"/slurm-*.out || fail "the requeued run did not finish"
[[ $(cat "$run/checkpoints/latest") == step_300 ]] || fail "latest is not step_300"
[[ ! -e $run/REQUEUE ]] || fail "the resumed run left the REQUEUE marker behind"
steps=$(python3 -c "import json; s=[json.loads(l)['step'] for l in open('$run/metrics.jsonl')]; print(len(s)==len(set(s)) and s==sorted(s))")
[[ $steps == True ]] || fail "metrics.jsonl repeats or misorders steps after the resumes"
echo "[slurm] PASSED in $((SECONDS - t0)) s: USR1 -> checkpoint ($first_ckpt) -> exit 3 -> requeue -> resume;" \
     "TERM to mpirun -> checkpoint ($second_ckpt) -> marker -> requeue -> resume -> step_300"
