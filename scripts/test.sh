#!/usr/bin/env bash
# Install the project with its test tools into .venv and run the whole test suite (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh cpu,dev
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest "$@"
