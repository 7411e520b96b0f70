"""Encode the same images with a medrag-native checkpoint on CPU and on CUDA; compare and time.

    python scripts/gpu_encode_check.py CHECKPOINT IMAGE_DIR [--anatomy "left lung"]

Prints the largest |cpu - cuda| difference, the lowest cosine between the two embeddings of an
image, and images/s on each device (batch 64, after one warm-up batch). Needs a CUDA torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval.encoders.native import NativeEncoder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("images")
    ap.add_argument("--anatomy")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    files = sorted(Path(a.images).glob("*.png"))
    imgs = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0 for f in files]
    out = {"images": len(imgs)}
    embs = {}
    for device in ("cpu", "cuda"):
        enc = NativeEncoder.load(a.checkpoint, device=device)
        enc.encode_images(imgs[: a.batch], anatomy=a.anatomy)  # warm-up
        t0 = time.perf_counter()
        rows = [enc.encode_images(imgs[i:i + a.batch], anatomy=a.anatomy) for i in range(0, len(imgs), a.batch)]
        out[f"{device}_images_per_s"] = round(len(imgs) / (time.perf_counter() - t0), 1)
        embs[device] = np.concatenate(rows)
    diff = np.abs(embs["cpu"] - embs["cuda"])
    out["max_abs_diff"] = float(diff.max())
    out["min_cosine"] = float((embs["cpu"] * embs["cuda"]).sum(1).min())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
