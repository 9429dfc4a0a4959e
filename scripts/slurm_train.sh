#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, c10d rendezvous on the first node.
#   sbatch --nodes=2 scripts/slurm_train.sh experiment=shufflemamba_base_in1k data.root=/data/imagenet
# Pre-emption: SLURM sends SIGTERM (here 120 s before the time limit); train.py writes last.pt and
# exits; the job requeues itself and resumes from last.pt (checkpoint.resume=auto, fixed run dir).
#SBATCH --job-name=shufflemamba
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RUN_DIR=${RUN_DIR:-runs/slurm-${SLURM_JOB_ID}}
# Forward SIGTERM to the training processes so they checkpoint, then requeue.
trap 'echo "SIGTERM: checkpointing"; kill -TERM "$PID"; wait "$PID"; scontrol requeue "$SLURM_JOB_ID"' TERM
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:29500" --rdzv-id="$SLURM_JOB_ID" \
  --max-restarts=3 \
  train.py hydra.run.dir="$RUN_DIR" checkpoint.resume=auto "$@" &
PID=$!
wait "$PID"
