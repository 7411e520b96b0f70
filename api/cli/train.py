"""``medrag train``: train medrag-native from a manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PRESET_NAMES = ("cpu-small", "gpu", "cxr-cpu", "cxr-notes-cpu", "cxr-gpu")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    t = sub.add_parser("train", help="train the medrag-native encoder from (image, report) pairs")
    t.add_argument("manifest", help="manifest with images and reports or labels, or a folder in the shared layout "
                                    "(labels.csv or metadata.csv beside images/)")
    t.add_argument("--out", required=True, help="output folder; the checkpoint is <out>/checkpoint")
    t.add_argument("--preset", choices=sorted(PRESET_NAMES), default=None,
                   help="cpu-small (synthetic/reports), cxr-cpu (labelled chest X-rays, 2 CPU cores), cxr-notes-cpu (chest X-rays with notes), cxr-gpu; "
                        "default: cxr-cpu or cxr-notes-cpu for a folder, cpu-small for a manifest")
    t.add_argument("--tower", help="image tower: small-cnn, efficientnet-lite0, open_clip, hf-vit")
    t.add_argument("--tower-source", help="local checkpoint directory of an open_clip / hf-vit tower")
    t.add_argument("--tune", help="tower stages that learn: none | last:N | all")
    t.add_argument("--half-checkpoint", action="store_true", help="store the checkpoint in float16 (half the size)")
    t.add_argument("--label-readout", type=float,
                   help="labelled sets: append the label probabilities, times this weight, to the embedding")
    t.add_argument("--probe-c", type=float,
                   help="fit a linear label probe on the tower's pooled features with this inverse L2 strength "
                        "(0: none); its probabilities join the embedding")
    t.add_argument("--probe-weight", type=float, help="weight of the probe's probabilities in the embedding")
    t.add_argument("--spatial-prior", type=float,
                   help="strength of the frontal-radiograph atlas bias on anatomy attention (0: none)")
    t.add_argument("--region-masks", help="folder with images and lung_masks/ (e.g. ../shared/data/covid_cxr_notes): "
                                          "fit the region head that keeps each anatomy's attention in its region")
    t.add_argument("--region-prior", type=float, help="strength of the region head's attention bias (0: none)")
    t.add_argument("--probe-sizes", help="comma-separated extra input sides the probe also reads (e.g. 448; '' for none)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--image-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--anatomies", help="comma-separated conditioning anatomies")
    t.add_argument("--seed", type=int)
    t.add_argument("--device")
    t.add_argument("--threads", type=int)
    t.add_argument("--resume", action="store_true", help="continue from <out>/state")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train)


def _cmd_train(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from indexer.train import PRESETS, train

    manifest = a.manifest
    if Path(manifest).is_dir():  # a folder in the shared layout: its manifest goes under --out
        from eval.labelled import load_directory

        path, res_src = load_directory(manifest, a.out)
        print(f"{len(res_src.studies)} studies from {manifest}; skipped {len(res_src.skipped)}; "
              f"warnings {len(res_src.warnings)}")
        for s in [*res_src.skipped, *res_src.warnings][:20]:
            print(f"  {s}")
        manifest = str(path)
    default = "cpu-small"
    if Path(a.manifest).is_dir():  # notes folders also learn from the text; labelled ones from labels
        default = "cxr-notes-cpu" if (Path(a.manifest) / "metadata.csv").is_file() else "cxr-cpu"
    cfg = PRESETS[a.preset or default]
    over = {k: v for k, v in {"epochs": a.epochs, "batch_size": a.batch_size, "image_size": a.image_size,
                              "lr": a.lr, "seed": a.seed, "device": a.device, "threads": a.threads,
                              "tower": a.tower, "tower_source": a.tower_source, "tune": a.tune,
                              "checkpoint_dtype": "float16" if a.half_checkpoint else None,
                              "label_readout": a.label_readout, "probe_c": a.probe_c,
                              "probe_weight": a.probe_weight, "spatial_prior": a.spatial_prior,
                              "region_masks": a.region_masks, "region_prior": a.region_prior}.items()
            if v is not None}
    if a.probe_sizes is not None:
        over["probe_sizes"] = tuple(int(x) for x in a.probe_sizes.split(",") if x.strip())
    if a.anatomies:
        over["anatomies"] = tuple(x.strip() for x in a.anatomies.split(","))
    res = train(manifest, a.out, replace(cfg, **over), resume=a.resume, progress=not a.no_progress)
    last = res.history[-1] if res.history else {}
    print(f"checkpoint {res.out_dir} ({res.epochs_run} epochs in {res.seconds:.0f}s); "
          f"last loss {last.get('loss', float('nan')):.4f}; val Recall@5 {last.get('val_recall@5')}")
    print(f"curve: {Path(a.out) / 'training_curve.png'}")
    return 0
