#!/usr/bin/env bash
# The local quickstart from a fresh clone: a virtualenv, kaitune with its train and
# serve extras, then all five steps on tiny-phi3 (about a minute on 2 CPU cores).
# Extra arguments go to `kaitune run`, e.g. --keep-serving.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/kaitune ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # torch is pinned exactly in the extras; an open range would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet -e '.[train,serve]'
fi
exec .venv/bin/kaitune run examples/quickstart.yaml "$@"
