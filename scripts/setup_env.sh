#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it with the given extras, e.g. "cpu,dev".
# Used by demo.sh, test.sh and CI. On a Kaggle TPU VM or a GPU box, install yourself instead
# (see docs/TRAINING.md: no extra keeps the TensorFlow build that is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
