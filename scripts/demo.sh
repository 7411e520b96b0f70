#!/usr/bin/env bash
# `make demo`: real chest X-rays end to end on the embedded Qdrant engine.
#   1-2. index 60 real NIH ChestX-ray14 radiographs (shipped in demo/nih60, with their labels) with
#        the learned medrag-native encoder (demo/model: ImageNet EfficientNet-Lite0 from PyPI + the
#        anatomy-conditioned head trained on the other 440 images of the shared NIH sample);
#   3.   a pleura-conditioned search with an effusion case: the hits with their labels, how many
#        show an effusion against the base rate, and heat-maps of where the pleura query looked;
#   4.   the same with the entity filter (only cases labelled with an effusion), then with the
#        effusion asked of the images (cases whose image reads as showing one; no report needed);
#   5.   report search over the shared IU X-ray reports (when the shared data is beside the repo);
#   6.   a comparative report drafted for a real follow-up radiograph with its real prior (the
#        shared COVID-collection notes set; a synthetic paired set when it is absent).
# Output of every command goes to a file first and is shown from there (no pipes into `head`: a
# reader that stops early would kill the writer with SIGPIPE under pipefail).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
rm -rf "$OUT" && mkdir -p "$OUT"
show() { sed -n "1,${2:-12}p" "$1"; }  # the first lines of a command's saved output
effusion_hits() {  # how many hits of a --json search are labelled Effusion, against the base rate
  $BIN/python - "$1" "$OUT/nih60.jsonl" <<'PY'
import json, sys
hits = json.load(open(sys.argv[1]))["hits"]
studies = [json.loads(line) for line in open(sys.argv[2])]
with_eff = sum("Effusion" in (h.get("labels") or []) for h in hits)
others = [s for s in studies if s["study_id"] != "00000100_000"]
base = sum("Effusion" in (s.get("labels") or []) for s in others)
print(f"hits labelled Effusion: {with_eff} of {len(hits)}; in the index {base} of {len(others)} other images "
      f"({base / len(others):.0%}) are: a random pick of {len(hits)} would hold {len(hits) * base / len(others):.1f}")
PY
}

echo "== 1. manifest of 60 real NIH chest X-rays with their finding labels (demo/nih60)"
$BIN/medrag index manifest labels demo/nih60 -o "$OUT/nih60.jsonl" > "$OUT/1.txt"; show "$OUT/1.txt" 3
echo "== 2. index them with the learned encoder on the embedded Qdrant engine"
$BIN/medrag index build "$OUT/nih60.jsonl" --index "qdrant+local:$OUT/nih_index" --encoder medrag-native \
  --checkpoint demo/model --text-encoder none --conditioning "lung,left lung,right lung,heart,pleura" \
  --no-progress > "$OUT/2.txt"; show "$OUT/2.txt" 3
QUERY=demo/nih60/images/00000100_000.png   # labelled Atelectasis|Effusion|Infiltration
echo "== 3. cases similar in the pleura to $QUERY (its own image never counts)"
$BIN/medrag search --index "qdrant+local:$OUT/nih_index" --image "$QUERY" --anatomy pleura -k 8 \
  --heatmaps "$OUT/heatmaps" > "$OUT/3.txt"; show "$OUT/3.txt" 40
$BIN/medrag search --index "qdrant+local:$OUT/nih_index" --image "$QUERY" --anatomy pleura -k 8 --json > "$OUT/3.json"
effusion_hits "$OUT/3.json"
echo "== 4. the entity filter instead: only cases labelled with an effusion, ranked by the pleura embedding"
$BIN/medrag search --index "qdrant+local:$OUT/nih_index" --image "$QUERY" --anatomy pleura --finding effusion \
  -k 5 > "$OUT/4.txt"; show "$OUT/4.txt" 20
echo "== 4b. the finding asked of the image instead of the reports: no filter, so cases without a report count too"
$BIN/medrag search --index "qdrant+local:$OUT/nih_index" --image "$QUERY" --finding effusion --finding-by image \
  -k 8 > "$OUT/4b.txt"; show "$OUT/4b.txt" 40
