#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for testing the pre-emption path as a cluster runs it.
#   bash scripts/slurm_local.sh start     # prints: export SLURM_CONF=...  (eval it, or set it yourself)
#   bash scripts/slurm_local.sh stop
#   bash scripts/slurm_local.sh status
# Needs Debian's packages (apt-get install -y slurmctld slurmd slurm-client munge) and root: the
# controller and the node daemon run as root, state and logs under $SLURM_LOCAL_DIR.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/shufflemamba-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

start() {
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || { echo "slurm_local: $cmd not found (apt-get install -y slurmctld slurmd slurm-client munge)" >&2; exit 1; }
  done
  [[ $(id -u) == 0 ]] || { echo "slurm_local: run as root (the daemons need it)" >&2; exit 1; }
  mkdir -p "$DIR"/{state,spool,log} /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || munged --force
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 60); do  # the node registers within seconds
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm_local: the node did not come up; logs in $DIR/log" >&2
  exit 1
}

stop() {
  for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  sleep 1
  pkill -x slurmstepd 2>/dev/null || true
  rm -rf "$DIR/state" "$DIR/spool"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo && SLURM_CONF=$CONF squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
