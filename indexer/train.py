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

MiniLM is frozen and its report embeddings are computed once (cached under the output folder):
that keeps the CPU configuration to minutes. Training is deterministic for a seed on the CPU and
resumable: the full state is saved atomically after every epoch, and ``resume=True`` continues.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.images import ImageLoadError, load_image
from indexer.manifest import read_manifest, resolve_image
from retrieval.encoders.native import GLOBAL, NativeConfig, NativeEncoder, build_model
from retrieval.encoders.preprocess import resize
from retrieval.similarity import ReportMatrix
from retrieval.taxonomy import default_taxonomy


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 128  # training/inference resolution
    widths: tuple[int, ...] = (32, 64, 128)  # conv stages of the image tower
    embed_dim: int = 128  # retrieval embedding size
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
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch default)


PRESETS = {
    "cpu-small": TrainConfig(),
    "gpu": TrainConfig(image_size=224, widths=(64, 128, 256, 256), embed_dim=256, epochs=40,
                       batch_size=256, lr=1e-3, settings_per_step=4, device="cuda"),
}


@dataclass
class TrainResult:
    out_dir: str
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Data:
    """Images decoded once into a uint8 array, study index per image, report-derived targets."""

    def __init__(self, manifest: str | Path, cfg: TrainConfig, out: Path) -> None:
        studies = [s for s in read_manifest(manifest) if s.report]
        imgs: list[np.ndarray] = []
        owner: list[int] = []
        kept: list = []
        for s in studies:
            ok = False
            for rel in s.images:
                try:
                    arr = load_image(resolve_image(manifest, rel))
                except ImageLoadError:
                    continue
                imgs.append((resize(arr, cfg.image_size) * 255).round().astype(np.uint8))
                owner.append(len(kept))
                ok = True
            if ok:
                kept.append(s)
        if len(kept) < 8:
            raise ValueError(f"{manifest}: only {len(kept)} studies with a report and a readable image; need >= 8")
        self.studies = kept
        self.images = np.stack(imgs)
        self.owner = np.asarray(owner)
        self.settings: list[str | None] = [None, *cfg.anatomies]
        matrix = ReportMatrix([s.report for s in kept])
        self.values = {st: matrix.values(st)[:2] for st in self.settings}
        self.text = self._text_embeddings(matrix, out)

    def _text_embeddings(self, matrix: ReportMatrix, out: Path) -> dict[str | None, np.ndarray]:
        cache = out / "text_cache.npz"
        key = [s.study_id for s in self.studies]
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            if list(z["ids"]) == key and all(f"s{i}" in z for i in range(len(self.settings))):
                return {st: z[f"s{i}"] for i, st in enumerate(self.settings)}
        from eval.retrieval import text_oracle

        embed = text_oracle([s.report for s in self.studies])
        emb = {st: embed(st) for st in self.settings}
        tmp = out / ".text_cache.tmp.npz"
        arrays: dict[str, Any] = {f"s{i}": emb[st] for i, st in enumerate(self.settings)}
        np.savez(tmp, ids=np.array(key), **arrays)
        os.replace(tmp, cache)
        return emb

    def targets(self, setting: str | None, idx: np.ndarray) -> np.ndarray:
        """s_a among the studies ``idx`` (same formula as retrieval.similarity)."""
        vals, mask = self.values[setting]
        if vals.shape[1] == 0:
            return np.ones((len(idx), len(idx)), np.float32)
        v, m = vals[idx], mask[idx]
        union = (m[:, None, :] | m[None, :, :]).astype(np.float32)
        agree = union * (1.0 - np.abs(v[:, None, :] - v[None, :, :]))
        u = union.sum(-1)
        return np.where(u > 0, agree.sum(-1) / np.maximum(u, 1e-9), 1.0).astype(np.float32)


def _losses(z, t, target, text_ok, cfg: TrainConfig):
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
    if text_ok.sum() > 1:
        zi, ti = z[text_ok], t[text_ok]
        la = (zi @ ti.T) / cfg.temperature
        lbl = torch.arange(len(zi), device=z.device)
        align = 0.5 * (F.cross_entropy(la, lbl) + F.cross_entropy(la.T, lbl))
    return contrastive, rank, align