$BIN/medrag search --index "qdrant+local:$OUT/nih_index" --image "$QUERY" --finding effusion --finding-by image \
  -k 8 --json > "$OUT/4b.json"
effusion_hits "$OUT/4b.json"
ANN=../shared/data/iu_xray_reports/annotation.json
if [ -f "$ANN" ]; then
  echo "== 5. report-only index of the shared IU X-ray validation reports (FAISS), finding-filtered text search"
  $BIN/medrag index manifest r2gen "$ANN" --reports-only --splits val -o "$OUT/iu_val.jsonl" > "$OUT/5a.txt"
  show "$OUT/5a.txt" 1
  $BIN/medrag index build "$OUT/iu_val.jsonl" --index "faiss:$OUT/iu_index" --no-progress > "$OUT/5b.txt"
  show "$OUT/5b.txt" 1
  $BIN/medrag search --index "faiss:$OUT/iu_index" --reports --text "small left pleural effusion" \
    --anatomy "left pleura" --finding effusion --include-uncertain -k 3
fi
COVID=../shared/data/covid_cxr_notes
if [ -f "$COVID/metadata.csv" ]; then
  echo "== 6. draft a comparative report for a real follow-up image with its real prior (COVID-collection notes set)"
  $BIN/medrag index manifest notes "$COVID" -o "$OUT/notes.jsonl" > "$OUT/6a.txt"; show "$OUT/6a.txt" 1
  $BIN/medrag index build "$OUT/notes.jsonl" --index "faiss:$OUT/notes_index" --encoder medrag-native \
    --checkpoint demo/model --text-encoder none --conditioning "lung,left lung,right lung,heart,pleura" \
    --no-progress > "$OUT/6b.txt"; show "$OUT/6b.txt" 1
  # patient 91: aspiration pneumonia, day 0 (prior) and day 3 (current); the patient's own studies are excluded
  $BIN/python - "$OUT/notes.jsonl" aspiration-pneumonia-5-day0 > "$OUT/prior_report.txt" <<'PY'
import json, sys
print(next(json.loads(l)["report"] for l in open(sys.argv[1]) if json.loads(l)["study_id"] == sys.argv[2]))
PY
  echo "prior report (day 0): $(cat "$OUT/prior_report.txt")"
  $BIN/medrag draft --index "faiss:$OUT/notes_index" --image "$COVID/images/aspiration-pneumonia-5-day3.png" \
    --prior-image "$COVID/images/aspiration-pneumonia-5-day0.png" --prior-report "$OUT/prior_report.txt" \
    --prior-study aspiration-pneumonia-5-day0 --prior-date 2000-01-01 --exclude-patient 91 -k 5
else
  echo "== 6. draft a comparative report from retrieved cases (synthetic paired set; extractive drafter)"
  $BIN/medrag eval synth --out "$OUT/synth" -n 200 --seed 7 --size 128 > "$OUT/6a.txt"; tail -n 1 "$OUT/6a.txt"
  $BIN/medrag index build "$OUT/synth/manifest.jsonl" --index "qdrant+local:$OUT/synth_index" --encoder pixels \
    --text-encoder none --conditioning "left lung,right lung,heart" --no-progress > "$OUT/6b.txt"; show "$OUT/6b.txt" 1
  PRIOR=$(sed -n 1p "$OUT/synth/manifest.jsonl" | $BIN/python -c 'import json,sys; print(json.load(sys.stdin)["report"])')
  echo "$PRIOR" > "$OUT/prior_report.txt"
  echo "prior report: $PRIOR"
  $BIN/medrag draft --index "qdrant+local:$OUT/synth_index" --image "$OUT/synth/images/syn00001.png" \
    --prior-report "$OUT/prior_report.txt" --prior-study syn00000 --exclude-patient pat00000 -k 5
fi
