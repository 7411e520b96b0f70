"""Conditioned embedding vs entity filter, per condition; and where the conditioned query looks.

The two mechanisms medrag offers for "similar *in the left lung*" / "cases *with an effusion*":

* **embedding**: the query image embedded with the condition's learned query (RadIR/MedReCo
  style), searched in that condition's space;
* **filter**: only studies whose labels/report state the finding (or any finding in the anatomy),
  ranked by the unconditioned embedding.
* **asked** (findings only, encoders with a label probe): the conditioned query vector *states*
  the finding (``assert_finding``) and no filter applies, so the gallery's reports are never
  read: the image-only stand-in for the filter, for archives without reports.

For each condition, over the queries it concerns (those stating the finding, or a present finding
in the anatomy), four or five rankings are scored on the same queries: global, embedding, filter,
embedding + filter. Metrics: s_a@10 (mean anatomy-restricted similarity of the top 10, the
ground truth of the condition) and, for a finding, P@10 (share of the top 10 stating it). n is
small for some conditions, so every comparison carries a paired-bootstrap 95% interval.

:func:`attention_in_boxes` checks that conditioning means what it says: the share of the
left-lung query's attention inside the radiologist-drawn left-lung box (and the right's in the
right box), against the same query's share in the other lung's box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eval.stats import paired_bootstrap
from retrieval.entities import EntityExtractor, study_labels
from retrieval.imaging.overlay import mass_inside
from retrieval.records import PRESENT, Study
from retrieval.similarity import ReportMatrix
from retrieval.taxonomy import default_taxonomy

MECHANISMS = ("global", "embedding", "asked", "filter", "embedding+filter")


@dataclass(frozen=True)
class Condition:
    name: str  # as shown in the table
    anatomy: str  # the conditioning anatomy searched (the nearest one the model has)
    finding: str | None = None  # None: any present finding within ``truth``
    truth: str | None = None  # the anatomy of the ground truth's s_a (default: ``anatomy``)

    @property
    def about(self) -> str:
        return self.truth or self.anatomy


def finding_conditions(findings: Sequence[str], vocabulary: Sequence[str]) -> list[Condition]:
    """Each finding conditioned on its home anatomy (or the nearest ancestor the model knows)."""
    tax = default_taxonomy()
    out = []
    for name in findings:
        f = tax.finding(name)
        anatomy = next((a for a in tax.ancestors(f.anatomy) if a in vocabulary), None)
        if anatomy is not None:
            out.append(Condition(name, anatomy, f.name))
    return out


def anatomy_conditions(anatomies: Sequence[str], vocabulary: Sequence[str]) -> list[Condition]:
    """Each anatomy searched in its own space, or its nearest ancestor's (a lobe in its lung's)."""
    tax = default_taxonomy()
    out = []
    for a in anatomies:
        space = next((x for x in tax.ancestors(a) if x in vocabulary), None)
        if space is not None:
            out.append(Condition(a, space, None, a))
    return out


def _states(studies: Sequence[Study], cond: Condition) -> np.ndarray:
    """Which studies state the condition's finding present (in the anatomy or any part of it)."""
    tax = default_taxonomy()
    ex = EntityExtractor(tax)
    inside = set(tax.descendants(cond.about))
    out = []
    for s in studies:
        labs = study_labels(s, ex)
        out.append(any(st == PRESENT and (cond.finding is None or k.finding == cond.finding)
                       and (cond.finding is not None or k.anatomy in inside) for k, st in labs.items()))
    return np.array(out)


def condition_scores(studies: Sequence[Study], images: list[np.ndarray], encoder: Any,
                     conditions: Sequence[Condition], k: int = 10) -> dict[str, dict[str, np.ndarray]]:
    """condition -> metric:mechanism -> per-query values (queries = studies stating the condition)."""
    matrix = ReportMatrix.from_studies(studies)

    def emb(anatomy: str | None) -> np.ndarray:
        return np.concatenate([encoder.encode_images(images[i:i + 32], anatomy=anatomy)
                               for i in range(0, len(images), 32)])

    cache: dict[str | None, np.ndarray] = {}
    if hasattr(encoder, "encode_conditions"):  # one tower pass for every condition
        wanted = [None, *sorted({c.anatomy for c in conditions})]
        parts = [encoder.encode_conditions(images[i:i + 32], wanted) for i in range(0, len(images), 32)]
        cache = {a: np.concatenate([p[a] for p in parts]) for a in wanted}
    glob = cache[None] if None in cache else emb(None)
    out: dict[str, dict[str, np.ndarray]] = {}
    for cond in conditions:
        states = _states(studies, cond)
        queries = np.flatnonzero(states)
        if len(queries) < 2:
            continue
        if cond.anatomy not in cache:
            cache[cond.anatomy] = emb(cond.anatomy)
        sim_a = matrix.similarity(cond.about, queries)
        rows: dict[str, np.ndarray] = {}
        for mech in MECHANISMS:
            e = cache[cond.anatomy] if mech.startswith("embedding") or mech == "asked" else glob
            if mech == "asked":
                asked = _asked(encoder, e[queries], cond)
                if asked is None:
                    continue
                scores = asked @ e.T
            else:
                scores = e[queries] @ e.T
            scores[np.arange(len(queries)), queries] = -np.inf
            if mech.endswith("filter"):
                scores[:, ~states] = -np.inf
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            valid = np.isfinite(np.take_along_axis(scores, top, axis=1))
            gains = np.where(valid, np.take_along_axis(sim_a, top, axis=1), np.nan)
            rows[f"s_a@{k}:{mech}"] = np.nanmean(gains, axis=1)
            if cond.finding is not None:
                hit = np.where(valid, states[top], np.nan)
                rows[f"P@{k}:{mech}"] = np.nanmean(hit, axis=1)
        out[cond.name] = rows
    return out


