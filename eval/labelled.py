"""Image retrieval on labelled real radiographs: the table a radiologist can judge.

Ground truth is label-set similarity: s over (coarse anatomy, finding) label keys, the same s_a
as report-mined similarity (:func:`retrieval.similarity.agreement`). With labels that list
positives only (NIH ChestX-ray14), s is exactly the Jaccard index of the two label sets and two
normal studies agree fully; so **Jaccard@10** (mean s of the top 10, the query excluded) is
RateScore@10. Why s and not plain Jaccard: the notes set has hedged and negated statements, and
one formula for both sets keeps them comparable.

Per finding: **precision@10** over the queries that have the finding, against its **base rate**
in the gallery (what a random ranking gets), and **AP@10**. Every method is scored on the same
queries, so differences are paired: 95% confidence intervals come from a paired bootstrap over
queries. Baselines in every run: random, raw pixels, frozen ImageNet EfficientNet-Lite0.

Two commands use this module: ``medrag eval cxr DIR --checkpoint C`` scores any folder in the
shared layout with a trained checkpoint (queries and gallery both from DIR), and
``medrag eval cxr-cv DIR`` trains and scores 5 folds split by patient (the table in the README).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from eval.conditioning import (
    Condition,
    anatomy_conditions,
    attention_in_boxes,
    condition_scores,
    finding_conditions,
    format_conditions,
    summarise_conditions,
)
from eval.graded import GRADED_K, grade_matrix, graded_at_k, graded_bounds
from eval.stats import paired_bootstrap
from indexer.manifest import write_manifest
from indexer.sources import SourceResult
from indexer.sources.labelled import from_labels_csv, from_notes_csv
from retrieval.entities import EntityExtractor, study_labels
from retrieval.imaging.images import ImageLoadError, load_image
from retrieval.imaging.paths import manifest_image
from retrieval.records import PRESENT, Study
from retrieval.similarity import ReportMatrix
from retrieval.taxonomy import default_taxonomy

NIH_FINDINGS = ("Effusion", "Cardiomegaly", "Pneumothorax", "Nodule", "Mass", "Atelectasis", "Consolidation",
                "Infiltration")
Embed = Callable[[list[np.ndarray]], np.ndarray]  # images -> (n, d) unit rows


@dataclass(frozen=True)
class CxrEvalConfig:
    k: int = 10
    findings: tuple[str, ...] = NIH_FINDINGS  # per-finding rows (dataset or taxonomy names)
    bootstrap: int = 2000  # paired bootstrap resamples for the confidence intervals
    seed: int = 0
    image_side: int = 512  # images are decoded once at this size at most
    settings_compared: int = 1  # training settings compared on these data before this table (printed with it)


@dataclass
class QueryScores:
    """Per-query values of one method (NaN where a query does not count)."""

    jaccard: np.ndarray  # (n,) mean s of the top k
    precision: dict[str, np.ndarray] = field(default_factory=dict)  # finding -> (n,) P@k, NaN w/o finding
    ap: dict[str, np.ndarray] = field(default_factory=dict)  # finding -> (n,) AP@k
    graded: np.ndarray | None = None  # (n,) mean severity agreement of the top k (eval/graded.py), NaN unscored
    by_class: dict[str, np.ndarray] = field(default_factory=dict)  # class -> (n,) same-class P@k (eval/classes.py)


# ---- data ----------------------------------------------------------------------------------------
def load_directory(folder: str | Path, out: str | Path) -> tuple[Path, SourceResult]:
    """A folder in the shared layout -> a manifest written under ``out``; labels.csv or metadata.csv."""
    folder, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    if (folder / "labels.csv").is_file():
        res = from_labels_csv(folder, manifest)
    elif (folder / "metadata.csv").is_file():
        res = from_notes_csv(folder, manifest)
    else:
        raise FileNotFoundError(f"{folder}: expected labels.csv (labelled images) or metadata.csv (images with notes)")
    write_manifest(manifest, res.studies)
    return manifest, res


def load_images(manifest: Path, studies: Sequence[Study], side: int) -> tuple[list[Study], list[np.ndarray], list[str]]:
    """First image of each study (frontal sets have one), decoded once; unreadable ones reported."""
    from retrieval.encoders.preprocess import resize

    kept, images, problems = [], [], []
    for s in studies:
        if not s.images:
            continue
        try:
            arr = load_image(manifest_image(manifest, s.images[0]))
        except ImageLoadError as exc:
            problems.append(str(exc))
            continue
        h, w = arr.shape
        if max(h, w) > side:
            arr = resize(arr, side)
        kept.append(s)
        images.append(arr)
    return kept, images, problems


def finding_sets(studies: Sequence[Study], names: Sequence[str]) -> dict[str, np.ndarray]:
    """For each requested finding, which studies state it present: (n,) bool."""
    tax = default_taxonomy()
    ex = EntityExtractor(tax)
    present = [{k.finding for k, st in study_labels(s, ex).items() if st == PRESENT} for s in studies]
    out = {}
    for name in names:
        f = tax.finding(name).name
        out[name] = np.array([f in p for p in present])
    return out


# ---- metrics ------------------------------------------------------------------------------------
def query_scores(sim: np.ndarray, scores: np.ndarray, has: dict[str, np.ndarray], k: int) -> QueryScores:
    """Per-query Jaccard@k (mean s of the top k), P@k and AP@k per finding; the query excluded."""
    n = len(sim)
    sc = scores.astype(np.float64).copy()
    np.fill_diagonal(sc, -np.inf)
    top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    out = QueryScores(jaccard=np.take_along_axis(sim, top, axis=1).mean(1))
    for name, mask in has.items():
        rel = mask[top]  # (n, k) hit has the finding
        prec = rel.mean(1)
        n_rel = np.minimum(mask.sum() - mask.astype(int), k)  # relevant in the gallery, query excluded
        cum = np.cumsum(rel, axis=1) / np.arange(1, k + 1)
        ap = np.where(n_rel > 0, (cum * rel).sum(1) / np.maximum(n_rel, 1), np.nan)
        out.precision[name] = np.where(mask, prec, np.nan)
        out.ap[name] = np.where(mask, ap, np.nan)
    del n
    return out


def _mean_or_nan(values: list[float]) -> float:
    """mAP over the findings that have queries; NaN (not a warning) when none has."""
    return float(np.mean(values)) if values else float("nan")


def base_rates(has: dict[str, np.ndarray]) -> dict[str, float]:
    """Expected P@k of a random ranking for queries with the finding: (count - 1) / (n - 1)."""
    return {name: float((m.sum() - 1) / max(len(m) - 1, 1)) if m.any() else float("nan") for name, m in has.items()}


def summarise(per_method: dict[str, QueryScores], has: dict[str, np.ndarray], cfg: CxrEvalConfig,
              reference: str | None) -> dict[str, Any]:
    """Means per method, base rates, and paired CIs of ``reference`` minus every other method."""
    rows: dict[str, Any] = {}
    for m, qs in per_method.items():
        rows[m] = {"jaccard@k": float(np.nanmean(qs.jaccard)),
                   "precision@k": {f: float(np.nanmean(v)) if np.isfinite(v).any() else None
                                   for f, v in qs.precision.items()},
                   "map@k": _mean_or_nan([np.nanmean(v) for v in qs.ap.values() if np.isfinite(v).any()]),
                   "ap@k": {f: float(np.nanmean(v)) if np.isfinite(v).any() else None for f, v in qs.ap.items()}}
        if qs.by_class:
            rows[m]["class_precision@k"] = {c: float(np.nanmean(v)) for c, v in qs.by_class.items()}
        if qs.graded is not None and np.isfinite(qs.graded).any():
            rows[m]["graded@k"] = float(np.nanmean(qs.graded))
            rows[m]["graded_queries"] = int(np.isfinite(qs.graded).sum())
    diffs: dict[str, Any] = {}
    if reference in per_method:
        ref = per_method[reference]
        for m, qs in per_method.items():
            if m == reference:
                continue
            d: dict[str, Any] = {"jaccard@k": paired_bootstrap(ref.jaccard, qs.jaccard, cfg.bootstrap, cfg.seed)}
            for f in has:
                d[f"precision@k:{f}"] = paired_bootstrap(ref.precision[f], qs.precision[f], cfg.bootstrap, cfg.seed)
            if ref.graded is not None and qs.graded is not None:
                d["graded@k"] = paired_bootstrap(ref.graded, qs.graded, cfg.bootstrap, cfg.seed)
            for c, v in ref.by_class.items():
                d[f"class_precision@k:{c}"] = paired_bootstrap(v, qs.by_class[c], cfg.bootstrap, cfg.seed)
            diffs[f"{reference} - {m}"] = d
    return {"methods": rows, "base_rate": base_rates(has), "queries_with": {f: int(m.sum()) for f, m in has.items()},
            "paired_differences": diffs}


# ---- methods ------------------------------------------------------------------------------------
def baseline_methods(device: str = "cpu") -> dict[str, Embed | None]:
    """random (None: random scores), raw pixels, frozen ImageNet Lite0."""
    from retrieval.encoders import create_encoder

    pixels = create_encoder("pixels", size=32)
    methods: dict[str, Embed | None] = {"random": None, "pixels": lambda ims: pixels.encode_images(ims)}
    lite = create_encoder("imagenet-lite0", device=device)
    methods["imagenet-lite0 (frozen)"] = lambda ims: _batched(lite.encode_images, ims)
    return methods


def checkpoint_method(checkpoint: str | Path, device: str = "cpu", anatomy: str | None = None) -> Embed:
    from retrieval.encoders import create_encoder

    enc = create_encoder("medrag-native", checkpoint=checkpoint, device=device)
    return lambda ims: _batched(lambda b: enc.encode_images(b, anatomy=anatomy), ims)


def _batched(fn: Callable[[list[np.ndarray]], np.ndarray], images: list[np.ndarray], size: int = 32) -> np.ndarray:
    return np.concatenate([fn(images[i:i + size]) for i in range(0, len(images), size)])


def score_methods(studies: Sequence[Study], images: list[np.ndarray], methods: dict[str, Embed | None],
                  cfg: CxrEvalConfig, classes: np.ndarray | None = None
                  ) -> tuple[dict[str, QueryScores], dict[str, np.ndarray], np.ndarray]:
    sim = ReportMatrix.from_studies(studies).similarity(None)
    has = finding_sets(studies, cfg.findings)
    grades = grade_matrix(studies) if any(s.scores for s in studies) else None
    rng = np.random.default_rng(cfg.seed)
    out = {}
    for name, embed in methods.items():
        if embed is None:
            scores = rng.random((len(studies), len(studies)))
        else:
            emb = embed(images)
            scores = emb @ emb.T
        out[name] = query_scores(sim, scores, has, cfg.k)
        if grades is not None:
            out[name].graded = graded_at_k(studies, scores, GRADED_K, grades)
        if classes is not None:
            from eval.classes import class_precision

            out[name].by_class = class_precision(scores, classes, cfg.k)
    return out, has, sim


def _concat(parts: list[QueryScores]) -> QueryScores:
    graded = None
    if any(p.graded is not None for p in parts):  # a fold without scored studies counts as NaN
        graded = np.concatenate([p.graded if p.graded is not None else np.full(len(p.jaccard), np.nan)
                                 for p in parts])
    return QueryScores(np.concatenate([p.jaccard for p in parts]),
                       {f: np.concatenate([p.precision[f] for p in parts]) for f in parts[0].precision},
                       {f: np.concatenate([p.ap[f] for p in parts]) for f in parts[0].ap}, graded)


# ---- the two commands ---------------------------------------------------------------------------
def score_directory(folder: str | Path, checkpoint: str | Path | None, out_dir: str | Path,
                    cfg: CxrEvalConfig | None = None, device: str = "cpu") -> dict[str, Any]:
    """Score every method on one folder (queries and gallery both from it)."""
    cfg = cfg or CxrEvalConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    manifest, res, studies, images, problems, cfg = _prepare(folder, out, cfg)
    methods = baseline_methods(device)
    if checkpoint:
        methods["trained"] = checkpoint_method(checkpoint, device)
    from eval.classes import class_base_rates, study_classes

    classes, class_problems = study_classes(folder, studies)
    per, has, _ = score_methods(studies, images, methods, cfg, classes)
    extra: dict[str, Any] = {}
    if classes is not None:
        extra["class_base_rate"] = class_base_rates(classes)
        extra["class_queries"] = {c: int((classes == c).sum()) for c in extra["class_base_rate"]}
        extra["class_problems"] = class_problems
    if any(s.scores for s in studies):
        extra["graded"] = graded_bounds(studies)
    if checkpoint:
        enc = _native(checkpoint, device)
        per_cond = condition_scores(studies, images, enc, _conditions(enc, cfg, res))
        extra["conditions"] = summarise_conditions(per_cond, cfg.bootstrap, cfg.seed)
        extra["attention_in_boxes"] = attention_in_boxes(
            [s for s in studies if s.image_meta], [im for s, im in zip(studies, images, strict=True) if s.image_meta],
            enc)
        extra["attention_regions"] = _attention_regions(folder, manifest, studies, images, enc, cfg)
    result = {"folder": str(folder), "checkpoint": str(checkpoint) if checkpoint else None, "studies": len(studies),
              "k": cfg.k, "skipped": res.skipped + problems, "warnings": res.warnings,
              "settings_compared": cfg.settings_compared,
              **summarise(per, has, cfg, "trained" if checkpoint else None), **extra,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "cxr_eval.json").write_text(json.dumps(result, indent=1))
    return result


def cross_validate(folder: str | Path, train_cfg: Any, out_dir: str | Path, folds: int = 5,
                   cfg: CxrEvalConfig | None = None, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Train on k-1 folds and score the held-out fold (split by patient), for every fold; pool the
    held-out queries. Only this is used to choose settings: held-out data is never looked at."""
    from indexer.train import train

    cfg = cfg or CxrEvalConfig()
    t0 = time.perf_counter()
    out = Path(out_dir)
    manifest, res, studies, images, problems, cfg = _prepare(folder, out, cfg)
    fold_of = patient_folds(studies, folds, cfg.seed)
    parts: dict[str, list[QueryScores]] = {}
    cond_parts: dict[str, dict[str, list[np.ndarray]]] = {}
    boxes: list[tuple[Study, np.ndarray, int]] = []
    has_parts: dict[str, list[np.ndarray]] = {f: [] for f in cfg.findings}
    fold_info = []
    fold_attention: list[dict[str, Any]] = []
    baselines = baseline_methods(device)
    for f in range(folds):
        test = np.flatnonzero(fold_of == f)
        train_studies = [studies[i] for i in np.flatnonzero(fold_of != f)]
        tr = train(manifest, out / f"fold{f}", replace(train_cfg, device=device), progress=progress,
                   studies=train_studies)
        methods = {**baselines, "trained": checkpoint_method(tr.out_dir, device)}
        test_studies, test_images = [studies[i] for i in test], [images[i] for i in test]
        per, has, _ = score_methods(test_studies, test_images, methods, cfg)
        enc = _native(tr.out_dir, device)
        for cond, rows in condition_scores(test_studies, test_images, enc, _conditions(enc, cfg, res)).items():
            for key, vals in rows.items():
                cond_parts.setdefault(cond, {}).setdefault(key, []).append(vals)
        boxes += [(s, im, f) for s, im in zip(test_studies, test_images, strict=True) if s.image_meta]
        attention = attention_in_boxes([b[0] for b in boxes if b[2] == f], [b[1] for b in boxes if b[2] == f], enc)
        fold_attention.append(attention)
        for m, qs in per.items():
            parts.setdefault(m, []).append(qs)
        for name in cfg.findings:
            has_parts[name].append(has[name])
        fold_info.append({"fold": f, "train": len(train_studies), "test": int(len(test)),
                          "train_seconds": round(tr.seconds, 1)})
    per_all = {m: _concat(p) for m, p in parts.items()}
    has_all = {name: np.concatenate(v) for name, v in has_parts.items()}
    summary = summarise(per_all, has_all, cfg, "trained")
    # base rates differ per fold gallery: report the query-weighted mean of the fold base rates
    summary["base_rate"] = _pooled_base_rate(has_parts)
    pooled = {c: {k: np.concatenate(v) for k, v in rows.items()} for c, rows in cond_parts.items()}
    summary["conditions"] = summarise_conditions(pooled, cfg.bootstrap, cfg.seed)
    summary["attention_in_boxes"] = _pool_attention(fold_attention)
    result = {"folder": str(folder), "studies": len(studies), "folds": fold_info, "k": cfg.k,
              "train_config": _jsonable(train_cfg), "skipped": res.skipped + problems, "warnings": res.warnings,
              **summary, "seconds": round(time.perf_counter() - t0, 1)}
    (out / "cxr_cv.json").write_text(json.dumps(result, indent=1))
    return result


