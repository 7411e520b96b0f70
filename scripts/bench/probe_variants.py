"""What else was tried for the `cxr-cpu` label probe, on the same 5 patient folds as `medrag eval cxr-cv`.

Usage: .venv/bin/python scripts/bench/probe_variants.py ../shared/data/nih_cxr14_sample --out runs/probe_variants

The trained encoder's ranking is, to within noise, the probe's (README, "Real chest X-rays"), so
variants of the probe's *features* and of the *retrieval vector* it yields are compared here on
frozen EfficientNet-Lite0 features computed once (cached under --out): pooled at 224/320/448 px,
atlas-region pooling (heart, both bases), max pooling, training-time augmentation (4 views,
rotation/scale/shift/contrast/gamma, never a flip) with test-time averaging, late fusion with raw
pixels, and centred / logit / sparse readouts. Every row is probe-only (no attention head) and
gets paired-bootstrap intervals against raw pixels and frozen ImageNet on the pooled held-out
queries.

The last block asks *why* per-finding P@10 stays low: for the queries with a finding, ranking the
held-out gallery by the probe's probability of that very finding (what a query that *states*
the finding can do: `--finding-by image`) against the whole-profile ranking of an unconditioned
query, which must first read the finding in the query image itself.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from eval.labelled import (
    CxrEvalConfig,
    QueryScores,
    _concat,
    _prepare,
    finding_sets,
    patient_folds,
    query_scores,
)
from eval.stats import paired_bootstrap
from retrieval.encoders.atlas import BOXES
from retrieval.encoders.base import l2_normalise as l2
from retrieval.encoders.preprocess import resize
from retrieval.entities import EntityExtractor
from retrieval.records import PRESENT
from retrieval.similarity import ReportMatrix, study_labels
from retrieval.taxonomy import default_taxonomy

REGIONS = {"heart": BOXES["heart"], "right base": (0.05, 0.50, 0.62, 0.98), "left base": (0.50, 0.95, 0.62, 0.98)}


def tokens(images: list[np.ndarray], side: int, cache: Path, views: int = 0) -> np.ndarray:
    """(n, hw, 1280) last-feature-map tokens at ``side`` (float16 cache); views > 0: mean-pooled
    features of augmented views, (views, n, 1280)."""
    import torch

    from indexer.train import augment
    from retrieval.encoders.towers import create_tower

    path = cache / (f"tok{side}.npy" if not views else f"aug{side}x{views}.npy")
    if path.is_file():
        return np.load(path).astype(np.float32)
    tower = create_tower("efficientnet-lite0").eval()
    x_all = torch.from_numpy(np.clip(np.stack([resize(im, side) for im in images]), 0, 1)).unsqueeze(1).float()
    outs = []
    with torch.inference_mode():
        for v in range(max(views, 1)):
            gen = torch.Generator().manual_seed(1000 + v)
            parts = []
            for i in range(0, len(images), 16):
                x = x_all[i:i + 16]
                t = tower(augment(x, gen) if views else x)
                parts.append((t.mean(1) if views else t).numpy().astype(np.float16))
            outs.append(np.concatenate(parts))
    arr = np.stack(outs) if views else outs[0]
    np.save(path, arr)
    return arr.astype(np.float32)


def region(t: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    g = int(round(t.shape[1] ** 0.5))
    c = (np.arange(g) + 0.5) / g
    ys, xs = np.meshgrid(c, c, indexing="ij")
    x0, x1, y0, y1 = box
    return t[:, ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).ravel()].mean(1)


def main() -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--c", type=float, default=3e-4, help="probe C (the preset's)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = CxrEvalConfig()
    _, _, studies, images, _, cfg = _prepare(a.folder, out, cfg)
    sim = ReportMatrix.from_studies(studies).similarity(None)
    has = finding_sets(studies, cfg.findings)
    folds = patient_folds(studies, 5, cfg.seed)
    ex = EntityExtractor(default_taxonomy())
    keys = [{(k.anatomy, k.finding) for k, st in study_labels(s, ex).items() if st == PRESENT} for s in studies]
    names = sorted(set().union(*keys))
    y = np.array([[k in ks for k in names] for ks in keys], int)
    y = np.concatenate([y, (y.sum(1) == 0)[:, None]], 1)

    def run(vec) -> QueryScores:
        parts = []
        for f in range(5):
            tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            v = l2(vec(tr, te, f))
            parts.append(query_scores(sim[np.ix_(te, te)], v @ v.T, {n: m[te] for n, m in has.items()}, cfg.k))
        return _concat(parts)

    cache: dict[tuple[int, int, str], np.ndarray] = {}

    def probe(x: np.ndarray, tag: str, extra: list[np.ndarray] | None = None, logit: bool = False):
        def fn(tr, te, f):
            key = (id(x), f, tag + str(logit))
            if key not in cache:
                xa, ya = x[tr], y[tr]
                if extra:
                    xa = np.concatenate([xa, *(e[tr] for e in extra)])
                    ya = np.concatenate([ya] * (1 + len(extra)))
                sc = StandardScaler().fit(xa)
                xa, xb = sc.transform(xa), sc.transform(x[te])
                p = np.zeros((len(te), y.shape[1]))
                for j in range(y.shape[1]):
                    lr = LogisticRegression(C=a.c, class_weight="balanced", max_iter=2000).fit(xa, ya[:, j])
                    p[:, j] = lr.decision_function(xb) if logit else lr.predict_proba(xb)[:, 1]
                cache[key] = p
            return cache[key]
        return fn

    pix = np.stack([resize(im, 32).ravel() for im in images])
    pix = l2(pix - pix.mean(1, keepdims=True))
    t224, t320, t448 = (tokens(images, s, out) for s in (224, 320, 448))
    g2 = np.concatenate([t224.mean(1), t448.mean(1)], 1)
    aug = tokens(images, 224, out, views=4), tokens(images, 448, out, views=4)
    augs = [np.concatenate([aug[0][v], aug[1][v]], 1) for v in range(4)]
    base = {"pixels": run(lambda tr, te, f: pix[te]), "frozen": run(lambda tr, te, f: t224.mean(1)[te])}
    p2 = probe(g2, "g2")
    rows = {
        "probe 224+448 (the preset's)": run(p2),
        "probe 224+320+448": run(probe(np.concatenate([g2, t320.mean(1)], 1), "g3")),
        "probe + atlas regions (heart, bases) at 448": run(probe(np.concatenate(
            [g2, *(region(t448, b) for b in REGIONS.values())], 1), "reg")),
        "probe + max-pooled 448": run(probe(np.concatenate([g2, t448.max(1)], 1), "max")),
        "probe, 4 augmented views in training": run(probe(g2, "aug", augs)),
        "  + test-time mean of the 5 views": run(probe((g2 + sum(augs)) / 5, "tta", augs)),
        "probe + 0.3 x pixels (late fusion)": run(lambda tr, te, f: np.concatenate(
            [l2(p2(tr, te, f)), 0.3 * pix[te]], 1)),
        "probe + 0.5 x pixels (late fusion)": run(lambda tr, te, f: np.concatenate(
            [l2(p2(tr, te, f)), 0.5 * pix[te]], 1)),
        "probe, probabilities - 0.5": run(lambda tr, te, f: p2(tr, te, f) - 0.5),
        "probe, tanh(logit / 3)": run(lambda tr, te, f: np.tanh(probe(g2, "g2", logit=True)(tr, te, f) / 3)),
        "probe, top-3 probabilities only": run(lambda tr, te, f: _top(p2(tr, te, f), 3)),
    }
    head = f"{'variant':46s} {'Jacc@10':>7s} {'mAP@10':>7s} {'Effusion':>8s} {'Cardio':>7s}   " \
           "- pixels: Jaccard / Effusion / Cardiomegaly [95% CI]"
    print(head)
    for name, qs in {**{"raw pixels": base["pixels"], "frozen ImageNet": base["frozen"]}, **rows}.items():
        m = np.nanmean([np.nanmean(v) for v in qs.ap.values()])
        line = (f"{name:46s} {np.nanmean(qs.jaccard):7.4f} {m:7.4f} {np.nanmean(qs.precision['Effusion']):8.3f} "
                f"{np.nanmean(qs.precision['Cardiomegaly']):7.3f}")
        if name in rows:
            d = [paired_bootstrap(qs.jaccard, base["pixels"].jaccard, cfg.bootstrap, cfg.seed)] + [
                paired_bootstrap(qs.precision[f], base["pixels"].precision[f], cfg.bootstrap, cfg.seed)
                for f in ("Effusion", "Cardiomegaly")]
            line += "   " + " / ".join(f"{x[0]:+.3f} [{x[1]:+.3f}, {x[2]:+.3f}]" for x in d)
        print(line)
    print("\nper finding, queries with it: P@10 of the held-out gallery ranked by the probe's probability of"
          " that finding (the finding stated) vs the unconditioned probe profile; base rate")
    home = {"Effusion": "effusion", "Cardiomegaly": "cardiomegaly", "Pneumothorax": "pneumothorax",
            "Nodule": "nodule", "Mass": "mass", "Atelectasis": "atelectasis", "Consolidation": "consolidation",
            "Infiltration": "opacity"}
    prof = rows["probe 224+448 (the preset's)"]
    for name, finding in home.items():
        if name not in has:
            continue
        j = next(i for i, k in enumerate(names) if k[1] == finding)
        stated, rate = [], []
        for f in range(5):
            tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            p, m = p2(tr, te, f)[:, j], has[name][te]
            for q in np.flatnonzero(m):
                order = [i for i in np.argsort(-p, kind="stable") if i != q][:cfg.k]
                stated.append(m[order].mean())
                rate.append((m.sum() - 1) / (len(m) - 1))
        print(f"  {name:14s} stated {np.mean(stated):.3f}   unconditioned {np.nanmean(prof.precision[name]):.3f}"
              f"   base rate {np.mean(rate):.3f}   (n = {len(stated)})")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


def _top(p: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(p)
    idx = np.argsort(-p, 1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(p, idx, 1), 1)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
