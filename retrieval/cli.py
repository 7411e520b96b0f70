"""``medrag``: one console script whose verbs mirror the jobs.

    medrag index manifest {folder,r2gen,dicom} ...   write a manifest from what you have
    medrag index build MANIFEST --index URI ...      encode and publish an index version (resumable)
    medrag index add MANIFEST --index URI            add/replace studies;  index delete --study ID ...
    medrag index info --index URI                    what an index holds
    medrag search --index URI (--image F | --study ID | --text T) [--anatomy A] [--finding F]
    medrag serve --index URI --api-keys FILE [--port 8000]       the API and the web page
    medrag train MANIFEST --out DIR [--preset cpu-small|gpu]   train medrag-native
    medrag draft --index URI --image F [--prior-image P --prior-report R] [--generator ...]
    medrag eval {retrieval,draft,load,speed,entities,synth} ... measure

User errors (unknown anatomy, missing file, wrong index) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
import warnings
from dataclasses import asdict
from pathlib import Path

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pydicom reports every slightly-off header value of real archives; medrag reports what it
    # actually skips, file by file, instead.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    from indexer.images import ImageLoadError
    from indexer.manifest import ManifestError
    from indexer.segments import BuildLockedError
    from indexer.sources.dicomweb import DicomWebError
    from retrieval.encoders import EncoderError
    from retrieval.index import IndexError_
    from retrieval.rag.http import GeneratorError
    from retrieval.search import SearchError
    from retrieval.taxonomy import UnknownTermError

    try:
        return int(args.func(args) or 0)
    except (DicomWebError, UnknownTermError, ImageLoadError, ManifestError, EncoderError, IndexError_, SearchError,
            GeneratorError, BuildLockedError, FileNotFoundError, ValueError) as exc:
        print(f"medrag: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medrag", description="medical image retrieval and report drafting")
    sub = p.add_subparsers(metavar="COMMAND")

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

    b = idx.add_parser("build", help="encode a manifest and publish an index version")
    b.add_argument("manifest")
    b.add_argument("--index", required=True, help="faiss:/dir | qdrant+local:/dir | http://host:6333/name")
    b.add_argument("--encoder", default="pixels", help="image encoder family (see `medrag index encoders`)")
    b.add_argument("--checkpoint", help="local weights directory for the image encoder")
    b.add_argument("--text-encoder", default="minilm", help="report encoder family, or 'none'")
    b.add_argument("--kind", choices=["flat", "hnsw", "ivf"], help="index structure (backend default if unset)")
    b.add_argument("--conditioning", help="comma-separated anatomies to embed (default: taxonomy's list)")
    b.add_argument("--batch-size", type=int, default=16)
    b.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.add_argument("--work-dir", help="segments, lock and build record (default: <index>/.build)")
    b.add_argument("--segment-size", type=int, default=256, help="studies per resumable segment")
    b.add_argument("--random-init", action="store_true", help="untrained medrag-native (baselines, tests)")
    b.set_defaults(func=_cmd_build)
    ad = idx.add_parser("add", help="add or replace studies (by id) in a published index, encoding only those")
    ad.add_argument("manifest")
    ad.add_argument("--index", required=True)
    ad.add_argument("--work-dir")
    ad.add_argument("--no-progress", action="store_true")
    ad.add_argument("--json", action="store_true")
    ad.set_defaults(func=_cmd_add)
    de = idx.add_parser("delete", help="publish a new version without the given studies")
    de.add_argument("--index", required=True)
    de.add_argument("--study", nargs="+", required=True, help="study id(s)")
    de.add_argument("--work-dir")
    de.add_argument("--json", action="store_true")
    de.set_defaults(func=_cmd_delete)
    info = idx.add_parser("info", help="describe a published index")
    info.add_argument("--index", required=True)
    info.set_defaults(func=_cmd_info)
    enc = idx.add_parser("encoders", help="list encoder families")
    enc.set_defaults(func=_cmd_encoders)

    t = sub.add_parser("train", help="train the medrag-native encoder from (image, report) pairs")
    t.add_argument("manifest", help="manifest with images and reports")
    t.add_argument("--out", required=True, help="output folder; the checkpoint is <out>/checkpoint")
    t.add_argument("--preset", choices=["cpu-small", "gpu"], default="cpu-small")
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

    ev = sub.add_parser("eval", help="measure quality").add_subparsers(metavar="WHAT")
    er = ev.add_parser("retrieval", help="Recall/NDCG/RateScore per anatomy against report-mined similarity")
    er.add_argument("manifest")
    er.add_argument("--out", required=True, help="folder for retrieval.json and recall_at_k.png")
    er.add_argument("--reports-only", action="store_true", help="text->text with report embeddings")
    er.add_argument("--method", action="append", default=[], metavar="NAME=FAMILY[:CHECKPOINT]",
                    help="an image encoder to evaluate (repeatable)")
    er.add_argument("--anatomies", default="lung,left lung,right lung,heart,pleura")
    er.add_argument("--max-queries", type=int)
    er.add_argument("--seed", type=int, default=0)
    er.add_argument("--device", default="cpu")
    er.set_defaults(func=_cmd_eval_retrieval)
    ed = ev.add_parser("draft", help="leave-one-out drafting: entity F1, BLEU-4, ROUGE-L, citations")
    ed.add_argument("manifest")
    ed.add_argument("--out", required=True, help="folder for draft.json")
    ed.add_argument("-k", type=int, default=5, help="retrieved cases per draft")
    ed.add_argument("--max-queries", type=int)
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--device", default="cpu")
    ed.set_defaults(func=_cmd_eval_draft)
    el = ev.add_parser("load", help="API load benchmark: req/s and p50/p99 from a second process on loopback")
    el.add_argument("--index", required=True)
    el.add_argument("--out", required=True, help="folder for load.json")
    el.add_argument("--requests", type=int, default=400, help="per scenario (upper bound)")
    el.add_argument("--concurrency", type=int, default=4)
    el.add_argument("--max-seconds", type=float, default=60.0, help="per scenario (upper bound)")
    el.add_argument("-k", type=int, default=10)
    el.set_defaults(func=_cmd_eval_load)
    sp = ev.add_parser("speed", help="build/query N x D vectors on FAISS HNSW/IVF and embedded Qdrant vs exact")
    sp.add_argument("--out", required=True, help="folder for speed.json")
    sp.add_argument("-n", type=int, default=1_000_000)
    sp.add_argument("--dim", type=int, default=512)
    sp.add_argument("--queries", type=int, default=200)
    sp.add_argument("--backends", default="faiss:hnsw,faiss:ivf,qdrant+local:hnsw")
    sp.add_argument("--work-dir", help="where the temporary indexes go (needs ~3x the vectors' size)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=_cmd_eval_speed)
    ee = ev.add_parser("entities", help="extractor precision/recall on hand-checked reports")
    ee.add_argument("--gold", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/iu_xray_gold50.json"))
    ee.add_argument("--annotation", required=True, help="IU X-ray annotation.json")
    ee.add_argument("--errors", action="store_true")
    ee.set_defaults(func=_cmd_eval_entities)
    es = ev.add_parser("synth", help="write the synthetic paired image/report set")
    es.add_argument("--out", required=True)
    es.add_argument("-n", "--studies", type=int, default=600)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--size", type=int, default=160)
    es.set_defaults(func=_cmd_eval_synth)

    sv = sub.add_parser("serve", help="the HTTP API and the web page")
    sv.add_argument("--index", help="index URI to serve")
    sv.add_argument("--api-keys", help="JSON file of hashed API keys")
    sv.add_argument("--add-key", metavar="NAME", help="create a key for NAME in --api-keys, print it once, exit")
    sv.add_argument("--allow-anonymous", action="store_true", help="no API key needed (local development only)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--generator", choices=["extractive", "vlm", "http"], default="extractive")
    sv.add_argument("--model-dir")
    sv.add_argument("--base-url")
    sv.add_argument("--model")
    sv.add_argument("--max-body-mb", type=int, default=64)
    sv.add_argument("--no-text-encoder", action="store_true", help="do not load the report encoder")
    sv.set_defaults(func=_cmd_serve)

    d = sub.add_parser("draft", help="draft a comparative report from retrieved analog cases")
    d.add_argument("--index", required=True)
    d.add_argument("--image", nargs="+", required=True, help="current study image(s) (PNG/JPEG/DICOM)")
    d.add_argument("--prior-image", nargs="+", default=[], help="prior study image(s) of the same patient")
    d.add_argument("--prior-report", help="prior study report: a text file")
    d.add_argument("--prior-study", help="prior study id (it is then never used as an analog case)")
    d.add_argument("--prior-date", help="prior study date (YYYY-MM-DD)")
    d.add_argument("--anatomy", help="condition retrieval on an anatomy")
    d.add_argument("--finding", help="only analog cases stating this finding")
    d.add_argument("--exclude-patient", help="do not draft from this patient's studies")
    d.add_argument("-k", type=int, default=5, help="analog cases to retrieve")
    d.add_argument("--generator", choices=["extractive", "vlm", "http"], default="extractive")
    d.add_argument("--model-dir", help="vlm: local transformers model directory")
    d.add_argument("--base-url", help="http: OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    d.add_argument("--model", help="http: model name on that server")
    d.add_argument("--api-key-env", default="MEDRAG_LLM_API_KEY", help="http: environment variable holding the key")
    d.add_argument("--timeout", type=float, default=120.0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_draft)

    s = sub.add_parser("search", help="find similar cases")
    s.add_argument("--index", required=True)
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="query image(s) of one study (PNG/JPEG/DICOM)")
    what.add_argument("--study", help="id of a study already in the index")
    what.add_argument("--text", help="free-text query")
    s.add_argument("--reports", action="store_true", help="rank reports (image->report, text->report)")
    s.add_argument("--anatomy", help='condition on an anatomy, e.g. "left lung"')
    s.add_argument("--finding", help="only cases whose report states this finding (in --anatomy if given)")
    s.add_argument("--include-uncertain", action="store_true", help="hedged findings pass --finding")
    s.add_argument("--modality", action="append", help="restrict to modality (repeatable)")
    s.add_argument("--exclude-patient", help="exclude this patient id's studies")
    s.add_argument("--other-patients", action="store_true", help="with --study: skip the same patient")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_search)
    return p


# ---- commands ----------------------------------------------------------------------------------
def _finish_manifest(result, out: str) -> int:
    from indexer.manifest import write_manifest

    n = write_manifest(out, result.studies)
    print(f"wrote {n} studies to {out}; skipped {len(result.skipped)}")
    for s in result.skipped[:50]:
        print(f"  skipped: {s}")
    if len(result.skipped) > 50:
        print(f"  ... and {len(result.skipped) - 50} more")
    return 0 if n else EXIT_USAGE


def _cmd_manifest_folder(a: argparse.Namespace) -> int:
    from indexer.sources.folder import from_folder

    return _finish_manifest(from_folder(a.folder, a.reports, a.out), a.out)


def _cmd_manifest_r2gen(a: argparse.Namespace) -> int:
    from indexer.sources.r2gen import from_r2gen

    res = from_r2gen(a.annotation, a.images_root, a.out, tuple(a.splits.split(",")),
                     require_images=not a.reports_only)
    return _finish_manifest(res, a.out)


def _cmd_manifest_dicom(a: argparse.Namespace) -> int:
    from indexer.sources.dicom_folder import from_dicom_folder

    return _finish_manifest(from_dicom_folder(a.folder, a.out, a.reports, a.allow_burned_in), a.out)


def _cmd_manifest_dicomweb(a: argparse.Namespace) -> int:
    import os

    from indexer.sources.dicomweb import from_dicomweb

    user, password = os.environ.get("MEDRAG_DICOMWEB_USER"), os.environ.get("MEDRAG_DICOMWEB_PASSWORD")
    res = from_dicomweb(a.url, a.cache, a.out, since=a.since, orthanc_url=a.orthanc, reports_csv=a.reports,
                        allow_burned_in=a.allow_burned_in, auth=(user, password) if user and password else None)
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
                      segment_size=a.segment_size)
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
    return 0


def _cmd_add(a: argparse.Namespace) -> int:
    from indexer.build import add_studies

    return _print_build(add_studies(a.manifest, a.index, progress=not a.no_progress, work_dir=a.work_dir), a.json)


def _cmd_delete(a: argparse.Namespace) -> int:
    from indexer.build import delete_studies

    return _print_build(delete_studies(a.index, a.study, work_dir=a.work_dir), a.json)


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


def _cmd_train(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from indexer.train import PRESETS, train

    cfg = PRESETS[a.preset]
    over = {k: v for k, v in {"epochs": a.epochs, "batch_size": a.batch_size, "image_size": a.image_size,
                              "lr": a.lr, "seed": a.seed, "device": a.device, "threads": a.threads}.items()
            if v is not None}
    if a.anatomies:
        over["anatomies"] = tuple(x.strip() for x in a.anatomies.split(","))
    res = train(a.manifest, a.out, replace(cfg, **over), resume=a.resume, progress=not a.no_progress)
    last = res.history[-1] if res.history else {}
    print(f"checkpoint {res.out_dir} ({res.epochs_run} epochs in {res.seconds:.0f}s); "
          f"last loss {last.get('loss', float('nan')):.4f}; val Recall@5 {last.get('val_recall@5')}")
    print(f"curve: {Path(a.out) / 'training_curve.png'}")
    return 0


def _cmd_eval_retrieval(a: argparse.Namespace) -> int:
    from eval.retrieval import EvalConfig, format_table, run

    encoders = {}
    for spec in a.method:
        name, _, rest = spec.partition("=")
        family, _, ckpt = rest.partition(":")
        if not name or not family:
            raise ValueError(f"--method {spec!r}: expected NAME=FAMILY[:CHECKPOINT]")
        encoders[name] = (family, ckpt or None)
    cfg = EvalConfig(anatomies=tuple(x.strip() for x in a.anatomies.split(",") if x.strip()),
                     max_queries=a.max_queries, seed=a.seed)
    payload = run(a.manifest, a.out, encoders, cfg, reports_only=a.reports_only, device=a.device)
    print(format_table(payload))
    print(f"{payload['studies']} studies, {payload['seconds']}s; wrote {a.out}/retrieval.json and recall_at_k.png")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import os

    if a.add_key:
        from api.keys import add_key

        if not a.api_keys:
            raise ValueError("--add-key needs --api-keys FILE")
        key = add_key(a.api_keys, a.add_key)
        print(f"API key for {a.add_key} (shown once; only its hash is stored in {a.api_keys}):\n{key}")
        return 0
    if not a.index:
        raise ValueError("--index is required")
    if not a.api_keys and not a.allow_anonymous:
        raise ValueError("--api-keys FILE is required (create a key with --api-keys FILE --add-key NAME)")
    import uvicorn

    from api.app import create_app
    from api.settings import Settings

    settings = Settings(index=a.index, api_keys_file=a.api_keys, allow_anonymous=a.allow_anonymous, device=a.device,
                        max_body_bytes=a.max_body_mb * 1024 * 1024, generator=a.generator,
                        generator_model_dir=a.model_dir, generator_base_url=a.base_url, generator_model=a.model,
                        generator_api_key=os.environ.get("MEDRAG_LLM_API_KEY"),
                        load_text_encoder=not a.no_text_encoder)
    logging.getLogger("medrag.api").setLevel(logging.INFO)
    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="warning", access_log=False)
    return 0


def _cmd_eval_speed(a: argparse.Namespace) -> int:
    from eval.speed import format_table, run

    r = run(a.out, n=a.n, dim=a.dim, nq=a.queries, seed=a.seed, work_dir=a.work_dir,
            backends=tuple(x.strip() for x in a.backends.split(",") if x.strip()))
    print(format_table(r))
    print(f"{r['seconds']}s; wrote {a.out}/speed.json")
    return 0


def _cmd_eval_load(a: argparse.Namespace) -> int:
    from eval.load import format_table, run

    r = run(a.index, a.out, requests=a.requests, concurrency=a.concurrency, max_seconds=a.max_seconds, k=a.k)
    print(format_table(r))
    print(f"concurrency {r['concurrency']}, k={r['k']}, server start {r['server_startup_s']}s; wrote {a.out}/load.json")
    return 0


def _cmd_eval_draft(a: argparse.Namespace) -> int:
    from eval.drafting import format_table, run

    r = run(a.manifest, a.out, k=a.k, max_queries=a.max_queries, seed=a.seed, device=a.device)
    print(format_table(r))
    print(f"{r['queries']} held-out reports, k={r['k']}, {r['seconds']}s; wrote {a.out}/draft.json")
    return 0


def _cmd_draft(a: argparse.Namespace) -> int:
    import os

    from indexer.images import load_image
    from retrieval.index import open_index
    from retrieval.rag import create_generator
    from retrieval.rag.draft import draft_report
    from retrieval.search import Query, Searcher

    if a.generator == "vlm" and not a.model_dir:
        raise ValueError("--generator vlm needs --model-dir (a local transformers model directory)")
    if a.generator == "http" and not (a.base_url and a.model):
        raise ValueError("--generator http needs --base-url and --model")
    prior_report = None
    if a.prior_report:
        prior_report = Path(a.prior_report).read_text(encoding="utf-8", errors="replace")
    if a.prior_image and not prior_report:
        print("medrag: note: --prior-image without --prior-report: interval changes need the prior report",
              file=sys.stderr)
    gen = create_generator(a.generator, model_dir=a.model_dir, base_url=a.base_url, model=a.model,
                           api_key=os.environ.get(a.api_key_env), timeout=a.timeout, device=a.device)
    index = open_index(a.index)
    searcher = Searcher.for_index(index, device=a.device, load_text=False)
    q = Query(k=a.k, anatomy=a.anatomy, finding=a.finding, exclude_patient_id=a.exclude_patient)
    draft = draft_report(searcher, [load_image(f) for f in a.image], gen, q,
                         prior_images=[load_image(f) for f in a.prior_image], prior_report=prior_report,
                         prior_study_id=a.prior_study or "prior", prior_date=a.prior_date)
    print(json.dumps(asdict(draft), indent=1) if a.json else draft.render())
    return 0


def _cmd_eval_entities(a: argparse.Namespace) -> int:
    from eval.entities import score

    r = score(a.gold, a.annotation)
    print(json.dumps({k: v for k, v in r.items() if a.errors or k != "errors"}, indent=1))
    return 0


def _cmd_eval_synth(a: argparse.Namespace) -> int:
    from eval.synthetic import generate

    path = generate(a.out, a.studies, a.seed, a.size)
    print(f"wrote {a.studies} synthetic studies: {path}")
    return 0


def _cmd_search(a: argparse.Namespace) -> int:
    from indexer.images import load_image
    from retrieval.index import open_index
    from retrieval.search import Query, Searcher

    index = open_index(a.index)
    searcher = Searcher.for_index(index, device=a.device, load_text=bool(a.text) or a.reports)
    q = Query(k=a.k, anatomy=a.anatomy, finding=a.finding, include_uncertain=a.include_uncertain,
              modality=tuple(a.modality) if a.modality else None, exclude_patient_id=a.exclude_patient)
    if a.image:
        images = [load_image(f) for f in a.image]
        res = searcher.reports_by_image(images, q) if a.reports else searcher.by_image(images, q)
    elif a.study:
        res = searcher.by_study(a.study, q, same_patient=not a.other_patients)
    else:
        res = searcher.reports_by_text(a.text, q) if a.reports else searcher.by_text(a.text, q)
    if a.json:
        print(json.dumps(asdict(res), indent=1))
        return 0
    print(f"{res.mode} in space '{res.space}' (conditioning: {res.conditioning}); "
          f"index {index.meta.backend} {index.meta.version}, {len(index)} points")
    if not res.hits:
        print("no matching cases")
    for rank, h in enumerate(res.hits, 1):
        print(f"{rank:2d}. {h.score:+.4f}  study {h.study_id}  {h.modality or '-'}  {h.study_date or ''}  "
              f"{h.image or '(report only)'}")
        if h.matched_entities:
            print(f"      entities: {', '.join(h.matched_entities)}")
        snippet = (h.report or "(no report)").replace("\n", " ")
        print(textwrap.indent(textwrap.shorten(snippet, 160), "      "))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
