"""Where each conditioning anatomy's query looks, measured against lung masks.

For every image of a folder that has ``lung_masks/<image stem>.png`` (255 = lung, the size of
its image), the regions of :mod:`retrieval.imaging.lung_regions` are derived from the mask and,
for every anatomy the checkpoint conditions on (and the whole-image query), the share of its
attention in each region is averaged over the images: its own region (lungs inside the mask,
each lung separately, the heart between the lungs in their lower part, the pleura along the lung
margins and costophrenic angles), the abdomen (below the mask's lower edge) and outside the body.
``area`` is the own region's share of the image: what attention spread evenly would score.

Targets (issue 26): abdomen share <= 5 % for every anatomy; own-region share >= 0.6 for the lungs
and the heart. Bad input never stops the run: a mask of another size than its image, an
unreadable mask or one without two lungs is named in ``problems`` and skipped; a folder without
masks gives a result that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eval.stats import bootstrap_indices
from retrieval.imaging.lung_regions import (
    REGIONS,
    MaskError,
    attention_share,
    cell_fractions,
    lung_regions,
)
from retrieval.records import Study

MASK_DIR = "lung_masks"
# the region an anatomy's attention should fall in (None: no region to check, e.g. the whole image)
OWN_REGION: dict[str, str | None] = {
    "<global>": None, "chest": None, "lung": "lung", "left lung": "left lung", "right lung": "right lung",
    "left upper lobe": "left lung", "left lower lobe": "left lung", "right upper lobe": "right lung",
    "right middle lobe": "right lung", "right lower lobe": "right lung", "heart": "heart", "pleura": "pleura",
    "left pleura": "pleura", "right pleura": "pleura", "mediastinum": "mediastinum", "upper abdomen": "abdomen",
}
COLUMNS = ("right lung", "left lung", "heart", "pleura", "abdomen", "outside body")
TARGET_OWN = {"lung": 0.6, "left lung": 0.6, "right lung": 0.6, "heart": 0.6}
TARGET_ABDOMEN = 0.05


def load_masks(folder: str | Path, studies: Sequence[Study], images: Sequence[np.ndarray],
               manifest: str | Path | None = None) -> tuple[list[int], list[np.ndarray], list[str]]:
    """Indices of the studies whose first image has a usable mask, those masks (at the size of the
    image as decoded), and one message per problem (naming the file)."""
    from PIL import Image

    mask_dir = Path(folder) / MASK_DIR
    if not mask_dir.is_dir():
        return [], [], [f"{mask_dir}: no lung masks in this folder (attention regions not measured)"]
    keep, masks, problems = [], [], []
    for i, (s, img) in enumerate(zip(studies, images, strict=True)):
        if not s.images:
            continue
        path = mask_dir / (Path(s.images[0]).stem + ".png")
        if not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                m = np.asarray(im.convert("L"))
            src = _image_size(folder, s, manifest)
            if src is not None and m.shape != src:
                raise MaskError(f"mask is {m.shape[1]}x{m.shape[0]} px, its image {src[1]}x{src[0]}")
            if m.shape != img.shape:  # the image was decoded smaller: the mask follows it
                m = np.asarray(Image.fromarray(m).resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST))
            lung_regions(m)  # a mask that cannot give regions is reported here, not later
        except (OSError, MaskError) as exc:
            problems.append(f"{path}: {exc}; skipped")
            continue
        keep.append(i)
        masks.append(m)
    if not keep:
        problems.append(f"{mask_dir}: no usable mask for any image of this folder")
    return keep, masks, problems


def _image_size(folder: str | Path, study: Study, manifest: str | Path | None) -> tuple[int, int] | None:
    """(H, W) of the study's first image file as stored, or None where it cannot be read."""
    from PIL import Image

    from retrieval.imaging.paths import manifest_image

    rel = study.images[0]
    path = manifest_image(manifest, rel) if manifest else Path(folder) / rel
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError:
        return None


def attention_regions(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], encoder: Any,
                      anatomies: Sequence[str] | None = None, bootstrap: int = 2000, seed: int = 0
                      ) -> dict[str, Any]:
    """Per conditioning anatomy: mean attention share in each region (and the own region, its
    area, a bootstrap interval of the own share and of the abdomen share) over the images."""
    rows, area = region_rows(images, masks, encoder, anatomies)
    return summarise_regions(rows, area, bootstrap, seed)


