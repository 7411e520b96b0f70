"""``medrag eval draft-images``: drafting measured from the image, the task a radiologist has.

Protocol. Every image of a query folder in the shared layout (``labels.csv`` or
``metadata.csv`` beside ``images/``) is drafted exactly as ``medrag draft`` would: the image is
read by the index's encoder (its calibrated probe), analog cases are retrieved from ``index``
(built by the user on *another* folder; the query's own patient and study are excluded too), the
findings table is built and rendered. The drafts' *text* is then read back with the entity
extractor and scored against the query folder's own truth, so what is scored is what a
radiologist would read:

* a labelled folder (NIH): the labels, over the nine findings the report-generation literature
  reports clinical efficacy on (``CE_FINDINGS``), "No Finding" as all absent;
* a notes folder (COVID collection): the entities mined from the image's own note
  (``image_note``, else the case notes); sides are checked against it.

A finding counts as predicted when the draft states it present or hedged ("possible X": a
positive mention, as label extractors treat it). Per finding precision / recall / F1, micro and
macro. Methods, all on the same queries: ``normal template``, ``copy-nearest`` (the nearest
case's report verbatim, or its labels rendered when it has none), ``image reading`` (the table
from the reading alone), ``retrieval`` (from the cases' votes alone), ``both`` (the product's
default); on an index with reports also the ``extractive`` and ``edit`` drafters (safety-gated).
Paired-bootstrap 95% intervals of ``both`` minus the best baseline on macro- and micro-F1
(recomputed from per-query counts on every resample). Safety counts per 100 drafts for every
method (:mod:`retrieval.rag.safety`). Settings compared: none are tuned here; the thresholds
are the checkpoint's (chosen inside its training images), the fusion weight is fixed a priori.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from eval.labelled import load_directory
from eval.stats import paired_bootstrap_totals
from retrieval.entities import EntityExtractor, coarse_labels
from retrieval.imaging.images import ImageLoadError, load_image
from retrieval.imaging.paths import manifest_image
from retrieval.index import open_index
from retrieval.rag import create_generator
from retrieval.rag.context import ContextBuilder, copy_report
from retrieval.rag.draft import case_labels, findings_table, read, source_labels
from retrieval.rag.findings import AnalogCase, FindingsTable, Method, build_table, unsided_labels
from retrieval.rag.safety import KINDS, SafetyChecker, gate
from retrieval.rag.structured import StructuredGenerator
from retrieval.rag.types import Draft, DraftContext, DraftSentence
from retrieval.records import ABSENT, LabelKey, Study
from retrieval.search import CaseHit, Query, Searcher
from retrieval.taxonomy import default_taxonomy

CE_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Mass", "Nodule",
               "Pneumothorax", "Infiltration")
NORMAL_TEMPLATE = "The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal."
BASELINES = ("normal template", "copy-nearest", "image reading", "retrieval")
OURS = "both"


@dataclass
class MethodScores:
    counts: list[list[int]] = field(default_factory=list)  # per query: tp per finding, fp per finding, fn per finding
    safety: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    drafts: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


def ce_keys() -> list[LabelKey]:
    tax = default_taxonomy()
    out = []
    for name in CE_FINDINGS:
        f = tax.finding(name)
        out.append(LabelKey(tax.coarse(f.anatomy), f.name))
    return out


def predicted(text: str, ex: EntityExtractor) -> set[LabelKey]:
    tax = ex.tax
    labels = unsided_labels(coarse_labels(ex.extract(text), tax), tax)
    return {k for k, st in labels.items() if st != ABSENT}


def truth_of(study: Study, ex: EntityExtractor) -> set[LabelKey]:
    tax = ex.tax
    if study.labels is not None:
        return set(source_labels(study.labels, tax))
    return predicted(study.report or "", ex)


def _counts(pred: set[LabelKey], gold: set[LabelKey], keys: Sequence[LabelKey]) -> list[int]:
    tp = [int(k in pred and k in gold) for k in keys]
    fp = [int(k in pred and k not in gold) for k in keys]
    fn = [int(k not in pred and k in gold) for k in keys]
    return tp + fp + fn


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)


def macro_f1(totals: np.ndarray) -> np.ndarray:
    n = totals.shape[-1] // 3
    tp, fp, fn = totals[..., :n], totals[..., n:2 * n], totals[..., 2 * n:]
    return np.asarray(_f1(tp, fp, fn).mean(-1))


def micro_f1(totals: np.ndarray) -> np.ndarray:
    n = totals.shape[-1] // 3
    return np.asarray(_f1(totals[..., :n].sum(-1), totals[..., n:2 * n].sum(-1), totals[..., 2 * n:].sum(-1)))


def _render(table: FindingsTable, ctx: DraftContext) -> Draft:
    return StructuredGenerator().generate(replace(ctx, table=table))


def _copy_nearest(hits: Sequence[CaseHit], ex: EntityExtractor, builder: ContextBuilder, ctx: DraftContext) -> Draft:
    first = next((h for h in hits if h.report or h.labels is not None), None)
    if first is None:
        return Draft(generator="copy-nearest", status="nothing_to_draft", reason="no analog case")
    if first.report:
        case = ContextBuilder().build([(first.study_id, first.score, first.report)]).cases[0]
        return copy_report(case, "copy-nearest", builder)
    labels = case_labels(first, ex, ex.tax) or {}
    t = build_table(None, [AnalogCase(first.study_id, 1.0, labels)], "retrieval")
    return _render(t, ctx)


def evaluate_drafts(folder: str | Path, index_uri: str, out_dir: str | Path, k: int = 5, bootstrap: int = 2000,
                    seed: int = 0, limit: int | None = None, priors: bool = True, device: str = "cpu",
                    progress: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(out_dir)
    manifest, res = load_directory(folder, out)
    studies = list(res.studies)[:limit] if limit else list(res.studies)
    index = open_index(index_uri)
    searcher = Searcher.for_index(index, device=device, load_text=False)
    ex = EntityExtractor()
    checker = SafetyChecker()
    builder = ContextBuilder()
    keys = ce_keys()
    gens = {"extractive": create_generator("extractive"), "edit": create_generator("edit")}
    by_patient: dict[str, list[Study]] = {}
    for s in studies:
        by_patient.setdefault(s.patient_id or s.study_id, []).append(s)
    scores: dict[str, MethodScores] = {}
    problems: list[str] = []
    read_ok = 0
    for i, s in enumerate(studies):
        try:
            img = load_image(manifest_image(manifest, s.images[0]))
        except (ImageLoadError, IndexError) as exc:
            problems.append(f"{s.study_id}: {exc}")
            continue
        prior_imgs: list[np.ndarray] = []
        prior_id = None
        if priors and s.study_date:
            earlier = [p for p in by_patient.get(s.patient_id or s.study_id, [])
                       if p.study_date and p.study_date < s.study_date and p.images]
            if earlier:
                pr = max(earlier, key=lambda p: p.study_date or "")
                try:
                    prior_imgs, prior_id = [load_image(manifest_image(manifest, pr.images[0]))], pr.study_id
                except ImageLoadError:
                    pass
        q = Query(k=k, exclude_patient_id=s.patient_id, exclude_study_id=s.study_id)
        hits = searcher.by_image([img], q).hits
        reading = read(searcher, [img])
        prior_reading = read(searcher, prior_imgs) if prior_imgs else None
        read_ok += reading is not None
        gold = truth_of(s, ex)
        reference = s.report
        ctx = builder.build([(h.study_id, h.score, h.report) for h in hits])
        tables: dict[Method, FindingsTable] = {
            m: findings_table(searcher, [img], hits, m, prior_imgs, None, prior_id, reading=reading,
                              prior_reading=prior_reading)
            for m in ("both", "image", "retrieval")}
        drafts: dict[str, tuple[Draft, FindingsTable]] = {
            "normal template": (Draft(generator="normal", findings=[_plain(t) for t in NORMAL_TEMPLATE.split(". ")]),
                                tables["both"]),
            "copy-nearest": (_copy_nearest(hits, ex, builder, ctx), tables["both"]),
            "image reading": (_render(tables["image"], ctx), tables["image"]),
            "retrieval": (_render(tables["retrieval"], ctx), tables["retrieval"]),
            OURS: (_render(tables["both"], ctx), tables["both"]),
        }
        if ctx.cases:  # analog cases with reports: the sentence-copying drafters too
            for name, g in gens.items():
                d = g.generate(replace(ctx, table=tables["both"]))
                drafts[f"{name} (gated)"] = (gate(d, tables["both"], checker), tables["both"])
        for name, (d, table) in drafts.items():
            m = scores.setdefault(name, MethodScores())
            m.drafts += 1
            text = " ".join(x.text for x in d.sentences()) if d.status == "drafted" else ""
            m.counts.append(_counts(predicted(text, ex) & set(keys), gold & set(keys), keys))
            rep = checker.check(d, table, reference)
            for issue in rep.issues:
                m.safety[issue.kind] += 1
            if rep.issues and len(m.examples) < 5:
                m.examples.append({"study_id": s.study_id, "issues": [(x.kind, x.sentence, x.detail)
                                                                      for x in rep.issues[:3]]})
        if progress and (i + 1) % 20 == 0:
            print(f"  {i + 1}/{len(studies)} drafted", flush=True)
    result = summarise(scores, keys, bootstrap, seed)
    result.update({"folder": str(folder), "index": index_uri, "queries": len(studies) - len(problems),
                   "read_by_image": read_ok, "k": k, "skipped": [*res.skipped, *problems],
                   "settings_compared": 0, "seconds": round(time.perf_counter() - t0, 1)})
    (out / "draft_images.json").write_text(json.dumps(result, indent=1))
    return result


def _plain(text: str) -> DraftSentence:
    return DraftSentence(text.rstrip(".") + ".", ())


def summarise(scores: dict[str, MethodScores], keys: Sequence[LabelKey], bootstrap: int, seed: int
              ) -> dict[str, Any]:
    n = len(keys)
    methods: dict[str, Any] = {}
    arrays = {name: np.asarray(m.counts, dtype=np.float64).reshape(-1, 3 * n) for name, m in scores.items()}
    for name, m in scores.items():
        tot = arrays[name].sum(0)
        tp, fp, fn = tot[:n], tot[n:2 * n], tot[2 * n:]
        per = {}
        for j, key in enumerate(keys):
            p = tp[j] / (tp[j] + fp[j]) if tp[j] + fp[j] else 0.0
            r = tp[j] / (tp[j] + fn[j]) if tp[j] + fn[j] else 0.0
            per[key.finding] = {"precision": round(p, 4), "recall": round(r, 4),
                                "f1": round(float(_f1(tp[j:j + 1], fp[j:j + 1], fn[j:j + 1])[0]), 4),
                                "positives": int(tp[j] + fn[j])}
        methods[name] = {"macro_f1": round(float(macro_f1(tot)), 4), "micro_f1": round(float(micro_f1(tot)), 4),
                         "per_finding": per, "drafts": m.drafts,
                         "safety_per_100": {k: round(100 * v / max(1, m.drafts), 2) for k, v in m.safety.items()},
                         "safety_examples": m.examples}
    base = [b for b in BASELINES if b in methods]
    best = max(base, key=lambda b: methods[b]["macro_f1"]) if base else None
    intervals = {}
    if best and OURS in arrays:
        for metric, fn_ in (("macro_f1", macro_f1), ("micro_f1", micro_f1)):
            d, lo, hi = paired_bootstrap_totals(arrays[OURS], arrays[best], fn_, bootstrap, seed)
            intervals[metric] = {"minus": best, "difference": round(d, 4), "low": round(lo, 4), "high": round(hi, 4)}
    return {"methods": methods, "best_baseline": best, "intervals": intervals,
            "findings": [k.finding for k in keys]}


def format_table(r: dict[str, Any]) -> str:
    keys = r["findings"]
    head = f"{'method':<20} {'macroF1':>7} {'microF1':>7} " + " ".join(f"{k[:6]:>6}" for k in keys)
    lines = [f"drafting from images: {r['queries']} queries of {r['folder']} (read by the image: {r['read_by_image']}),"
             f" analog cases from {r['index']} (k={r['k']}); settings compared here: {r['settings_compared']}",
             "per-finding F1 (a finding counts when the draft states it present or hedged):", head]
    for name, m in r["methods"].items():
        lines.append(f"{name:<20} {m['macro_f1']:>7.3f} {m['micro_f1']:>7.3f} "
                     + " ".join(f"{m['per_finding'][k]['f1']:>6.3f}" for k in keys))
    lines.append("positives: " + ", ".join(f"{k} {r['methods'][OURS]['per_finding'][k]['positives']}"
                                           for k in keys if OURS in r["methods"]))
    for metric, iv in r["intervals"].items():
        lines.append(f"{OURS} minus {iv['minus']} ({metric}): {iv['difference']:+.4f} [{iv['low']:+.4f}, "
                     f"{iv['high']:+.4f}] (paired bootstrap 95%)")
    lines.append("safety per 100 drafts: " + "  ".join(KINDS))
    for name, m in r["methods"].items():
        lines.append(f"{name:<20} " + "  ".join(f"{m['safety_per_100'][k]:.1f}" for k in KINDS))
    return "\n".join(lines)
