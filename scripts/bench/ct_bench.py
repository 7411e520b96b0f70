"""CT volumes, measured honestly on what exists here (docs/ct.md).

1. ``timing``: encoding time and peak memory (max RSS of a fresh process) per volume on CPU,
   for the LIDC sub-volume grid (224 x 224 x 16) and the tower's original 224 x 224 x 160.
2. ``sanity``: the LIDC series cut into adjacent, non-overlapping slabs (no shared slice), each
   slab a study; built with the project's build machinery (``indexer.build.build_index``, FAISS,
   one space per anatomy), every slab then queried *by its id* (its stored vector) in every
   space: is the top hit another slab of the same series (same patient)? And do the
   nodule-bearing slabs (LIDC readings: a nodule ROI of at least one radiologist inside the
   slab's z range) rank other nodule-bearing slabs before the rest? Baselines: the same with a
   tiny random tower and with raw windowed voxels (downsampled), so a figure says what the
   pretrained tower adds. Optional ``--previews DIR``: PNGs of a query slab and its hits (three
   axial slices each, the query's anatomy attention in red).

Retrieval *quality* on CT is not measured: there are no labelled volumes here.

    .venv/bin/python scripts/bench/ct_bench.py timing
    .venv/bin/python scripts/bench/ct_bench.py sanity --tower astra --previews /tmp/ct_previews
    .venv/bin/python scripts/bench/ct_bench.py quality --manifest ct_rate_val.jsonl --json ct_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
LIDC = Path(os.environ.get("MEDRAG_SHARED", ROOT.parent / "shared")) / "data" / "lidc_ct_small"
SPACES = [None, "lung", "left lung", "right lung", "heart", "mediastinum"]


# ---- timing ------------------------------------------------------------------------------------
def _time_one(tower: str, shape: tuple[int, int, int], repeats: int) -> dict[str, object]:
    import torch

    from retrieval.encoders import create_encoder

    t0 = time.perf_counter()
    enc = create_encoder("ct3d", tower=tower)
    load_s = time.perf_counter() - t0
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    enc.encode_conditions([x], SPACES)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        enc.encode_conditions([x], SPACES)
        times.append(time.perf_counter() - t)
    return {"tower": tower, "shape": list(shape), "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
            "encode_s_median": round(float(np.median(times)), 2), "encode_s_min": round(min(times), 2),
            "repeats": repeats, "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def timing(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    for shape in ([224, 224, 16], [224, 224, 160]):
        code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); from scripts.bench.ct_bench import _time_one; "
                f"print(json.dumps(_time_one({args.tower!r}, {tuple(shape)!r}, {args.repeats})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- sanity retrieval --------------------------------------------------------------------------
def _nodule_z(readings: Path) -> list[float]:
    """z positions (mm) of nodule ROIs (unblindedReadNodule: nodules of 3 mm or more, outlined)."""
    import xml.etree.ElementTree as ET

    ns = {"n": "http://www.nih.gov"}
    root = ET.parse(readings).getroot()
    zs = []
    for nod in root.iterfind(".//n:unblindedReadNodule", ns):
        for roi in nod.iterfind("n:roi", ns):
            z = roi.find("n:imageZposition", ns)
            inc = roi.find("n:inclusion", ns)
            if z is not None and z.text and (inc is None or (inc.text or "").strip().upper() == "TRUE"):
                zs.append(float(z.text))
    return zs


def make_slabs(work: Path, slab: int) -> list[dict[str, object]]:
    """Adjacent non-overlapping slabs of ``slab`` slices per series (symlinked), with labels."""
    import pydicom

    out: list[dict[str, object]] = []
    for series in sorted(p for p in LIDC.glob("LIDC-*/*/*") if p.is_dir()):
        patient = series.parts[-3]
        files = sorted(series.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                                  .ImagePositionPatient[2]))
        nodules = _nodule_z(series.parent.parent / "readings.xml")
        for i in range(len(files) // slab):
            part = files[i * slab:(i + 1) * slab]
            zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in part]
            d = work / f"{patient}-slab{i}"
            d.mkdir(parents=True)
            for f in part:
                (d / f.name).symlink_to(f)
            lo, hi = min(zs), max(zs)
            out.append({"study_id": d.name, "patient_id": patient, "modality": "CT", "images": [str(d)],
                        "report": None, "z": [lo, hi], "nodule": any(lo - 0.01 <= z <= hi + 0.01 for z in nodules)})
    return out


def _rank_stats(vecs: np.ndarray, patients: list[str], nodule: list[bool]) -> dict[str, float]:
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    n = len(patients)
    top1 = [patients[int(np.argmax(sims[i]))] == patients[i] for i in range(n)]
    # the same series' slabs all ranked before every other patient's slab?
    before = []
    for i in range(n):
        own = [sims[i, j] for j in range(n) if j != i and patients[j] == patients[i]]
        other = [sims[i, j] for j in range(n) if patients[j] != patients[i]]
        if own and other:
            before.append(min(own) > max(other))
    # nodule slabs: among other patients' slabs, is a nodule slab ranked first?
    nod_hits, nod_q = 0, 0
    for i in range(n):
        if not nodule[i]:
            continue
        cand = [j for j in range(n) if patients[j] != patients[i]]
        if not any(nodule[j] for j in cand) or all(nodule[j] for j in cand):
            continue
        nod_q += 1
        nod_hits += int(nodule[max(cand, key=lambda j: sims[i, j])])
    return {"top1_same_series": float(np.mean(top1)), "all_own_before_others": float(np.mean(before)),
            "queries": n, "nodule_queries": nod_q, "nodule_top1_other_patient": (nod_hits / nod_q) if nod_q else float("nan")}


def sanity(args: argparse.Namespace) -> dict[str, object]:
    from indexer.build import BuildConfig, build_index
    from indexer.manifest import write_manifest
    from retrieval.encoders import create_encoder
    from retrieval.imaging.volume import load_series, tower_input
    from retrieval.index import IMAGE, anatomy_space, open_index
    from retrieval.index.base import SearchFilter
    from retrieval.records import Study

    work = Path(tempfile.mkdtemp(prefix="ct_sanity_"))
    slabs = make_slabs(work / "slabs", args.slab)
    manifest = work / "manifest.jsonl"
    write_manifest(manifest, [Study(study_id=str(s["study_id"]), patient_id=str(s["patient_id"]), study_date=None,
                                    modality="CT", images=[str(i) for i in s["images"]], report=None)  # type: ignore[attr-defined]
                              for s in slabs])
    result: dict[str, object] = {"slabs": [{k: s[k] for k in ("study_id", "z", "nodule")} for s in slabs],
                                 "slab_slices": args.slab}
    patients = [str(s["patient_id"]) for s in slabs]
    nodule = [bool(s["nodule"]) for s in slabs]
    uri = f"faiss:{work / 'index'}"
    t0 = time.perf_counter()
    rep = build_index(manifest, uri, BuildConfig(encoder="ct3d", text_encoder=None, batch_size=1), progress=False)
    wall = time.perf_counter() - t0
    if args.tower != "astra":
        raise SystemExit("the build uses the registry's default ct3d (astra); use --tower astra")
    result["build"] = {"studies": rep.studies, "points": rep.points, "skipped": rep.skipped, "seconds": round(wall, 1),
                       "studies_per_min": round(60 * rep.studies / wall, 2)}
    print(json.dumps(result["build"]), flush=True)
    index = open_index(uri)
    ids = {h.payload.study_id: h.id for h in index.find(SearchFilter(), limit=1000)}
    order = [ids[str(s["study_id"])] for s in slabs]
    by_space: dict[str, object] = {}
    for a in SPACES:
        space = IMAGE if a is None else anatomy_space(a)
        vecs = index.vectors(space, order)
        # query by id: the stored vector searched in the index (FAISS), own hit dropped
        hits = index.search(space, vecs, k=len(slabs))
        patient_of = {str(s["study_id"]): str(s["patient_id"]) for s in slabs}  # payload patient ids are pseudonyms
        top = [next(patient_of[h.payload.study_id] for h in hs if h.id != qid) for hs, qid in zip(hits, order, strict=True)]
        stats = _rank_stats(vecs, patients, nodule)
        stats["index_top1_same_series"] = float(np.mean([t == p for t, p in zip(top, patients, strict=True)]))
        by_space[a or "<global>"] = stats
        print(a or "<global>", json.dumps(stats), flush=True)
    result["astra"] = by_space
    # baselines on the same slabs: tiny random tower, raw windowed voxels
    inputs = [tower_input(load_series(str(s["images"][0]))) for s in slabs]  # type: ignore[index]
    tiny = create_encoder("ct3d", tower="tiny", seed=0)
    result["tiny_random"] = {a or "<global>": _rank_stats(tiny.encode_conditions(inputs, [a])[a], patients, nodule)
                             for a in (None, "left lung")}
    raw = np.stack([x[::4, ::4, :].reshape(-1) for x in inputs])
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    result["raw_voxels"] = _rank_stats(raw, patients, nodule)
    print("tiny", json.dumps(result["tiny_random"]), "\nraw", json.dumps(result["raw_voxels"]), flush=True)
    if args.previews:
        enc = create_encoder("ct3d")
        result["previews"] = previews(enc, inputs, slabs, index, order, Path(args.previews))
    index.close()
    return result


def previews(enc: object, inputs: list[np.ndarray], slabs: list[dict[str, object]], index: object, order: list[int],
             out: Path, anatomy: str = "right lung") -> list[str]:
    """Query slab 0 and its top 3 hits in ``anatomy``'s space: three axial slices each, attention in red."""
    from PIL import Image, ImageDraw

    from retrieval.imaging.volume import axial_display
    from retrieval.index import anatomy_space

    out.mkdir(parents=True, exist_ok=True)
    space = anatomy_space(anatomy)
    q = 0
    hits = index.search(space, index.vectors(space, [order[q]]), k=4)[0]  # type: ignore[attr-defined]
    rows = [q] + [order.index(h.id) for h in hits if h.id != order[q]][:3]
    tiles = []
    for r in rows:
        x = inputs[r]
        att = enc.attention_maps(x, anatomy)  # type: ignore[attr-defined]  # (gz, gx, gy)
        att_xy = att.sum(0)
        att_xy = att_xy / max(float(att_xy.max()), 1e-9)
        up = np.kron(att_xy, np.ones((x.shape[0] // att_xy.shape[0], x.shape[1] // att_xy.shape[1])))
        valid_z = [z for z in range(x.shape[2]) if x[:, :, z].max() > 0]
        row_imgs = []
        for z in np.linspace(valid_z[0], valid_z[-1], 3).round().astype(int):
            g = axial_display(x, int(z))
            a = axial_display(up[:, :, None], 0)
            rgb = np.stack([np.clip(g + 0.5 * a, 0, 1), g * (1 - 0.3 * a), g * (1 - 0.3 * a)], -1)
            row_imgs.append((rgb * 255).astype(np.uint8))
        tile = Image.fromarray(np.concatenate(row_imgs, 1))
        ImageDraw.Draw(tile).text((4, 4), f"{'query' if r == q else 'hit'} {slabs[r]['study_id']}", fill=(255, 255, 0))
        tiles.append(np.asarray(tile))
    path = out / f"ct_query_{anatomy.replace(' ', '_')}.png"
    Image.fromarray(np.concatenate(tiles, 0)).save(path)
    return [str(path)]


def quality(args: argparse.Namespace) -> dict[str, object]:
    """RadIR-style retrieval quality (eval/retrieval.py's metrics: Recall/NDCG/RateScore per
    anatomy against report-mined similarity) on a manifest of CT studies with reports: each
    study's ``images[0]`` a series folder. Not run here: no labelled volumes exist on this machine."""
    from dataclasses import asdict

    from eval.retrieval import EvalConfig, evaluate
    from indexer.manifest import read_manifest
    from retrieval.encoders import create_encoder
    from retrieval.encoders.base import l2_normalise
    from retrieval.imaging import ImageLoadError, manifest_image

    anatomies = ("lung", "left lung", "right lung", "heart", "mediastinum")
    enc = create_encoder("ct3d", tower=args.tower)
    conds: list[str | None] = [None, *anatomies]
    vecs: dict[str | None, list[np.ndarray]] = {a: [] for a in conds}
    raw: list[np.ndarray] = []
    reports: list[str | None] = []
    skipped = 0
    for study in read_manifest(args.manifest):
        if not study.report or not study.images:
            continue
        try:
            x = enc.load_input(manifest_image(args.manifest, study.images[0]))
        except ImageLoadError as exc:
            skipped += 1
            print(f"skipped {study.study_id}: {exc}", file=sys.stderr)
            continue
        for a, v in enc.encode_conditions([x], conds).items():
            vecs[a].append(v[0])
        raw.append(x[::8, ::8, ::4].reshape(-1))
        reports.append(study.report)
    stacked = {a: np.stack(v) for a, v in vecs.items()}
    raw_v = l2_normalise(np.stack([np.resize(r, max(len(q) for q in raw)) for r in raw]))
    methods = {"ct3d": lambda setting: stacked[setting if setting in stacked else None],
               "raw voxels": lambda _setting: raw_v}
    results = evaluate(reports, methods, EvalConfig(anatomies=anatomies, max_queries=args.max_queries))
    out = {"manifest": str(args.manifest), "studies": len(reports), "skipped": skipped,
           "settings": [asdict(r) for r in results]}
    for r in results:
        for name, m in r.methods.items():
            print(r.setting, name, json.dumps({"queries": r.queries, "recall": m.recall, "ndcg": m.ndcg}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["timing", "sanity", "quality"])
    ap.add_argument("--manifest", help="quality: CT studies with reports, images[0] a series folder")
    ap.add_argument("--max-queries", type=int)
    ap.add_argument("--tower", default="astra")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slab", type=int, default=5, help="slices per slab (sanity)")
    ap.add_argument("--previews", help="folder for preview PNGs (sanity)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    res = {"timing": timing, "sanity": sanity, "quality": quality}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
