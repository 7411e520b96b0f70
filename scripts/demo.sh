#!/usr/bin/env bash
# `make demo`: build an index from real DICOMs (pydicom-data + pydicom's own test files) on the
# embedded Qdrant engine, then answer an anatomy-conditioned search with a chest radiograph.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
mkdir -p "$OUT"
DATA=$($BIN/python -c 'import data_store, os; print(os.path.join(os.path.dirname(data_store.__file__), "data"))')
PYD=$($BIN/python -c 'import pydicom.data, os; print(os.path.dirname(pydicom.data.__file__) + "/test_files")')
rm -rf "$OUT/dicoms" && mkdir -p "$OUT/dicoms"
ln -s "$DATA" "$OUT/dicoms/pydicom-data"
ln -s "$PYD" "$OUT/dicoms/pydicom-test-files"
echo "== 1. manifest from DICOM folders (grouped by StudyInstanceUID)"
$BIN/medrag index manifest dicom "$OUT/dicoms" -o "$OUT/manifest.jsonl" | head -12
echo "== 2. build on the embedded Qdrant engine (default backend)"
$BIN/medrag index build "$OUT/manifest.jsonl" --index "qdrant+local:$OUT/index" --encoder pixels --no-progress | head -12
echo "== 3. similar cases for a chest radiograph, conditioned on the left lung"
$BIN/medrag search --index "qdrant+local:$OUT/index" --image "$DATA/RG1_UNCR.dcm" --anatomy "left lung" -k 5
