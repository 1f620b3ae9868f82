#!/usr/bin/env bash
# The second half of docs/QUALITY.md: members with the recipe the lite0 exploration picked on validation
# (last 6 blocks + head from the start), all at 128 px (the photos' own size), their blend, and the
# served blend vs the offline submission. Run after scripts/quality_flowers5.sh (it uses runs/explore-last6).
set -euo pipefail
cd "$(dirname "$0")/.."
flower=.venv/bin/flower
export TF_CPP_MIN_LOG_LEVEL=2
step() { echo; echo "=== $(date +%H:%M:%S) $*"; }
for v in 1 2; do
  step "lite$v at 128, last 6 blocks"
  $flower train --config "training/configs/flowers5_lite${v}_128_last6.toml" | grep -v "^  epoch"
done
step blend
$flower blend runs/explore-last6 runs/flowers5-lite1-128-last6 runs/flowers5-lite2-128-last6 \
  --out runs/flowers5-ensemble-last6
step "served ensemble vs the offline submission"
.venv/bin/python scripts/quality.py service runs/flowers5-ensemble-last6 --data data/flowers5 --size 128 || true
step "members: validation and test macro F1, TTA off and on"
.venv/bin/python scripts/quality.py members runs/flowers5-lite1-128-last6 runs/flowers5-lite2-128-last6 \
  --data data/flowers5 --tta 4
step done