def _prepare(folder: str | Path, out: Path, cfg: CxrEvalConfig
             ) -> tuple[Path, SourceResult, list[Study], list[np.ndarray], list[str], CxrEvalConfig]:
    """The folder's manifest (under ``out``), its decoded images and the findings it can score."""
    manifest, res = load_directory(folder, out)
    studies, images, problems = load_images(manifest, res.studies, cfg.image_side)
    return manifest, res, studies, images, problems, _findings_present(cfg, studies)


REGION_ANATOMIES = ("<global>", "lung", "left lung", "right lung", "heart", "pleura")


def _attention_regions(folder: str | Path, manifest: Path, studies: Sequence[Study], images: list[np.ndarray],
                       enc: Any, cfg: CxrEvalConfig) -> dict[str, Any]:
    """Where each anatomy's query looks, on the folder's lung masks (eval/attention_regions.py);
    a folder without masks, or bad masks, are named in ``problems`` and the run goes on."""
    from eval.attention_regions import attention_regions, load_masks

    keep, masks, problems = load_masks(folder, studies, images, manifest)
    if not keep:
        return {"images": 0, "anatomies": {}, "problems": problems}
    vocab = [a for a in REGION_ANATOMIES if a == "<global>" or a in enc.cfg.anatomies]
    out = attention_regions([images[i] for i in keep], masks, enc, vocab, cfg.bootstrap, cfg.seed)
    out["problems"] = problems
    return out


