#!/usr/bin/env bash
# Install the project with its test tools into .venv and run the whole test suite (CI runs this).
# The web page's browser test needs Debian's chromium and chromium-driver: installed here when missing
# (as root with apt-get); elsewhere that one test is skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
fi
bash scripts/setup_env.sh cpu,dev,beam,litert,onnx  # the Beam runner and the faster runtimes are tested too
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/python -m ruff check .
# One test process per core with pytest-xdist (on 2 cores: 419 s instead of 591 s in one process, docs/TESTING.md);
# TEST_WORKERS=0 runs every test in this one process, TEST_WORKERS=N in N.
.venv/bin/python -m pytest -n "${TEST_WORKERS:-auto}" "$@"
