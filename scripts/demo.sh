#!/usr/bin/env bash
# The main job on the bundled demo data, from a fresh machine: install, make the demo data, show it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh cpu,litert,onnx
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/python scripts/demo.py "$@"