def _native(checkpoint: str | Path, device: str) -> Any:
    from retrieval.encoders import create_encoder

    return create_encoder("medrag-native", checkpoint=checkpoint, device=device)


LUNG_PARTS = ("left lung", "right lung", "left upper lobe", "left lower lobe", "right upper lobe",
              "right middle lobe", "right lower lobe")


def _conditions(enc: Any, cfg: CxrEvalConfig, res: SourceResult) -> list[Condition]:
    """Findings on a labelled set; lungs and lobes on a notes set (where reports name sides)."""
    vocab = [a for a in enc.cfg.anatomies if a != "<global>"]
    if any(s.labels is not None for s in res.studies):
        return finding_conditions(cfg.findings, vocab)
    return anatomy_conditions(LUNG_PARTS, vocab)


def _pool_attention(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Image-weighted means of the per-fold attention-in-box shares (intervals stay per fold)."""
    n = sum(f.get("images", 0) for f in folds)
    out: dict[str, Any] = {"images": n, "per_fold": folds}
    for side in ("left lung", "right lung"):
        rows = [(f["images"], f[side]) for f in folds if side in f]
        if rows:
            w = sum(r[0] for r in rows)
            out[side] = {k: sum(r[0] * r[1][k] for r in rows) / w
                         for k in ("attention_in_own_box", "attention_in_other_box", "own_box_area_share")}
    return out


def patient_folds(studies: Sequence[Study], folds: int, seed: int) -> np.ndarray:
    """Fold of each study; all studies of a patient share a fold (seeded shuffle of patients)."""
    groups = [s.patient_id or s.study_id for s in studies]
    uniq = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(uniq))
    fold_of_group = {uniq[j]: i % folds for i, j in enumerate(order)}
    return np.array([fold_of_group[g] for g in groups])


def _pooled_base_rate(has_parts: dict[str, list[np.ndarray]]) -> dict[str, float]:
    out = {}
    for name, parts in has_parts.items():
        num = sum(float(m.sum()) * base_rates({name: m})[name] for m in parts if m.any())
        den = sum(float(m.sum()) for m in parts)
        out[name] = num / den if den else float("nan")
    return out


def _findings_present(cfg: CxrEvalConfig, studies: Sequence[Study]) -> CxrEvalConfig:
    """Keep the per-finding rows the data can speak to (the notes set mines its own findings)."""
    from retrieval.taxonomy import UnknownTermError

    tax = default_taxonomy()
    names = []
    for n in cfg.findings:
        try:
            tax.finding(n)
        except UnknownTermError:
            continue
        names.append(n)
    has = finding_sets(studies, names)
    return replace(cfg, findings=tuple(n for n in names if has[n].sum() >= 2))


def _jsonable(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else obj


def _format_graded(result: dict[str, Any]) -> list[str]:
    """The severity-agreement rows (eval/graded.py), where the folder has scored images."""
    rows = {m: r["graded@k"] for m, r in result["methods"].items() if r.get("graded@k") is not None}
    if not rows:
        return []
    b = result.get("graded") or {}
    kk = b.get("k", GRADED_K)
    n = next(r.get("graded_queries") for r in result["methods"].values() if r.get("graded@k") is not None)
    head = (f"severity agreement@{kk} (radiologists' scores; scored queries vs other patients' scored images"
            f"{'' if n is None else f', {n} queries'}"
            + (f"; random expects {b['random_expected']:.3f}, best possible {b['oracle']:.3f}"
               if b.get("queries") else "") + "):")
    lines = ["", head] + [f"  {m:26s} {v:.3f}" for m, v in rows.items()]
    for pair, d in result.get("paired_differences", {}).items():
        if "graded@k" in d and np.isfinite(d["graded@k"][0]):
            g = d["graded@k"]
            lines.append(f"  {pair}: {g[0]:+.3f} [{g[1]:+.3f}, {g[2]:+.3f}]")
    return lines


def _format_classes(result: dict[str, Any]) -> list[str]:
    """Same-class precision@k per class (eval/classes.py), where the folder names classes."""
    base = result.get("class_base_rate")
    if not base:
        return []
    k = result["k"]
    names = list(base)
    lines = ["", f"same-class P@{k} by class (queries: " + ", ".join(f"{c} {result['class_queries'][c]}" for c in names)
             + f"; settings compared: {result.get('settings_compared', 1)}):",
             f"{'method':26s} " + " ".join(f"{c:>10s}" for c in names),
             f"{'base rate':26s} " + " ".join(f"{base[c]:10.3f}" for c in names)]
    for m, row in result["methods"].items():
        if "class_precision@k" in row:
            lines.append(f"{m:26s} " + " ".join(f"{row['class_precision@k'][c]:10.3f}" for c in names))
    for pair, d in result.get("paired_differences", {}).items():
        cells = [f"{c} {d[f'class_precision@k:{c}'][0]:+.3f} [{d[f'class_precision@k:{c}'][1]:+.3f}, "
                 f"{d[f'class_precision@k:{c}'][2]:+.3f}]" for c in names if f"class_precision@k:{c}" in d]
        if cells:
            lines.append(f"  {pair}: " + "; ".join(cells))
    problems = result.get("class_problems") or []
    lines += [f"  {p}" for p in problems[:20]] + ([f"  ... {len(problems) - 20} more"] if len(problems) > 20 else [])
    return lines


def format_table(result: dict[str, Any]) -> str:
    """Methods as rows: Jaccard@k, mAP@k and P@k per finding (base rate in the header)."""
    k = result["k"]
    names = list(result["base_rate"])
    head = f"{'method':26s} {'Jacc@' + str(k):>8s} {'mAP@' + str(k):>7s} " + " ".join(f"{n[:11]:>11s}" for n in names)
    lines = [head, f"{'base rate (P@k)':26s} {'':>8s} {'':>7s} " +
             " ".join(f"{result['base_rate'][n]:11.3f}" for n in names)]
    for m, row in result["methods"].items():
        lines.append(f"{m:26s} {row['jaccard@k']:8.4f} {row['map@k']:7.4f} " +
                     " ".join(f"{(row['precision@k'][n] if row['precision@k'][n] is not None else float('nan')):11.3f}"
                              for n in names))
    for pair, d in result.get("paired_differences", {}).items():
        j = d["jaccard@k"]
        lines.append(f"  {pair}: Jaccard@{k} {j[0]:+.4f} [{j[1]:+.4f}, {j[2]:+.4f}]; " + "; ".join(
            f"P@{k} {n} {d[f'precision@k:{n}'][0]:+.3f} [{d[f'precision@k:{n}'][1]:+.3f}, {d[f'precision@k:{n}'][2]:+.3f}]"
            for n in names[:2]))
    lines.append("queries with each finding: " + ", ".join(f"{n} {c}" for n, c in result["queries_with"].items()))
    lines.append(f"settings compared on these data before this table: {result.get('settings_compared', 1)} "
                 "(1 = the checkpoint's settings were fixed before scoring)")
    lines += _format_classes(result)
    lines += _format_graded(result)
    if result.get("conditions"):
        lines += ["", "conditioned search (per condition; eval/conditioning.py):",
                  format_conditions(result["conditions"], k)]
    if result.get("attention_regions"):
        from eval.attention_regions import format_regions

        lines += ["", format_regions(result["attention_regions"])]
    return "\n".join(lines)