def region_rows(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], encoder: Any,
                anatomies: Sequence[str] | None = None
                ) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[float]]]:
    """Per anatomy, per image: the attention share in each region; per region, per image: its area."""
    vocab = list(encoder.cfg.anatomies) if anatomies is None else list(anatomies)
    shares: dict[str, list[dict[str, float]]] = {a: [] for a in vocab}
    area: dict[str, list[float]] = {}
    conds: list[str | None] = [None if a == "<global>" else a for a in vocab]
    for img, mask in zip(images, masks, strict=True):
        regions = lung_regions(mask)
        grids: dict[int, np.ndarray] = {}
        maps = (encoder.attention_conditions([img], conds) if hasattr(encoder, "attention_conditions")
                else {c: encoder.attention_maps([img], anatomy=c) for c in conds})
        for a, c in zip(vocab, conds, strict=True):
            att = maps[c][0]
            g = att.shape[-1]
            if g not in grids:
                grids[g] = np.stack([cell_fractions(regions[r], g) for r in REGIONS])
            fr = dict(zip(REGIONS, grids[g], strict=True))
            shares[a].append({r: attention_share(att, fr[r]) for r in REGIONS})
        for r in REGIONS:
            area.setdefault(r, []).append(float(regions[r].mean()))
    return shares, area


def summarise_regions(shares: dict[str, list[dict[str, float]]], area: dict[str, list[float]],
                      bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Means over images per anatomy and region, the own region's share with a bootstrap interval."""
    out: dict[str, Any] = {"images": len(next(iter(area.values()), [])), "anatomies": {}}
    for a, rows in shares.items():
        if not rows:
            continue
        entry: dict[str, Any] = {r: float(np.mean([x[r] for x in rows])) for r in REGIONS}
        own = OWN_REGION.get(a)
        idx = bootstrap_indices(len(rows), bootstrap, seed)
        if own is not None:
            vals = np.array([x[own] for x in rows])
            entry["own_region"] = own
            entry["own"] = float(vals.mean())
            entry["own_ci"] = _ci(vals, idx)
            entry["area"] = float(np.mean(area[own]))
        entry["abdomen_ci"] = _ci(np.array([x["abdomen"] for x in rows]), idx)
        entry["abdomen_max_image"] = float(max(x["abdomen"] for x in rows))
        out["anatomies"][a] = entry
    return out


def _ci(vals: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    means = vals[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def format_regions(result: dict[str, Any]) -> str:
    """The attention-region table: one row per anatomy, shares in each region, targets marked."""
    if not result.get("anatomies"):
        return "\n".join(["attention regions: not measured"] + [f"  {p}" for p in result.get("problems", [])])
    head = (f"{'anatomy':12s} {'own region':>12s} {'own':>6s} {'[95% CI]':>14s} {'area':>5s} "
            + " ".join(f"{c[:10]:>10s}" for c in COLUMNS) + "  target")
    lines = [f"attention in regions ({result['images']} images with lung masks; share of each query's attention; "
             "'area' = the own region's share of the image; targets: abdomen <= 0.05 for every anatomy, "
             "own >= 0.6 for lungs and heart):", head]
    for a, e in result["anatomies"].items():
        own = (f"{e['own_region'][:12]:>12s} {e['own']:6.3f} [{e['own_ci'][0]:.3f}, {e['own_ci'][1]:.3f}] "
               f"{e['area']:5.3f}") if "own" in e else f"{'-':>12s} {'':6s} {'':14s} {'':5s}"
        ok = [e["abdomen"] <= TARGET_ABDOMEN]
        if a in TARGET_OWN and "own" in e:
            ok.append(e["own"] >= TARGET_OWN[a])
        lines.append(f"{a[:12]:12s} {own} " + " ".join(f"{e[c]:10.3f}" for c in COLUMNS)
                     + ("  met" if all(ok) else "  NOT met"))
    lines += [f"  {p}" for p in result.get("problems", [])]
    return "\n".join(lines)
