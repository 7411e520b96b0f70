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
ANN=../shared/data/iu_xray_reports/annotation.json
if [ -f "$ANN" ]; then
  echo "== 4. report-only index of the shared IU X-ray validation reports (FAISS), finding-filtered text search"
  $BIN/medrag index manifest r2gen "$ANN" --reports-only --splits val -o "$OUT/iu_val.jsonl" | head -1
  $BIN/medrag index build "$OUT/iu_val.jsonl" --index "faiss:$OUT/iu_index" --no-progress | head -1
  $BIN/medrag search --index "faiss:$OUT/iu_index" --reports --text "small left pleural effusion" \
    --anatomy "left pleura" --finding effusion --include-uncertain -k 3
fi
echo "== 5. draft a comparative report from retrieved cases (synthetic paired set; extractive drafter)"
$BIN/medrag eval synth --out "$OUT/synth" -n 200 --seed 7 --size 128 | tail -1
$BIN/medrag index build "$OUT/synth/manifest.jsonl" --index "qdrant+local:$OUT/synth_index" --encoder pixels \
  --text-encoder none --conditioning "left lung,right lung,heart" --no-progress | head -1
PRIOR=$(sed -n 1p "$OUT/synth/manifest.jsonl" | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)["report"])')
echo "$PRIOR" > "$OUT/prior_report.txt"
echo "prior report: $PRIOR"
$BIN/medrag draft --index "qdrant+local:$OUT/synth_index" --image "$OUT/synth/images/syn00001.png" \
  --prior-report "$OUT/prior_report.txt" --prior-study syn00000 --exclude-patient pat00000 -k 5
