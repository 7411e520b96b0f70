"""The region head: an image-adaptive prior on where each anatomy's query may look.

Why: the fixed atlas (atlas.py) places the heart at fixed fractions of the image, but the
lungs' lower edge lies anywhere between 60 % and 93 % of the image height across the shared
radiographs, so on a short chest the heart's box is the upper abdomen, and the learned heart
query (label supervision carries no place) drifted there: 38 % of its attention was below the
lungs on the notes set's lung masks. The region head reads where the anatomy is from the image
itself: per patch token, the probability that the patch is right lung, left lung, heart,
mediastinum, pleura, abdomen or outside the body (independent sigmoids over the tower's token
and its grid position), fitted by ``medrag train --region-masks`` to the share of each patch
that the regions of :mod:`retrieval.imaging.lung_regions` cover on lung-masked radiographs. An
anatomy's attention logits get ``strength * log p(patch in its region)``: outside its region it
can hardly look. Anatomies without a region keep the atlas (or no bias).
"""

from __future__ import annotations

from typing import Any

import numpy as np

REGION_HEAD_REGIONS = ("right lung", "left lung", "heart", "mediastinum", "pleura", "abdomen", "outside body")
# anatomy region = sum of these head regions (probabilities, clipped at 1)
_COMBOS: tuple[tuple[str, ...], ...] = (
    ("right lung", "left lung"), ("right lung",), ("left lung",), ("heart",), ("mediastinum", "heart"),
    ("pleura",), ("abdomen",), ("-abdomen", "-outside body"))
BODY = 7  # the rest (whole image, bones, ...): anywhere but the abdomen and outside the body
_ANATOMY_COMBO = {
    "lung": 0, "right lung": 1, "right upper lobe": 1, "right middle lobe": 1, "right lower lobe": 1,
    "left lung": 2, "left upper lobe": 2, "left lower lobe": 2, "heart": 3, "mediastinum": 4,
    "pleura": 5, "left pleura": 5, "right pleura": 5, "upper abdomen": 6,
}
_NO_REGION = {"diaphragm", "left hemidiaphragm", "right hemidiaphragm"}  # they border the abdomen: atlas only
FLOOR = 1e-4  # smallest probability the bias reads (strength * log FLOOR is the hardest penalty)


def region_index(anatomy: str) -> int | None:
    """The anatomy's region combination (:data:`BODY` for the whole image and anatomies without
    a region of their own), or None (the diaphragm: the atlas or no bias)."""
    return None if anatomy in _NO_REGION else _ANATOMY_COMBO.get(anatomy, BODY)


def combo_matrix() -> np.ndarray:
    """(combinations, head regions + 1): +1 / -1 per head region summed, last column a constant
    (1 for "everything but": p = 1 - p(abdomen) - p(outside))."""
    out = np.zeros((len(_COMBOS), len(REGION_HEAD_REGIONS) + 1), np.float32)
    for k, names in enumerate(_COMBOS):
        for n in names:
            out[k, REGION_HEAD_REGIONS.index(n.lstrip("-"))] = -1.0 if n.startswith("-") else 1.0
        out[k, -1] = 1.0 if any(n.startswith("-") for n in names) else 0.0
    return out


def region_module(features: int, tokens: int) -> Any:  # -> torch.nn.Module
    """Standardised tower token + one-hot grid position -> one logit per head region."""
    import torch
    from torch import nn

    class _RegionHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.zeros(features))
            self.register_buffer("scale", torch.ones(features))
            self.register_buffer("combos", torch.from_numpy(combo_matrix()), persistent=False)
            self.linear = nn.Linear(features + tokens, len(REGION_HEAD_REGIONS))
            self.tokens = tokens

        def forward(self, raw: torch.Tensor) -> torch.Tensor:
            """(B, T, C) raw tower tokens -> (B, T, regions) logits."""
            mean: torch.Tensor = self.mean  # type: ignore[assignment]
            scale: torch.Tensor = self.scale  # type: ignore[assignment]
            x = (raw.float() - mean) / scale
            pos = torch.eye(self.tokens, device=raw.device).expand(raw.shape[0], -1, -1)
            out: torch.Tensor = self.linear(torch.cat([x, pos], -1))
            return out

    return _RegionHead()


def region_bias(module: Any, raw: Any, combo_idx: Any, strength: float) -> Any:
    """(B, T) additive attention bias: ``strength * log p`` of each patch being in the
    condition's region; 0 for conditions without one (``combo_idx`` -1)."""
    import torch

    p = torch.sigmoid(module(raw))  # (B, T, R)
    combos: torch.Tensor = module.combos
    sel = combos[combo_idx.clamp(min=0)]  # (B, R + 1)
    pa = ((p * sel[:, None, :-1]).sum(-1) + sel[:, None, -1]).clamp(FLOOR, 1.0)
    bias = strength * torch.log(pa)
    return torch.where((combo_idx >= 0).unsqueeze(1), bias, torch.zeros_like(bias))


def fit_region_head(module: Any, raw: Any, targets: np.ndarray, steps: int = 400, lr: float = 0.02,
                    l2: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Fit ``module`` to ``targets`` ((N, T, regions) shares of each patch in each region) from
    the (N, T, C) raw tower tokens: full-batch Adam on the soft-target cross-entropy plus an L2
    penalty on the weights. Returns the final loss and the share of patches whose most likely
    region (or 'none') matches the target's largest share."""
    import torch

    torch.manual_seed(seed)
    x = raw.float()
    flat = x.reshape(-1, x.shape[-1])
    module.mean.copy_(flat.mean(0))
    module.scale.copy_(flat.std(0).clamp(min=1e-6))
    y = torch.from_numpy(np.asarray(targets, np.float32))
    opt = torch.optim.Adam(module.linear.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        logits = module(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        total = loss + l2 * module.linear.weight.pow(2).sum()
        total.backward()
        opt.step()
    with torch.no_grad():
        p = torch.sigmoid(module(x))
    return {"loss": float(loss.item()),
            "mean_abs_error": float((p - y).abs().mean().item())}