def train(manifest: str | Path, out_dir: str | Path, cfg: TrainConfig, resume: bool = False,
          progress: bool = True) -> TrainResult:
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
    data = _Data(manifest, cfg, out)
    ncfg = NativeConfig(image_size=cfg.image_size, widths=cfg.widths, embed_dim=cfg.embed_dim,
                        token_dim=cfg.widths[-1])
    torch.manual_seed(cfg.seed)
    model = build_model(ncfg).to(cfg.device)
    proj = torch.nn.Linear(384, cfg.embed_dim).to(cfg.device)
    params = list(model.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    n_val = max(1, int(round(cfg.val_fraction * len(data.studies))))
    val_studies = np.sort(rng.choice(len(data.studies), n_val, replace=False))
    train_mask = ~np.isin(data.owner, val_studies)
    train_imgs = np.flatnonzero(train_mask)
    steps_per_epoch = max(1, len(train_imgs) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps_per_epoch)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    setting_index: dict[str | None, int] = {None: 0, **{a: ncfg.anatomies.index(a) for a in anatomies}}
    history: list[dict] = []
    start_epoch = 0
    state_dir = out / "state"
    if resume and (state_dir / "state.pt").is_file():
        st = torch.load(state_dir / "state.pt", weights_only=False)
        model.load_state_dict(st["model"])
        proj.load_state_dict(st["proj"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["torch_rng"])
        rng.bit_generator.state = st["np_rng"]
        history, start_epoch = st["history"], st["epoch"] + 1
    (out / "train_config.json").write_text(json.dumps({"manifest": str(manifest), **asdict(cfg)}, indent=1))
    bar = _bar(total, start_epoch * steps_per_epoch, progress)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        order = rng.permutation(train_imgs)
        sums = {"loss": 0.0, "contrastive": 0.0, "rank": 0.0, "align": 0.0}
        steps = []
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            study_idx = data.owner[idx]
            x = torch.from_numpy((data.images[idx].astype(np.float32) / 255.0 - 0.5) / 0.25).unsqueeze(1).to(cfg.device)
            sampled = list(rng.choice(len(anatomies), min(cfg.settings_per_step - 1, len(anatomies)), replace=False))
            loss = torch.zeros((), device=cfg.device)
            parts = np.zeros(3)
            for setting in [None] + [anatomies[i] for i in sampled]:
                aidx = torch.full((len(idx),), setting_index[setting], dtype=torch.long, device=cfg.device)
                z = model(x, aidx)
                t = torch.nn.functional.normalize(proj(torch.from_numpy(data.text[setting][study_idx]).to(cfg.device)), dim=-1)
                text_ok = torch.from_numpy(np.abs(data.text[setting][study_idx]).sum(1) > 0).to(cfg.device)
                target = torch.from_numpy(data.targets(setting, study_idx)).to(cfg.device)
                c, r, a = _losses(z, t, target, text_ok, cfg)
                loss = loss + cfg.w_contrastive * c + cfg.w_rank * r + cfg.w_align * a
                parts += [c.item(), r.item(), a.item()]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            steps.append(loss.item())
            for k, v in zip(("contrastive", "rank", "align"), parts, strict=True):
                sums[k] += v
            sums["loss"] += loss.item()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        val = _validate(model, data, val_studies, anatomies, setting_index, cfg)
        history.append({"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                        "step_losses": steps, "val_recall@5": val, "lr": sched.get_last_lr()[0]})
        _save_state(state_dir, {"model": model.state_dict(), "proj": proj.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                                "np_rng": rng.bit_generator.state, "history": history, "epoch": epoch})
    if bar is not None:
        bar.close()
    model.eval()
    enc = NativeEncoder(ncfg, model.cpu(), "cpu")
    enc.save(out / "checkpoint", extra={"text_tower": "minilm", "trained": {"manifest": str(manifest),
                                        "epochs": cfg.epochs, "seed": cfg.seed, "studies": len(data.studies)}})
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in proj.state_dict().items()},
              str(out / "checkpoint" / "text_proj.safetensors"))
    (out / "train_log.json").write_text(json.dumps(history, indent=1))
    plot_curve(history, out / "training_curve.png")
    return TrainResult(str(out / "checkpoint"), cfg.epochs - start_epoch, history, time.perf_counter() - t0)


def _validate(model, data: _Data, val_studies: np.ndarray, anatomies, setting_index, cfg: TrainConfig) -> dict:
    """Recall@5 on the held-out studies (ranked among themselves), per setting."""
    import torch

    from eval.retrieval import EvalConfig, rank_metrics

    model.eval()
    imgs = np.flatnonzero(np.isin(data.owner, val_studies))
    x = torch.from_numpy((data.images[imgs].astype(np.float32) / 255.0 - 0.5) / 0.25).unsqueeze(1).to(cfg.device)
    pos = {s: i for i, s in enumerate(val_studies)}
    out = {}
    ecfg = EvalConfig(ks=(5,), ndcg_ks=(5,), rate_k=5)
    with torch.no_grad():
        for setting in (None, *anatomies):
            z = model(x, torch.full((len(imgs),), setting_index[setting], dtype=torch.long, device=cfg.device)).cpu().numpy()
            emb = np.zeros((len(val_studies), z.shape[1]), np.float32)
            np.add.at(emb, [pos[o] for o in data.owner[imgs]], z)
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
            sim = data.targets(setting, val_studies)
            m, _, _ = rank_metrics(sim, emb @ emb.T, np.arange(len(val_studies)), ecfg)
            out[setting or "all"] = round(m.recall["@5"], 4)
    model.train()
    return out


def _save_state(state_dir: Path, state: dict) -> None:
    import torch

    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(tmp, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def plot_curve(history: list[dict], path: Path) -> None:
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


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="training", dynamic_ncols=True)


__all__ = ["GLOBAL", "PRESETS", "TrainConfig", "TrainResult", "train"]
