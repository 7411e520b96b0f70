"""Write demo/nih60/: 60 NIH ChestX-ray14 images (<= 256 px) with their labels, for `make demo`.

A developer tool, run once; its output is committed (the NIH states no restriction on use, with
attribution - see demo/nih60/ATTRIBUTION.md). The 60 images are chosen deterministically from the
shared 500-image sample so that a reader can judge finding-conditioned results: 15 with an
effusion, 15 with cardiomegaly, 15 labelled "No Finding", 15 with other findings. The demo model
is trained on the other 440 (scripts/train_demo_model.sh), so the demo searches unseen images.

    python scripts/make_demo_set.py ../shared/data/nih_cxr14_sample demo/nih60
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image

GROUPS = (("Effusion", 15), ("Cardiomegaly", 15), ("No Finding", 15), ("other", 15))


def main(src: str, dst: str) -> int:
    src_dir, out = Path(src), Path(dst)
    rows = list(csv.DictReader(open(src_dir / "labels.csv", newline="")))
    chosen: list[dict[str, str]] = []
    taken: set[str] = set()
    for name, n in GROUPS:
        def fits(r: dict[str, str], name: str = name) -> bool:
            labels = r["labels"].split("|")
            if name == "other":
                return not ({"Effusion", "Cardiomegaly", "No Finding"} & set(labels))
            return name in labels and not (name == "Effusion" and "Cardiomegaly" in labels)
        pick = [r for r in sorted(rows, key=lambda r: r["image"]) if fits(r) and r["image"] not in taken][:n]
        chosen += pick
        taken |= {r["image"] for r in pick}
    (out / "images").mkdir(parents=True, exist_ok=True)
    for r in chosen:
        with Image.open(src_dir / r["image"]) as im:
            im = im.convert("L")
            im.thumbnail((256, 256), Image.Resampling.LANCZOS)
            im.save(out / r["image"], optimize=True)
    keep = ["image", "patient_id", "follow_up", "age", "sex", "view", "labels"]
    with open(out / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keep)
        w.writeheader()
        w.writerows({k: r[k] for k in keep} for r in chosen)
    print(f"wrote {len(chosen)} images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