def _asked(encoder: Any, queries: np.ndarray, cond: Condition) -> np.ndarray | None:
    """The queries' vectors stating the condition's finding; None where that cannot be asked."""
    from retrieval.encoders.base import EncoderError, FindingQueries

    if cond.finding is None or not isinstance(encoder, FindingQueries):
        return None
    try:
        out: np.ndarray = encoder.assert_finding(queries, cond.anatomy, cond.finding)
    except EncoderError:
        return None
    return out


def summarise_conditions(per: dict[str, dict[str, np.ndarray]], bootstrap: int = 2000, seed: int = 0
                         ) -> dict[str, Any]:
    """Means per mechanism and paired CIs of embedding - global and embedding - filter (and, where
    the finding could be asked, asked - global and asked - embedding)."""
    result: dict[str, Any] = {}
    for cond, rows in per.items():
        entry: dict[str, Any] = {"queries": int(len(next(iter(rows.values()))))}
        for key, vals in rows.items():
            entry[key] = float(np.nanmean(vals))
        for metric in sorted({k.split(":")[0] for k in rows}):
            e, g, f = rows[f"{metric}:embedding"], rows[f"{metric}:global"], rows[f"{metric}:filter"]
            entry[f"{metric}:embedding-global"] = paired_bootstrap(e, g, bootstrap, seed)
            entry[f"{metric}:embedding-filter"] = paired_bootstrap(e, f, bootstrap, seed)
            if f"{metric}:asked" in rows:
                a = rows[f"{metric}:asked"]
                entry[f"{metric}:asked-global"] = paired_bootstrap(a, g, bootstrap, seed)
                entry[f"{metric}:asked-embedding"] = paired_bootstrap(a, e, bootstrap, seed)
        result[cond] = entry
    return result


def attention_in_boxes(studies: Sequence[Study], images: list[np.ndarray], encoder: Any) -> dict[str, Any]:
    """Share of the left/right-lung queries' attention inside each lung box (images with both boxes).

    Box coordinates are pixels of the image as stored; the patient's left lung is on the image's
    right. Returns means with bootstrap intervals of (own box - other box)."""
    own: dict[str, list[float]] = {"left lung": [], "right lung": []}
    other: dict[str, list[float]] = {"left lung": [], "right lung": []}
    area: dict[str, list[float]] = {"left lung": [], "right lung": []}
    for s, img in zip(studies, images, strict=True):
        meta = (s.image_meta or [{}])[0]
        if "left_lung_box" not in meta or "right_lung_box" not in meta:
            continue
        boxes = {"left lung": meta["left_lung_box"], "right lung": meta["right_lung_box"]}
        h, w = img.shape
        for side, opposite in (("left lung", "right lung"), ("right lung", "left lung")):
            att = encoder.attention_maps([img], anatomy=side)[0]
            own[side].append(mass_inside(att, (h, w), boxes[side]))
            other[side].append(mass_inside(att, (h, w), boxes[opposite]))
            bx = boxes[side]
            area[side].append(min(1.0, bx[2] * bx[3] / (h * w)))
    out: dict[str, Any] = {"images": len(own["left lung"])}
    for side in own:
        a, b = np.array(own[side]), np.array(other[side])
        if len(a) == 0:
            continue
        out[side] = {"attention_in_own_box": float(a.mean()), "attention_in_other_box": float(b.mean()),
                     "own_box_area_share": float(np.mean(area[side])),
                     "own-other": paired_bootstrap(a, b, 2000, 0)}
    return out


def format_conditions(summary: dict[str, Any], k: int = 10) -> str:
    asked = any(key.endswith(":asked") for e in summary.values() for key in e)
    mechs = [m for m in MECHANISMS if asked or m != "asked"]
    lines = [f"{'condition':16s} {'n':>4s} {'metric':7s} " + " ".join(f"{m:>16s}" for m in mechs)
             + "   embedding - global [95% CI]" + ("   asked - global [95% CI]" if asked else "")]

    def ci(d: Any) -> str:
        return f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d is not None else "-"

    for cond, e in summary.items():
        for metric in (f"P@{k}", f"s_a@{k}"):
            if f"{metric}:global" not in e:
                continue
            cells = [f"{e[f'{metric}:{m}']:16.3f}" if f"{metric}:{m}" in e else f"{'-':>16s}" for m in mechs]
            lines.append(f"{cond:16s} {e['queries']:4d} {metric:7s} " + " ".join(cells)
                         + f"   {ci(e[f'{metric}:embedding-global'])}"
                         + (f"   {ci(e.get(f'{metric}:asked-global'))}" if asked else ""))
    return "\n".join(lines)
