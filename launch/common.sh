# Sourced by the launch scripts: their common arguments (CONFIG WORKDIR [extra flags...]) and
# shell quoting for the commands they print or generate.

if [ $# -lt 2 ]; then
  echo "usage: ${USAGE_PREFIX:-}$0 CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
repo=$(cd "$(dirname "$0")/.." && pwd)

# Shell-quotes each argument: plain words as they are, others in single quotes.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg")
    else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}
