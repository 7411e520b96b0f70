"""Fit the calibration of a checkpoint's finding reading (see :mod:`retrieval.encoders.reading`).

Everything here sees the training images only: the probe is refitted in patient-grouped folds
of them, so each training image gets an out-of-fold logit, and the calibration and thresholds
are chosen on those. A held-out evaluation fold is never looked at (``medrag eval draft-images``
trains one checkpoint per outer fold, so its thresholds are nested inside that fold's training
part). Settings compared: none are tuned against a score other than the rules below, which are
fixed in code (best out-of-fold F1 for "uncertain", out-of-fold precision >= 0.7 for "present").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from indexer.manifest import read_manifest
from retrieval.encoders.reading import PRESENT_PRECISION, LabelCalibration, ReadingCalibration
from retrieval.records import Study

INNER_FOLDS = 5
NOISE_IMAGES = 24  # training images the reading's noise is measured on
MIN_POSITIVES = 5  # fewer positives than this in the training images: the label is never stated


def _platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(logit.reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def _auc(score: np.ndarray, y: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def thresholds(p: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    """(uncertain_at, present_at) on calibrated out-of-fold probabilities ``p`` of labels ``y``."""
    order = np.argsort(-p)
    ps, ys = p[order], y[order].astype(np.float64)
    tp = np.cumsum(ys)
    k = np.arange(1, len(ps) + 1)
    precision = tp / k
    recall = tp / max(1.0, ys.sum())
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    # a cut can only fall between distinct values: take the last index of each run of ties
    last = np.r_[ps[1:] != ps[:-1], True]
    cand = np.flatnonzero(last)
    best = int(cand[np.argmax(f1[cand])])
    uncertain_at = float(ps[best])
    present_at = None
    for i in cand[::-1]:  # from the lowest threshold up: the lowest one precise enough
        if ps[i] >= uncertain_at and precision[i] >= PRESENT_PRECISION and tp[i] >= MIN_POSITIVES:
            present_at = float(ps[i])
            break
    return uncertain_at, present_at


def acquisition_variants(image: np.ndarray) -> list[np.ndarray]:
    """An image (floats in [0, 1]) as mild acquisition changes would show it: itself, gamma 0.85
    and 1.15, a 4 % zoom. Never a horizontal flip: laterality matters."""
    cut = max(1, int(round(min(image.shape) * 0.02)))
    from retrieval.encoders.preprocess import resize

    return [image, image ** 0.85, image ** 1.15, resize(image[cut:-cut, cut:-cut], max(image.shape))]


def noise_sd(logits: np.ndarray, cals: Sequence[LabelCalibration]) -> np.ndarray:
    """Per label, the mean over images of the calibrated probability's s.d. across the variants
    of :func:`acquisition_variants`; ``logits`` is (images, variants, labels)."""
    return np.array([float(c.probabilities(logits[:, :, j]).std(axis=1).mean()) for j, c in enumerate(cals)])


def fit_reading(x: np.ndarray, y: np.ndarray, groups: Sequence[str], keys: Sequence[str], c: float,
                noise: Callable[[list[LabelCalibration]], np.ndarray] | None = None,
                seed: int = 0) -> ReadingCalibration:
    """Calibrate the probe's labels from standardised features ``x`` (n, F) and targets ``y`` (n, L).

    ``noise``: given the calibrations, the per-label standard deviation of the calibrated
    probability under mild acquisition changes (the trainer measures it with the fitted probe);
    without it the noise is 0.05 for every label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    group_of = np.asarray(groups)
    n_groups = len(set(group_of.tolist()))
    folds = GroupKFold(n_splits=min(INNER_FOLDS, n_groups))
    cals: list[LabelCalibration] = []
    for j, key in enumerate(keys):
        yj = y[:, j].astype(int)
        pos = int(yj.sum())
        if pos < MIN_POSITIVES or pos == len(yj) or "|" not in key:
            cals.append(LabelCalibration(key, 1.0, -50.0, 1.0, None, 0.0, None, pos))  # never stated
            continue
        oof = np.zeros(len(yj))
        for tr, te in folds.split(x, yj, group_of):
            if yj[tr].min() == yj[tr].max():
                oof[te] = 0.0
                continue
            lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(x[tr], yj[tr])
            oof[te] = lr.decision_function(x[te])
        a, b = _platt(oof, yj)
        u, pr = thresholds(LabelCalibration(key, a, b, 0.0, None, 0.0).probabilities(oof), yj)
        cals.append(LabelCalibration(key, a, b, u, pr, 0.05, _auc(oof, yj), pos))
    if noise is not None:
        sd = noise(cals)
        cals = [LabelCalibration(c.key, c.a, c.b, c.uncertain_at, c.present_at, max(0.02, 2.0 * float(s)),
                                 c.oof_auc, c.positives) for c, s in zip(cals, sd, strict=True)]
    protocol = (f"probe refitted in {folds.get_n_splits()} patient-grouped folds of the training images; "
                "Platt calibration of the out-of-fold logits; uncertain_at = best out-of-fold F1; "
                f"present_at = lowest threshold with out-of-fold precision >= {PRESENT_PRECISION}; "
                "noise = 2 x the calibrated probability's s.d. under gamma 0.85/1.15 and a 4% zoom")
    return ReadingCalibration(tuple(cals), protocol, len(yj) if keys else 0)


