#!/usr/bin/env bash
# Training under SLURM: one torchrun per node (c10d rendezvous on the first node), pre-empted and
# requeued at the time limit, resuming by itself.
#   sbatch --nodes=2 scripts/slurm_train.sh experiment=shufflemamba_base_in1k data.root=/data/imagenet
#   sbatch --gpus-per-node=0 --cpus-per-task=8 --export=ALL,NPROC_PER_NODE=1 scripts/slurm_train.sh experiment=demo
#
# At the time limit: SLURM sends SIGUSR1 to this batch shell 180 s before (--signal=B:USR1@180).
# The shell does not signal srun or torchrun (srun takes a signal as "kill the step", torchrun's
# agent dies on SIGUSR1); it creates the run's stop file instead. Rank 0 sees it within a second,
# every rank agrees in the update's collective to stop after that update, rank 0 writes last.pt
# (atomically), removes the stop file and the processes exit 0 (so torchrun does not restart them).
# The shell then requeues the job; the requeued job (same job id, same run dir) resumes from
# last.pt (checkpoint.resume=auto) and continues the same wandb run. A plain `scancel` is a
# cancellation: SIGTERM, the processes stop, no requeue. At most MAX_REQUEUES requeues.
#
# Settings from the environment (sbatch --export=ALL,NAME=value): RUN_DIR (default
# runs/slurm-<job id>, on a filesystem every node sees), GPUS_PER_NODE (default: the GPUs SLURM
# gave the job), NPROC_PER_NODE (processes per node; default GPUS_PER_NODE, 1 without GPUs),
# MASTER_PORT (29500), MAX_REQUEUES (20). Every #SBATCH line can be overridden on sbatch's command line.
#SBATCH --job-name=shufflemamba
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1 ))}
MAX_REQUEUES=${MAX_REQUEUES:-20}
RUN_DIR=${RUN_DIR:-runs/slurm-${SLURM_JOB_ID}}
STOP_FILE=$RUN_DIR/stop-requested
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RESTARTS=${SLURM_RESTART_COUNT:-0}
mkdir -p "$RUN_DIR"
rm -f "$STOP_FILE"  # a request answered by the previous run of this job
echo "[$(date +%T)] job $SLURM_JOB_ID run $((RESTARTS + 1)): $SLURM_NNODES node(s) x $NPROC_PER_NODE process(es), run dir $RUN_DIR"

preempted=0 cancelled=0
trap 'preempted=1; echo "[$(date +%T)] time-limit warning (SIGUSR1): asking for a checkpoint"; touch "$STOP_FILE"' USR1
trap 'cancelled=1; echo "[$(date +%T)] SIGTERM: cancelled (no requeue)"' TERM

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${MASTER_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" \
  --max-restarts=3 \
  train.py hydra.run.dir="$RUN_DIR" checkpoint.resume=auto trainer.stop_file="$STOP_FILE" "$@" &
PID=$!
# `wait` returns early when a trapped signal arrives: wait again until srun itself has ended.
while true; do
  wait "$PID"
  rc=$?
  kill -0 "$PID" 2>/dev/null || break
done
echo "[$(date +%T)] training exited with $rc"

if (( preempted && !cancelled )); then
  if [[ -e $STOP_FILE ]]; then
    echo "the stop request was not answered (training ended first, or failed): not requeueing"
  elif (( RESTARTS >= MAX_REQUEUES )); then
    echo "requeued $RESTARTS times already (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; resume with the same sbatch command and RUN_DIR=$RUN_DIR"
  else
    echo "[$(date +%T)] checkpoint written: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
fi
exit "$rc"
