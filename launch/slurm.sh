#!/usr/bin/env bash
# Submits multi-node GPU training to SLURM: launch/slurm.sh CONFIG WORKDIR [extra flags...]
#
#   NODES=4 GPUS_PER_NODE=8 PARTITION=gpu launch/slurm.sh \
#       configs/simclr.py:backbone=resnet50,batch=4096 /shared/runs/simclr
#   DRY_RUN=1 launch/slurm.sh configs/simclr.py /shared/runs/simclr   # print, do not submit
#
# Environment: NODES (default 2), GPUS_PER_NODE (8), TIME (24:00:00), JOB_NAME (ssl_jax),
# PARTITION, ACCOUNT and CPUS_PER_TASK (omitted when unset).
#
# One task per node; `srun` starts `python -m ssl_jax.main --multihost` on every node, and
# jax.distributed.initialize() finds the coordinator, process count and process id in the
# SLURM environment. The checkout, its .venv, the config and WORKDIR must be on a file system
# that every node sees; the job's log is WORKDIR/slurm-<job id>.out. Submitting the same
# command again resumes from WORKDIR's latest checkpoint.
set -euo pipefail

. "$(dirname "$0")/common.sh"
shift 2
case $workdir in /*) ;; *) workdir=$PWD/$workdir ;; esac  # the job may start elsewhere

NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TIME=${TIME:-24:00:00}
JOB_NAME=${JOB_NAME:-ssl_jax}
for name in NODES GPUS_PER_NODE; do
  if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
    echo "$name must be a positive integer, got '${!name}'." >&2
    exit 2
  fi
done


# The batch script; its arguments are the extra flags for ssl_jax.main.
batch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$(quote "$JOB_NAME")"
  echo "#SBATCH --nodes=$NODES"
  echo '#SBATCH --ntasks-per-node=1'
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  if [ -n "${CPUS_PER_TASK:-}" ]; then echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"; fi
  echo "#SBATCH --time=$TIME"
  if [ -n "${PARTITION:-}" ]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [ -n "${ACCOUNT:-}" ]; then echo "#SBATCH --account=$ACCOUNT"; fi
  echo "#SBATCH --output=$(quote "$workdir/slurm-%j.out")"
  # Relative CONFIG paths are relative to where this script was called.
  echo "#SBATCH --chdir=$(quote "$PWD")"
  cat <<EOF
set -euo pipefail
if [ -f $(quote "$repo/.venv/bin/activate") ]; then . $(quote "$repo/.venv/bin/activate"); fi
export PYTHONPATH=$(quote "$repo")\${PYTHONPATH:+:\$PYTHONPATH}
# One process per node drives all of the node's GPUs. Without this, jax's SLURM detection
# would give each process only GPU \$SLURM_LOCALID (the one-task-per-GPU layout).
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))
srun --kill-on-bad-exit=1 $(quote python -m ssl_jax.main "--config=$config" \
    "--workdir=$workdir" --multihost "$@")
EOF
}

script_path=$workdir/slurm_job.sbatch
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# $script_path:"
  batch_script "$@"
  echo "# submit with:"
  quote sbatch "$script_path"
else
  mkdir -p "$workdir"  # SLURM does not create the directory of --output
  batch_script "$@" >"$script_path"
  sbatch "$script_path"
fi
