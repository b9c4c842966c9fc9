# Sourced by the SLURM tests: a private SLURM on this one host (Debian's slurm-wlm): munge with its
# own key, slurmctld, and one slurmd per node name, each with its own port, spool, TmpFS and log
# ("NodeName=nodeA NodeHostname=<host> Port=..."), so several "nodes" share the machine.
#   slurm_cluster_start WORK NODE...   start it (SLURM_CONF exported); skip (77) if it cannot run here
#   slurm_cluster_stop                 cancel the jobs, stop the daemons, end this cluster's ranks
#   slurm_cluster_logs                 the tails of the daemon logs (for failure messages)
# The caller defines skip() (exit 77) before sourcing this file.

slurm_cluster_install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; } \
      >/dev/null 2>&1 || skip "could not install slurm-wlm and munge with apt-get"
  else
    skip "slurmctld/slurmd/munged are not installed and this user cannot install them"
  fi
}

# First port of N consecutive free TCP ports from 16817 on (a leftover daemon may hold the usual ones).
slurm_free_ports() {
  local n=$1 base p busy
  for ((base = 16817; base < 17800; base += n + 1)); do
    busy=0
    for ((p = base; p <= base + n; ++p)); do
      (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && { busy=1; break; }
    done
    ((busy)) || { echo "$base"; return 0; }
  done
  return 1
}

slurm_cluster_start() {
  slurm_work=$1; shift
  slurm_nodes=("$@")
  slurm_cluster_install
  [[ $(id -u) -eq 0 ]] || skip "a private slurmd needs root here"
  chmod 755 "$slurm_work"  # the munge user must reach its folder inside
  slurm_host=$(hostname -s)

  mkdir -p "$slurm_work/munge"
  dd if=/dev/urandom of="$slurm_work/munge/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$slurm_work/munge" && chmod 711 "$slurm_work/munge" && chmod 400 "$slurm_work/munge/munge.key"
  runuser -u munge -- munged --foreground --key-file="$slurm_work/munge/munge.key" --socket="$slurm_work/munge/socket" \
    --pid-file="$slurm_work/munge/pid" --log-file="$slurm_work/munge/log" --seed-file="$slurm_work/munge/seed" >/dev/null 2>&1 &
  slurm_munge_pid=$!
  sleep 1
  kill -0 "$slurm_munge_pid" 2>/dev/null || skip "munged does not start here ($(tail -2 "$slurm_work/munge/log" 2>/dev/null))"

  local cpus mem port node i
  cpus=$(nproc); mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / ${#slurm_nodes[@]} - 512 ))
  port=$(slurm_free_ports "${#slurm_nodes[@]}") || skip "no free TCP ports for slurmctld/slurmd"
  mkdir -p "$slurm_work/state"
  # %n: per-node spool (slurmd's sockets), TmpFS (PMIx's per-step client folders, which would
  # otherwise collide under /tmp between two slurmstepds of the same job step), pid and log files.
  # Quick requeues: a requeued job may start again only cred_expire seconds (default 120) after the
  # requeue, and then at the next pass of the main scheduling loop (sched_interval, default 60 s).
  cat > "$slurm_work/slurm.conf" <<CONF
ClusterName=sedd-test
SlurmctldHost=$slurm_host
SlurmctldPort=$port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$slurm_work/munge/socket,cred_expire=10
CryptoType=crypto/munge
StateSaveLocation=$slurm_work/state
SlurmdSpoolDir=$slurm_work/spool/%n
TmpFS=$slurm_work/tmp/%n
SlurmctldPidFile=$slurm_work/slurmctld.pid
SlurmdPidFile=$slurm_work/slurmd-%n.pid
SlurmctldLogFile=$slurm_work/slurmctld.log
SlurmdLogFile=$slurm_work/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=60
CompleteWait=0
CONF
  i=0
  for node in "${slurm_nodes[@]}"; do
    mkdir -p "$slurm_work/spool/$node" "$slurm_work/tmp/$node"
    echo "NodeName=$node NodeHostname=$slurm_host Port=$((port + 1 + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN" \
      >> "$slurm_work/slurm.conf"
    i=$((i + 1))
  done
  local list; list=$(IFS=,; echo "${slurm_nodes[*]}")
  echo "PartitionName=test Nodes=$list Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES" >> "$slurm_work/slurm.conf"

  export SLURM_CONF=$slurm_work/slurm.conf
  slurmctld -D -i -f "$SLURM_CONF" >>"$slurm_work/slurmctld.log" 2>&1 &
  slurm_ctld_pid=$!
  slurm_slurmd_pids=()
  for node in "${slurm_nodes[@]}"; do
    slurmd -D -N "$node" -f "$SLURM_CONF" >>"$slurm_work/slurmd-$node.out" 2>&1 &
    slurm_slurmd_pids+=($!)
  done
  local idle=0
  for i in $(seq 60); do
    idle=$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle')
    [[ $idle -eq ${#slurm_nodes[@]} ]] && break
    sleep 0.5
  done
  [[ $idle -eq ${#slurm_nodes[@]} ]] ||
    skip "the private SLURM did not come up ($idle of ${#slurm_nodes[@]} nodes idle: $(sinfo -h -N -o '%N:%t' 2>/dev/null | tr '\n' ' ')): $(slurm_cluster_logs | tail -6 | tr '\n' ' ')"
  echo "[slurm] SLURM up on $slurm_host: nodes ${slurm_nodes[*]} ($cpus CPUs each), slurmctld port $port"
}

slurm_cluster_logs() {
  local f
  for f in "$slurm_work"/slurmctld.log "$slurm_work"/slurmd-*.log "$slurm_work"/slurmd-*.out; do
    [[ -s $f ]] && { echo "--- $(basename "$f")"; tail -15 "$f"; }
  done
}

slurm_cluster_stop() {
  [[ -n ${slurm_ctld_pid:-} ]] && scancel --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null
  sleep 1
  local pid
  for pid in ${slurm_slurmd_pids[@]+"${slurm_slurmd_pids[@]}"} ${slurm_ctld_pid:-} ${slurm_munge_pid:-}; do
    kill "$pid" 2>/dev/null
  done
  # Ranks of this cluster's jobs (their command lines name the work folder) must not outlive it.
  [[ -n ${slurm_work:-} ]] && pkill -f "sedd-train.*$slurm_work" 2>/dev/null
  sleep 1
  [[ -n ${slurm_work:-} && -z ${SEDD_KEEP_TMP:-} ]] && rm -rf "$slurm_work"
  return 0
}
