"""Held-out-patient check of where the anatomy queries look (issue 26).

The region head is fitted on lung masks; measuring it on the masks it was fitted on would be
in-sample. Here the masked notes-set images are split in two by patient; for each half a model
is trained (`cxr-cpu` on the labelled folder, the region head fitted on the *other* half's masks
only) and the attention regions are measured on the half it never saw. Pooled over both halves.
The probe is switched off (probe_c=0): it does not touch attention, and it is the slow part.

    .venv/bin/python scripts/attention_cv.py ../shared/data/nih_cxr14_sample ../shared/data/covid_cxr_notes runs/attn_cv
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from eval.attention_regions import format_regions, load_masks, region_rows, summarise_regions
from eval.labelled import load_directory, load_images, patient_folds
from indexer.train import PRESETS, train
from retrieval.encoders import create_encoder


def main(train_folder: str, mask_folder: str, out: str, folds: int = 2, region_prior: float = 3.0) -> None:
    work = Path(out)
    manifest, res = load_directory(train_folder, work / "train")
    mman, mres = load_directory(mask_folder, work / "masks")
    studies, images, _ = load_images(mman, mres.studies, 512)
    keep, masks, problems = load_masks(mask_folder, studies, images, mman)
    st = [studies[i] for i in keep]
    im = [images[i] for i in keep]
    fold_of = patient_folds(st, folds, 0)
    rows: dict[str, list[dict[str, float]]] = {}
    area: dict[str, list[float]] = {}
    for f in range(folds):
        held = sorted({s.patient_id or s.study_id for s, k in zip(st, fold_of, strict=True) if k == f})
        cfg = replace(PRESETS["cxr-cpu"], probe_c=0.0, region_masks=mask_folder, region_exclude=tuple(held),
                      region_prior=region_prior)
        tr = train(manifest, work / f"fold{f}", cfg, progress=False)
        enc = create_encoder("medrag-native", checkpoint=tr.out_dir)
        sel = np.flatnonzero(fold_of == f)
        r, a = region_rows([im[i] for i in sel], [masks[i] for i in sel], enc,
                           ["<global>", *[x for x in ("lung", "left lung", "right lung", "heart", "pleura")]])
        for k, v in r.items():
            rows.setdefault(k, []).extend(v)
        for k, v in a.items():
            area.setdefault(k, []).extend(v)
        print(f"fold {f}: {len(sel)} held-out images of {len(held)} patients, trained {tr.seconds:.0f}s", flush=True)
    result = summarise_regions(rows, area)
    result["problems"] = problems
    print(format_regions(result))
    (work / "attention_cv.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
