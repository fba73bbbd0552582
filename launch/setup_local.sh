#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine: the Fashion-MNIST package, a virtualenv in .venv and
# ssl_jax with its TensorBoard and test extras. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] &&
   [ -z "${SSL_JAX_DATA_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  echo "Installing Debian's dataset-fashion-mnist (needs root)..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Skip the (slow) resolver when the project is already installed at this revision.
stamp=.venv/.ssl_jax-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[tf,test]'
  touch "$stamp"
fi
