"""A clearly-labelled synthetic paired set: frontal "chest" images and reports from one truth.

Why: no chest X-rays with reports are on these machines, yet the trainer must be shown to learn
*anatomy-conditioned* similarity. Each study draws findings in known places (left/right lower-zone
opacity, left/right effusion at the costophrenic angle, cardiomegaly, left/right upper-zone
nodule); the image renders exactly those, the report states exactly those (and some negatives),
so report-mined similarity is the true answer and a conditioned ranking can be checked.

Images vary by patient (lung size, position, exposure, noise), so pixels alone do not solve it.
Nothing here resembles real anatomy closely; it tests the learning machinery, not radiology.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.manifest import write_manifest
from retrieval.records import Study

FINDINGS = {  # name -> (report phrase when present, negative phrase, probability)
    "left_opacity": ("Patchy opacity in the left lower lobe.", None, 0.3),
    "right_opacity": ("Patchy opacity in the right lower lobe.", None, 0.3),
    "left_effusion": ("Small left pleural effusion.", None, 0.25),
    "right_effusion": ("Small right pleural effusion.", None, 0.25),
    "cardiomegaly": ("The heart is enlarged.", "Heart size is normal.", 0.3),
    "left_nodule": ("Nodule in the left upper lobe.", None, 0.2),
    "right_nodule": ("Nodule in the right upper lobe.", None, 0.2),
}


@dataclass(frozen=True)
class SynthStudy:
    study_id: str
    patient_id: str
    truth: dict[str, bool]
    report: str


def render(truth: dict[str, bool], rng: np.random.Generator, size: int = 160) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    dx, dy = rng.normal(0, 0.02, 2)
    scale = rng.uniform(0.9, 1.1)
    img = rng.uniform(0.65, 0.8) + 0.04 * rng.standard_normal((size, size))
    lungs = {}
    for side, cx in (("right", 0.3), ("left", 0.7)):  # patient's left is the image's right
        m = (((xx - cx - dx) / (0.17 * scale)) ** 2 + ((yy - 0.5 - dy) / (0.33 * scale)) ** 2) < 1
        lungs[side] = m
        img -= rng.uniform(0.4, 0.5) * m
    heart_w = 0.19 if truth["cardiomegaly"] else 0.12
    img += 0.3 * ((((xx - 0.56 - dx) / (heart_w * scale)) ** 2 + ((yy - 0.68 - dy) / (0.12 * scale)) ** 2) < 1)
    for side, cx in (("right", 0.3), ("left", 0.7)):
        if truth[f"{side}_opacity"]:
            ox, oy = cx + rng.normal(0, 0.03), 0.64 + rng.normal(0, 0.03)
            blob = np.exp(-(((xx - ox - dx) / 0.08) ** 2 + ((yy - oy - dy) / 0.07) ** 2))
            img += 0.35 * blob * lungs[side]
        if truth[f"{side}_effusion"]:
            level = 0.74 + rng.normal(0, 0.02)
            img += 0.4 * (lungs[side] & (yy - dy > level + 0.05 * np.abs(xx - cx - dx)))
        if truth[f"{side}_nodule"]:
            nx, ny = cx + rng.normal(0, 0.03), 0.32 + rng.normal(0, 0.03)
            img += 0.45 * ((((xx - nx - dx) / 0.03) ** 2 + ((yy - ny - dy) / 0.03) ** 2) < 1)
    return np.clip(img, 0, 1).astype(np.float32)


def write_report(truth: dict[str, bool], rng: np.random.Generator) -> str:
    parts = []
    for name, (pos, neg, _) in FINDINGS.items():
        if truth[name]:
            parts.append(pos)
        elif neg:
            parts.append(neg)
    lung = [k for k in ("left_opacity", "right_opacity", "left_nodule", "right_nodule") if truth[k]]
    if not lung:
        parts.append("The lungs are clear.")
    if not (truth["left_effusion"] or truth["right_effusion"]):
        parts.append(rng.choice(["No pleural effusion.", "No effusion or pneumothorax."]))
    rng.shuffle(parts)
    return " ".join(parts)


def generate(out_dir: str | Path, n_studies: int = 600, seed: int = 0, size: int = 160,
             studies_per_patient: int = 2) -> Path:
    """Write ``images/*.png`` and ``manifest.jsonl`` (+ ``truth.jsonl``) under ``out_dir``."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    studies, truths = [], []
    base = dt.date(2020, 1, 1)
    for i in range(n_studies):
        truth = {k: bool(rng.random() < p) for k, (_, _, p) in FINDINGS.items()}
        sid, pid = f"syn{i:05d}", f"pat{i // studies_per_patient:05d}"
        img = render(truth, rng, size)
        rel = f"images/{sid}.png"
        Image.fromarray((img * 255).astype(np.uint8), mode="L").save(out / rel)
        date = (base + dt.timedelta(days=int(rng.integers(0, 900)))).isoformat()
        studies.append(Study(study_id=sid, images=[rel], report=write_report(truth, rng), patient_id=pid,
                             study_date=date, modality="CR", view=["PA"]))
        truths.append({"study_id": sid, **truth})
    write_manifest(out / "manifest.jsonl", studies)
    import json

    (out / "truth.jsonl").write_text("".join(json.dumps(t) + "\n" for t in truths))
    return out / "manifest.jsonl"
