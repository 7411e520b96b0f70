"""``medrag index``: manifests from sources, builds, incremental add/delete, info.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from api.cli.common import EXIT_USAGE
from indexer.sources import source


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    idx = sub.add_parser("index", help="offline index builds").add_subparsers(metavar="ACTION")
    man = idx.add_parser("manifest", help="write a manifest from a source").add_subparsers(metavar="SOURCE")
    m1 = man.add_parser("folder", help="PNG/JPEG folder + reports CSV")
    m1.add_argument("folder")
    m1.add_argument("--reports", required=True, help="CSV with study_id,report[,images,...]")
    m1.add_argument("-o", "--out", required=True)
    m1.set_defaults(func=_cmd_manifest_folder)
    m2 = man.add_parser("r2gen", help="IU X-ray / MIMIC-CXR annotation.json (R2Gen layout)")
    m2.add_argument("annotation")
    m2.add_argument("--images-root", help="folder the image_path entries are relative to")
    m2.add_argument("--splits", default="train,val,test")
    m2.add_argument("--reports-only", action="store_true", help="keep studies without images")
    m2.add_argument("-o", "--out", required=True)
    m2.set_defaults(func=_cmd_manifest_r2gen)
    m3 = man.add_parser("dicom", help="folder of DICOM files, grouped by StudyInstanceUID")
    m3.add_argument("folder")
    m3.add_argument("--reports", help="CSV with StudyInstanceUID or AccessionNumber, report")
    m3.add_argument("-o", "--out", required=True)
    m3.add_argument("--allow-burned-in", action="store_true",
                    help="also index images flagged BurnedInAnnotation=YES (they may show identifiers)")
    m3.set_defaults(func=_cmd_manifest_dicom)

    m4 = man.add_parser("dicomweb", help="a PACS over DICOMweb (QIDO-RS + WADO-RS), incremental")
    m4.add_argument("url", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    m4.add_argument("--cache", required=True, help="folder for fetched instances and the sync state")
    m4.add_argument("-o", "--out", required=True)
    m4.add_argument("--since", help="only studies dated on/after YYYY-MM-DD (QIDO); default: since last run")
    m4.add_argument("--orthanc", help="Orthanc REST root: follow its /changes log instead of dates")
    m4.add_argument("--reports", help="CSV with StudyInstanceUID or AccessionNumber, report")
    m4.add_argument("--allow-burned-in", action="store_true")
    m4.set_defaults(func=_cmd_manifest_dicomweb)

    m5 = man.add_parser("labels", help="image folder + CSV of |-separated finding labels (NIH ChestX-ray14 layout)")
    m5.add_argument("folder", help="folder holding the CSV and the images it names")
    m5.add_argument("--csv", help="CSV file name inside the folder (default labels.csv)")
    m5.add_argument("--image-col", default="image")
    m5.add_argument("--labels-col", default="labels")
    m5.add_argument("--patient-col", default="patient_id")
    m5.add_argument("-o", "--out", required=True)
    m5.set_defaults(func=_cmd_manifest_labels)
    m6 = man.add_parser("notes", help="image folder + CSV of free-text notes, patients and day offsets")
    m6.add_argument("folder")
    m6.add_argument("--csv", help="CSV file name inside the folder (default metadata.csv)")
    m6.add_argument("-o", "--out", required=True)
    m6.set_defaults(func=_cmd_manifest_notes)

    b = idx.add_parser("build", help="encode a manifest and publish an index version")
    b.add_argument("manifest")
    b.add_argument("--index", required=True, help="faiss:/dir | qdrant+local:/dir | http://host:6333/name")
    b.add_argument("--encoder", default="pixels", help="image encoder family (see `medrag index encoders`)")
    b.add_argument("--checkpoint", help="local weights directory for the image encoder")
    b.add_argument("--text-encoder", default="minilm", help="report encoder family, or 'none'")
    b.add_argument("--kind", choices=["flat", "hnsw", "ivf", "ivfpq", "gpu-flat", "gpu-ivf", "gpu-ivfpq", "gpu-cagra"],
                   help="index structure (backend default if unset); gpu-* build FAISS on a GPU (medrag[gpu])")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where segments are encoded: this process, or Ray tasks (medrag[ray])")
    b.add_argument("--address", help="Ray cluster address for --engine ray (default: a local Ray for this build)")
    b.add_argument("--workers", type=int, help="CPUs of the local Ray started for --engine ray")
    b.add_argument("--conditioning", help="comma-separated anatomies to embed (default: taxonomy's list)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.add_argument("--work-dir", help="segments, lock and build record (default: <index>/.build)")
    b.add_argument("--segment-size", type=int, default=256, help="studies per resumable segment")
    b.add_argument("--random-init", action="store_true", help="untrained medrag-native (baselines, tests)")
    b.add_argument("--allow-removals", action="store_true",
                   help="publish even if studies the index serves now would go (an image file disappeared, a "
                        "study left the manifest); without it such a build names them and publishes nothing")
    b.set_defaults(func=_cmd_build)
    ad = idx.add_parser("add", help="add or replace studies (by id) in a published index, encoding only those")
    ad.add_argument("manifest")
    ad.add_argument("--index", required=True)
    ad.add_argument("--work-dir")
    ad.add_argument("--no-progress", action="store_true")
    ad.add_argument("--json", action="store_true")
    ad.add_argument("--allow-removals", action="store_true",
                    help="publish even if a replaced study's images are now unreadable (it leaves the index)")
    ad.set_defaults(func=_cmd_add)
    de = idx.add_parser("delete", help="publish a new version without the given studies")
    de.add_argument("--index", required=True)
    de.add_argument("--study", nargs="+", required=True, help="study id(s)")
    de.add_argument("--work-dir")
    de.add_argument("--json", action="store_true")
    de.set_defaults(func=_cmd_delete)
    ve = idx.add_parser("verify", help="check checksums of the published version and every encoded segment; "
                                       "--repair quarantines damaged segments, re-encodes them and republishes")
    ve.add_argument("--index", required=True)
    ve.add_argument("--repair", action="store_true")
    ve.add_argument("--work-dir")
    ve.add_argument("--json", action="store_true")
    ve.set_defaults(func=_cmd_verify)
    info = idx.add_parser("info", help="describe a published index")
    info.add_argument("--index", required=True)
    info.set_defaults(func=_cmd_info)
    enc = idx.add_parser("encoders", help="list encoder families")
    enc.set_defaults(func=_cmd_encoders)


def _cmd_manifest_labels(a: argparse.Namespace) -> int:
    return _finish_manifest(source("labels-csv")(a.folder, a.out, csv_name=a.csv, image_col=a.image_col,
                                                 labels_col=a.labels_col, patient_col=a.patient_col), a.out)


def _cmd_manifest_notes(a: argparse.Namespace) -> int:
    return _finish_manifest(source("notes-csv")(a.folder, a.out, csv_name=a.csv), a.out)


def _finish_manifest(result, out: str) -> int:
    from indexer.manifest import write_manifest

    n = write_manifest(out, result.studies)
    images = sum(len(s.images) for s in result.studies)
    with_report = sum(len(s.images) for s in result.studies if s.report)
    listed = " (listed below)" if result.skipped else ""
    print(f"wrote {n} studies to {out}: {images} images, {with_report} with a report, "
          f"{len(result.skipped)} skipped{listed}; warnings {len(result.warnings)}")
    log = [f"{kind}: {s}" for kind, items in (("skipped", result.skipped), ("warning", result.warnings))
           for s in items]
    if len(result.skipped) > 50 or len(result.warnings) > 50:  # every name kept, the console spared
        Path(f"{out}.log").write_text("".join(f"{line}\n" for line in log), encoding="utf-8")
    for kind, items in (("skipped", result.skipped), ("warning", result.warnings)):
        for s in items[:50]:
            print(f"  {kind}: {s}")
        if len(items) > 50:
            print(f"  ... and {len(items) - 50} more {kind} (all listed in {out}.log)")
    return 0 if n else EXIT_USAGE


def _cmd_manifest_folder(a: argparse.Namespace) -> int:

    return _finish_manifest(source("folder")(a.folder, a.reports, a.out), a.out)


def _cmd_manifest_r2gen(a: argparse.Namespace) -> int:

    res = source("r2gen")(a.annotation, a.images_root, a.out, tuple(a.splits.split(",")),
                     require_images=not a.reports_only)
    return _finish_manifest(res, a.out)


def _cmd_manifest_dicom(a: argparse.Namespace) -> int:

    return _finish_manifest(source("dicom")(a.folder, a.out, a.reports, a.allow_burned_in), a.out)


def _cmd_manifest_dicomweb(a: argparse.Namespace) -> int:
    from retrieval.settings import env

    res = source("dicomweb")(a.url, a.cache, a.out, since=a.since, orthanc_url=a.orthanc, reports_csv=a.reports,
                        allow_burned_in=a.allow_burned_in, auth=env().dicomweb_auth)
    print(f"fetched {res.fetched} new or changed studies")
    return _finish_manifest(res, a.out)


def _cmd_build(a: argparse.Namespace) -> int:
    from indexer.build import BuildConfig, build_index

    cfg = BuildConfig(
        encoder=a.encoder, checkpoint=a.checkpoint,
        text_encoder=None if a.text_encoder in ("none", "") else a.text_encoder,
        conditioning=tuple(x.strip() for x in a.conditioning.split(",")) if a.conditioning else None,
        index_kind=a.kind, batch_size=a.batch_size, device=a.device, allow_random_init=a.random_init)
    if not Path(a.manifest).is_file():
        raise FileNotFoundError(f"manifest {a.manifest} not found")
    rep = build_index(a.manifest, a.index, cfg, progress=not a.no_progress, work_dir=a.work_dir,
                      segment_size=a.segment_size, engine=a.engine, address=a.address, workers=a.workers,
                      allow_removals=a.allow_removals)
    return _print_build(rep, a.json)


def _print_build(rep, as_json: bool) -> int:
    if as_json:
        print(json.dumps(asdict(rep), indent=1))
        return 0
    print(f"published {rep.uri} version {rep.version}: {rep.studies} studies, {rep.points} points "
          f"({rep.images} images, {rep.reports} reports) in {rep.seconds:.1f}s; skipped {len(rep.skipped)}; "
          f"{rep.reused} studies reused from earlier runs, {rep.segments_written} segments encoded")
    for s in rep.skipped[:50]:
        print(f"  skipped: {s}")
    if len(rep.skipped) > 50:
        print(f"  ... and {len(rep.skipped) - 50} more skipped")
    if rep.removed:
        print(f"removed {len(rep.removed)} studies the previous version served: {', '.join(rep.removed[:50])}"
              + (f" and {len(rep.removed) - 50} more" if len(rep.removed) > 50 else ""))
    return 0


def _cmd_add(a: argparse.Namespace) -> int:
    from indexer.build import add_studies

    return _print_build(add_studies(a.manifest, a.index, progress=not a.no_progress, work_dir=a.work_dir,
                                    allow_removals=a.allow_removals), a.json)


def _cmd_delete(a: argparse.Namespace) -> int:
    from indexer.build import delete_studies

    return _print_build(delete_studies(a.index, a.study, work_dir=a.work_dir), a.json)


def _cmd_verify(a: argparse.Namespace) -> int:
    """Exit 0: intact (or repaired); 1: damaged and not repaired."""
    from dataclasses import asdict

    from indexer.verify import format_report, verify_index

    rep = verify_index(a.index, repair=a.repair, work_dir=a.work_dir)
    print(json.dumps(asdict(rep), indent=1) if a.json else format_report(rep))
    return 0 if rep.ok or rep.repaired else 1


def _cmd_info(a: argparse.Namespace) -> int:
    import msgspec

    from retrieval.index import open_index

    ix = open_index(a.index)
    print(json.dumps(msgspec.to_builtins(ix.meta), indent=1))
    return 0


def _cmd_encoders(a: argparse.Namespace) -> int:
    from retrieval.encoders.registry import encoder_spec, list_encoders

    for name in list_encoders():
        spec = encoder_spec(name)
        print(f"{name:14s} {'+'.join(spec.modalities):10s} {spec.doc}")
    return 0
