"""The torch/torchvision pairing: pure-Python torchvision, transformers and open_clip import."""

import importlib

from retrieval._compat import ensure_torchvision


def test_torchvision_transformers_open_clip_import_beside_cpu_torch():
    ops = ensure_torchvision()
    tv = importlib.import_module("torchvision")
    transforms = importlib.import_module("torchvision.transforms")
    importlib.import_module("transformers")
    importlib.import_module("open_clip")
    assert tv.__version__.startswith("0.28")
    assert hasattr(transforms, "Compose")
    if not ops:  # CPU torch: detection ops are unavailable, and say so clearly
        import pytest
        import torch

        with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
            tv.ops.nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)
