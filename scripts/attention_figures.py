"""Heat-map PNGs (with the colour legend) of where anatomy queries look on one radiograph.

    .venv/bin/python scripts/attention_figures.py CHECKPOINT IMAGE OUT_DIR heart pleura

Writes OUT_DIR/heatmap_<anatomy>.png (retrieval/imaging/overlay.py, the same rendering as
`medrag search --heatmaps` and the web page) with the share of attention below the lungs when the
image has a lung mask beside it (../lung_masks/<stem>.png) printed in the title.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from retrieval.encoders import create_encoder
from retrieval.imaging.images import load_image
from retrieval.imaging.lung_regions import attention_share, cell_fractions, lung_regions
from retrieval.imaging.overlay import overlay_png


def main(checkpoint: str, image: str, out_dir: str, *anatomies: str) -> None:
    enc = create_encoder("medrag-native", checkpoint=checkpoint)
    img = load_image(image)
    mask_path = Path(image).parent.parent / "lung_masks" / (Path(image).stem + ".png")
    regions = None
    if mask_path.is_file():
        from PIL import Image

        regions = lung_regions(np.asarray(Image.open(mask_path).convert("L")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for a in anatomies:
        att = enc.attention_maps([img], anatomy=a)[0]
        title = f"{a} query"
        if regions is not None:
            g = att.shape[-1]
            own = {"heart": "heart", "pleura": "pleura"}.get(a, a)
            title += (f": {attention_share(att, cell_fractions(regions[own], g)):.0%} in its region, "
                      f"{attention_share(att, cell_fractions(regions['abdomen'], g)):.0%} below the lungs")
        (out / f"heatmap_{a.replace(' ', '_')}.png").write_bytes(overlay_png(img, att, title=title))
        print(f"{out}/heatmap_{a.replace(' ', '_')}.png  {title}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *sys.argv[4:])
