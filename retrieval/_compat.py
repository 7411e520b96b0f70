"""Make torchvision's pure-Python parts importable beside the CPU build of torch.

Why this exists: medrag pins the CPU wheel of torch 2.13.0 (small, installs offline). Its matching
torchvision release, 0.28.0, is published on PyPI only as a CUDA build whose C++ ops library links
``libtorch_cuda.so``; beside CPU torch that library cannot load, and ``import torchvision`` then
dies in ``_meta_registrations`` with ``operator torchvision::nms does not exist`` (the module
registers fake kernels for ``nms``/``qnms`` unconditionally). transformers and open_clip import
torchvision, so they die too.

medrag uses only torchvision's transforms (through open_clip and transformers image processors),
never its C++ detection ops. :func:`ensure_torchvision` declares the two op schemas that the
fake-kernel registration needs, so the import succeeds; calling ``torchvision.ops.nms`` still
raises torchvision's own "Couldn't load custom C++ ops" error. Where the ops library does load
(a matching CUDA torch on a GPU host), nothing is declared and torchvision is untouched.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment = None  # keeps the torch.library fragment alive for the process


@functools.cache
def ensure_torchvision() -> bool:
    """Prepare torch so that ``import torchvision`` works; return whether its C++ ops load.

    Safe to call many times; it must run before the first ``import torchvision`` in the process
    (medrag's encoder modules call it at import). Returns False when torchvision is absent.
    """
    global _fragment
    if "torchvision" in sys.modules:
        return _ops_loaded()
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    if _load_ops_library(Path(next(iter(spec.submodule_search_locations)))):
        return True
    _fragment = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901
    for schema in _SCHEMAS:
        _fragment.define(schema)
    return False


def _load_ops_library(package_dir: Path) -> bool:
    import torch

    for lib in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def _ops_loaded() -> bool:
    from torchvision.extension import _has_ops

    return bool(_has_ops())
