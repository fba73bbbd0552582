#!/usr/bin/env bash
# Trains on this machine: launch/local.sh CONFIG WORKDIR [extra flags...]
#
#   launch/local.sh configs/simclr.py /tmp/simclr --config.batch_size=128
#   DRY_RUN=1 launch/local.sh configs/simclr.py /tmp/simclr   # print the command only
#
# CONFIG and WORKDIR are relative to the current directory, as for `python -m ssl_jax.main`.
# Uses the repository's .venv when there is one (launch/setup_local.sh creates it).
set -euo pipefail

. "$(dirname "$0")/common.sh"
shift 2


if [ -f "$repo/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$repo/.venv/bin/activate"
fi
# The package need not be installed: run it from the checkout.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

cmd=(python -m ssl_jax.main "--config=$config" "--workdir=$workdir" "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  quote "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