def calibrate_checkpoint(checkpoint: str | Path, manifest: str | Path, c: float,
                         studies: Sequence[Study] | None = None, seed: int = 0) -> ReadingCalibration:
    """Fit and write ``reading.json`` for an existing checkpoint from its *training* studies (a
    checkpoint trained before readings were calibrated; ``medrag train`` now does this itself).
    ``c`` must be the probe's own inverse L2 strength (the cxr-cpu preset's 3e-4)."""
    import torch

    from retrieval.encoders.native import NORMAL, NativeEncoder
    from retrieval.entities import EntityExtractor, study_labels
    from retrieval.imaging.images import load_image
    from retrieval.imaging.paths import manifest_image
    from retrieval.records import PRESENT

    enc = NativeEncoder.load(checkpoint)
    if enc.model.probe is None or enc.cfg.probe_weight <= 0:
        raise ValueError(f"{checkpoint}: this checkpoint has no label probe to calibrate")
    rows = list(studies) if studies is not None else list(read_manifest(manifest))
    ex = EntityExtractor()
    keys = enc.cfg.probe_labels
    feats, targets, groups, images = [], [], [], []
    for s in rows:
        if not s.images or (s.labels is None and not s.report):
            continue
        img = load_image(manifest_image(manifest, s.images[0]))
        present = {f"{k.anatomy}|{k.finding}" for k, st in study_labels(s, ex).items() if st == PRESENT}
        coarse = {f"{ex.tax.coarse(k.split('|')[0])}|{k.split('|')[1]}" for k in present}
        y = [float(k in coarse) for k in keys if k != NORMAL]
        targets.append([*y, float(not any(y))])
        groups.append(s.patient_id or s.study_id)
        images.append(img)
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            chunk = images[i:i + 16]
            feats.append(enc._pooled(chunk, enc._tokens(chunk)).float().cpu().numpy())
    f = np.concatenate(feats)
    probe = enc.model.probe
    x = (f - probe.mean.cpu().numpy()) / probe.scale.cpu().numpy()
    y_arr = np.asarray(targets)

    def noise(cals: list[LabelCalibration]) -> np.ndarray:
        pick = np.random.default_rng(seed).permutation(len(images))[:NOISE_IMAGES]
        logits = []
        for i in pick:
            vs = acquisition_variants(images[i])
            with torch.inference_mode():
                logits.append(probe(enc._pooled(vs, enc._tokens(vs))).float().cpu().numpy())
        return noise_sd(np.stack(logits), cals)

    cal = fit_reading(x, y_arr, groups, keys, c, noise=noise, seed=seed)
    cal.save(checkpoint)
    return cal
