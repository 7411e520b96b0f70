#!/usr/bin/env bash
# Train the demo's encoder (demo/model) on the shared NIH sample minus the 60 demo images, so that
# `make demo` searches images the model never saw. A developer tool, run once; demo/model is
# committed (a frozen-prefix EfficientNet-Lite0 checkpoint stores only what it trained).
#   bash scripts/train_demo_model.sh ../shared/data/nih_cxr14_sample
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/nih_cxr14_sample}
WORK=runs/demo_train
rm -rf "$WORK" && mkdir -p "$WORK/data"
ln -s "$(cd "$SRC" && pwd)/images" "$WORK/data/images"
.venv/bin/python - "$SRC/labels.csv" demo/nih60/labels.csv "$WORK/data/labels.csv" <<'PY'
import csv, sys
demo = {r["image"] for r in csv.DictReader(open(sys.argv[2]))}
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["image"] not in demo]
with open(sys.argv[3], "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"{len(rows)} training images (the {len(demo)} demo images left out)")
PY
.venv/bin/medrag train "$WORK/data" --preset cxr-cpu --out "$WORK/run" --no-progress --half-checkpoint
rm -rf demo/model && cp -r "$WORK/run/checkpoint" demo/model
du -sh demo/model
