#!/usr/bin/env bash
# The quality record of docs/QUALITY.md, end to end on the flowers5 photos (about 60 min on 2 CPU cores):
# import with the leak guard, three pretrained Lite members, the trainable-parameter exploration, the
# small CNN from scratch, the blend, TTA on/off, and the served ensemble over HTTP vs the submission.
#   bash scripts/quality_flowers5.sh [../shared/data/flowers5-128px]
set -euo pipefail
cd "$(dirname "$0")/.."
photos="${1:-../shared/data/flowers5-128px}"
flower=.venv/bin/flower
export TF_CPP_MIN_LOG_LEVEL=2
step() { echo; echo "=== $(date +%H:%M:%S) $*"; }

step import
rm -rf data/flowers5
$flower import "$photos" data/flowers5 --sizes 128,192,240

step "members: lite0 at 128 and 192, lite1 at 240 (head first, then all)"
for member in lite0_128 lite0_192 lite1_240; do
  $flower train --config "training/configs/flowers5_${member}.toml" | grep -v "^  epoch"
done

step blend
$flower blend runs/flowers5-lite0-128 runs/flowers5-lite0-192 runs/flowers5-lite1-240 --out runs/flowers5-ensemble

step "served ensemble vs the offline submission"
.venv/bin/python scripts/quality.py service runs/flowers5-ensemble --data data/flowers5 --size 128 || true

step "exploration: lite0 at 128, which parameters train (6 epochs each)"
lite0=training/configs/flowers5_lite0_128.toml
$flower train --config $lite0 --set output=runs/explore-head --set name=explore-head \
  --set model.trainable=head --set model.unfreeze_epoch=0 | grep -v "^  epoch"
$flower train --config $lite0 --set output=runs/explore-last6 --set name=explore-last6 \
  --set model.trainable=last:6 --set model.unfreeze_epoch=0 --set schedule.start=5e-4 --set schedule.max=5e-4 \
  | grep -v "^  epoch"
$flower train --config $lite0 --set output=runs/explore-all --set name=explore-all \
  --set model.trainable=all --set model.unfreeze_epoch=0 --set schedule.start=2e-4 --set schedule.max=2e-4 \
  | grep -v "^  epoch"

step "the small CNN from scratch"
$flower train --config training/configs/flowers5_cnn_128.toml | grep -v "^  epoch"

step "every run: validation and test macro F1, TTA off and on"
.venv/bin/python scripts/quality.py members runs/flowers5-lite0-128 runs/flowers5-lite0-192 runs/flowers5-lite1-240 \
  runs/explore-head runs/explore-last6 runs/explore-all runs/flowers5-cnn-128 --data data/flowers5 --tta 4
$flower compare runs/flowers5-* runs/explore-* --markdown
step done
