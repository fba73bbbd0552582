#!/usr/bin/env bash
# Trains on this machine: launch/local.sh CONFIG WORKDIR [extra flags...]
#
#   launch/local.sh configs/simclr.py /tmp/simclr --config.batch_size=128
#   DRY_RUN=1 launch/local.sh configs/simclr.py /tmp/simclr   # print the command only
#
# CONFIG and WORKDIR are relative to the current directory, as for `python -m ssl_jax.main`.
# Uses the repository's .venv when there is one (launch/setup_local.sh creates it).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)

# Shell-quotes each argument for display: plain words as they are, others in single quotes.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg")
    else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

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
