#!/usr/bin/env bash
# Exercises launch/slurm/train-single-node.sbatch on a real one-node SLURM (Debian's slurm-wlm)
# that this script starts with a private configuration: the job trains, receives SLURM's USR1
# pre-emption signal, checkpoints, exits 3, is requeued by the script, resumes and finishes.
# Exit 0: passed; 1: failed; 77: SLURM cannot run here (CTest reports it as skipped, with why).
#   slurm_requeue_test.sh BIN_DIR SOURCE_DIR
set -uo pipefail
bin=${1:?bin dir}; src=${2:?source dir}
skip() { echo "SKIPPED: $*"; exit 77; }
fail() { echo "FAILED: $*"; [[ -n ${work:-} ]] && { echo "--- job log"; cat "$work"/slurm-*.out 2>/dev/null | tail -40; echo "--- slurmctld"; tail -20 "$work/slurmctld.log"; }; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; } >/dev/null 2>&1 ||
      skip "could not install slurm-wlm and munge with apt-get"
  else
    skip "slurmctld/slurmd/munged are not installed and this user cannot install them"
  fi
fi
[[ $(id -u) -eq 0 ]] || skip "a private slurmd needs root here"

work=$(mktemp -d /tmp/sedd-slurm-XXXXXX)
chmod 755 "$work"  # the munge user must reach its folder inside
host=$(hostname -s)
cleanup() {
  [[ -n ${ctld_pid:-} ]] && kill "$ctld_pid" 2>/dev/null
  [[ -n ${slurmd_pid:-} ]] && kill "$slurmd_pid" 2>/dev/null
  [[ -n ${munge_pid:-} ]] && kill "$munge_pid" 2>/dev/null
  pkill -f "sedd-train.*$work" 2>/dev/null
  sleep 1
  [[ -z ${SEDD_KEEP_TMP:-} ]] && rm -rf "$work"
}
trap cleanup EXIT

# munge with its own key and socket, as the munge user.
mkdir -p "$work/munge"
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$work/munge" && chmod 711 "$work/munge" && chmod 400 "$work/munge/munge.key"
runuser -u munge -- munged --foreground --key-file="$work/munge/munge.key" --socket="$work/munge/socket" \
  --pid-file="$work/munge/pid" --log-file="$work/munge/log" --seed-file="$work/munge/seed" &
munge_pid=$!
sleep 1
kill -0 $munge_pid 2>/dev/null || skip "munged does not start here ($(tail -2 "$work/munge/log" 2>/dev/null))"

cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p "$work/state" "$work/spool"
cat > "$work/slurm.conf" <<CONF
ClusterName=sedd-test
SlurmctldHost=$host
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$work/munge/socket
CryptoType=crypto/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF=$work/slurm.conf
slurmctld -D -i -f "$SLURM_CONF" >>"$work/slurmctld.log" 2>&1 &
ctld_pid=$!
slurmd -D -f "$SLURM_CONF" >>"$work/slurmd.log" 2>&1 &
slurmd_pid=$!
for i in $(seq 60); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1)
  [[ $state == idle* ]] && break
  sleep 1
done
[[ ${state:-} == idle* ]] || skip "the private SLURM did not come up (node state '${state:-none}'): $(tail -3 "$work/slurmctld.log" "$work/slurmd.log" | tr '\n' ' ')"
echo "[slurm] one-node SLURM up on $host ($cpus CPUs)"

# Data and the job: the template as shipped, minus its GPU request (this node has none).
torch_data="$work/data"; mkdir -p "$torch_data"
SEDD_BUILD="$bin/.." bash "$src/datasets/make_demo.sh" "$work/demo" >/dev/null 2>&1 || fail "demo data"
sed '/--gpus-per-node/d' "$src/launch/slurm/train-single-node.sbatch" > "$work/job.sbatch"
run="$work/run"
cd "$work"
jobid=$(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SEDD_BIN="$bin" \
  sbatch --parsable --export=ALL --ntasks-per-node=2 --cpus-per-task=1 --time=20 --output="$work/slurm-%j.out" \
  "$work/job.sbatch" "$src/configs/tiny.ini" --run.dir "$run" --data.train "$work/demo/train/*.h5" \
  --data.valid "$work/demo/valid/*.h5" --train.steps 600 --train.ckpt_every 0 --train.log_every 5) ||
  fail "sbatch refused the job"
echo "[slurm] submitted job $jobid"
for i in $(seq 300); do [[ $( { wc -l < "$run/metrics.jsonl"; } 2>/dev/null || echo 0) -ge 20 ]] && break; sleep 0.5; done
[[ -f $run/metrics.jsonl ]] || fail "the job never started training"
echo "[slurm] training; sending USR1 to the batch script, as SLURM does before a time limit or pre-emption"
scancel --batch --signal=USR1 "$jobid" || fail "scancel"
for i in $(seq 240); do
  grep -q "requeueing job" "$work"/slurm-*.out 2>/dev/null && break
  sleep 0.5
done
grep -q "requeueing job" "$work"/slurm-*.out || fail "the job did not requeue itself"
grep -q "exit 3" "$work"/slurm-*.out || fail "training did not stop with exit code 3"
first_ckpt=$(cat "$run/checkpoints/latest")
echo "[slurm] pre-empted at $first_ckpt and requeued; waiting for the second run"
for i in $(seq 600); do
  [[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] && break
  sleep 1
done
[[ -z $(squeue -h -j "$jobid" 2>/dev/null) ]] || fail "the requeued job did not finish in 10 minutes"
grep -q "resumed from .*$first_ckpt" "$work"/slurm-*.out || fail "the requeued run did not resume from $first_ckpt"
grep -q "done: 600 steps" "$work"/slurm-*.out || fail "the requeued run did not finish"
[[ $(cat "$run/checkpoints/latest") == step_600 ]] || fail "latest is not step_600"
steps=$(python3 -c "import json; s=[json.loads(l)['step'] for l in open('$run/metrics.jsonl')]; print(len(s)==len(set(s)) and s==sorted(s))")
[[ $steps == True ]] || fail "metrics.jsonl repeats or misorders steps after the resume"
echo "[slurm] PASSED: USR1 -> checkpoint ($first_ckpt) -> exit 3 -> requeue -> resume -> step_600"
