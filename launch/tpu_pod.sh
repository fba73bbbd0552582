#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM pod slice: launch/tpu_pod.sh CONFIG WORKDIR [flags...]
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#       configs/simclr.py:backbone=resnet50,batch=4096 /mnt/shared/runs/simclr
#   DRY_RUN=1 TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/simclr.py /mnt/x
#
# Environment: TPU_NAME and ZONE (required); REPO_URL and BRANCH (default: this checkout's
# `origin` remote and current branch); PROJECT (default: gcloud's); REMOTE_DIR (ssl_jax, under
# each worker's home); PYTHON (python3.11: the VM image must have Python >= 3.11).
#
# Two `gcloud compute tpus tpu-vm ssh --worker=all` commands: the first clones or updates the
# repository on every worker and runs launch/setup_local.sh plus jax's TPU runtime; the second
# runs `python -m ssl_jax.main --multihost` on every worker at once (jax.distributed.initialize()
# finds the other workers through the TPU metadata). CONFIG is relative to the checkout.
# WORKDIR must be one directory that every worker sees (an NFS/Filestore or gcsfuse mount):
# checkpoints are written and read by all workers, and the trainer writes through the local
# file API, so a gs:// URL will not do. Training runs in the foreground of the ssh session.
set -euo pipefail

USAGE_PREFIX='TPU_NAME=... ZONE=... '
. "$(dirname "$0")/common.sh"
shift 2

: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE to the zone of the TPU VM, e.g. us-central2-b}"
# Read-only look-ups of this checkout, for the defaults.
REPO_URL=${REPO_URL:-$(git -C "$repo" remote get-url origin 2>/dev/null || true)}
BRANCH=${BRANCH:-$(git -C "$repo" rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)}
: "${REPO_URL:?set REPO_URL: this checkout has no origin remote to default to}"
REMOTE_DIR=${REMOTE_DIR:-ssl_jax}
PYTHON=${PYTHON:-python3.11}


dir=$(quote "$REMOTE_DIR")
# Clone or fast-forward, set up the venv and data, then jax's TPU runtime (libtpu) at the
# version of jax that setup installed.
setup_command="set -euo pipefail
if [ -d $dir/.git ]; then
  git -C $dir fetch -q origin && git -C $dir checkout -q $(quote "$BRANCH") &&
    git -C $dir pull -q --ff-only origin $(quote "$BRANCH")
else
  git clone -q --branch $(quote "$BRANCH") $(quote "$REPO_URL") $dir
fi
cd $dir
PYTHON=$(quote "$PYTHON") bash launch/setup_local.sh
.venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""

train_command="cd $dir && PYTHONPATH=. .venv/bin/python -m ssl_jax.main $(quote \
    "--config=$config" "--workdir=$workdir" --multihost "$@")"

gcloud_ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all)
if [ -n "${PROJECT:-}" ]; then gcloud_ssh+=("--project=$PROJECT"); fi

if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "# 1. clone or update and set up, on every worker:"
  quote "${gcloud_ssh[@]}" --command "$setup_command"
  echo "# 2. train, on every worker:"
  quote "${gcloud_ssh[@]}" --command "$train_command"
else
  "${gcloud_ssh[@]}" --command "$setup_command"
  "${gcloud_ssh[@]}" --command "$train_command"
fi
