"""``medrag eval``: the measurement harnesses (retrieval, drafting, load, speed, entities, synth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    di = ev.add_parser("draft-images", help="drafting from images: every image of a folder drafted as `medrag draft` "
                       "would (analog cases from an index built on another folder), scored on the folder's own truth")
    di.add_argument("folder", help="query folder in the shared layout (labels.csv or metadata.csv beside images/)")
    di.add_argument("--index", required=True, help="index built on another folder (its encoder reads the images)")
    di.add_argument("--out", required=True, help="folder for draft_images.json")
    di.add_argument("-k", type=int, default=5, help="analog cases per draft")
    di.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap resamples for the 95%% intervals")
    di.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    di.add_argument("--max-queries", type=int, help="draft only the first N images")
    di.add_argument("--no-priors", action="store_true",
                    help="do not give a patient's earlier image (same folder) as the prior")
    di.add_argument("--device", default="cpu", help="torch device for the encoder")
    di.set_defaults(func=_cmd_eval_draft_images)
    ed = ev.add_parser("draft", help="drafting with ORACLE retrieval (cases found by the held-out report's own text): "
                       "entity F1, BLEU-1..4, ROUGE-L, CIDEr, contradictions")
    ed.add_argument("manifest", help="the studies to draft (their reports are held out)")
    ed.add_argument("--out", required=True, help="folder for draft.json")
    ed.add_argument("--corpus", help="manifest to retrieve from (e.g. the train split); default: leave-one-out")
    ed.add_argument("--duplicates", choices=["keep", "exclude", "both"], default="both",
                    help="corpus reports with the query's exact text: keep, exclude, or score both ways")
    ed.add_argument("--methods", help="comma-separated subset of the drafting methods")
    ed.add_argument("-k", type=int, default=5, help="retrieved cases per draft")
    ed.add_argument("--max-queries", type=int)
    ed.add_argument("--seed", type=int, default=0, help="query sample and bootstrap seed")
    ed.add_argument("--bootstrap", type=int, default=2000,
                    help="paired-bootstrap resamples for the 95%% CIs of (method - copy-nearest); 0: none")
    ed.add_argument("--device", default="cpu")
    ed.set_defaults(func=_cmd_eval_draft)
    el = ev.add_parser("load", help="API load benchmark: req/s and p50/p99 from a second process on loopback")
    el.add_argument("--index", required=True)
    el.add_argument("--out", required=True, help="folder for load.json")
    el.add_argument("--requests", type=int, default=400, help="per scenario (upper bound)")
    el.add_argument("--concurrency", type=int, default=4)
    el.add_argument("--max-seconds", type=float, default=60.0, help="per scenario (upper bound)")
    el.add_argument("-k", type=int, default=10)
    el.add_argument("--warmup", type=int, default=50, help="uncounted requests per scenario first, same concurrency")
    el.add_argument("--torch-threads", type=int, help="passed to the server (medrag serve --torch-threads)")
    el.add_argument("--faiss-threads", type=int, help="passed to the server (medrag serve --faiss-threads)")
    el.set_defaults(func=_cmd_eval_load)
    sp = ev.add_parser("speed", help="build/query N x D vectors on FAISS HNSW/IVF and embedded Qdrant vs exact")
    sp.add_argument("--out", required=True, help="folder for speed.json")
    sp.add_argument("-n", type=int, default=1_000_000)
    sp.add_argument("--dim", type=int, default=512)
    sp.add_argument("--queries", type=int, default=200)
    sp.add_argument("--backends", default="faiss:hnsw,faiss:ivf,qdrant+local:hnsw")
    sp.add_argument("--work-dir", help="where the temporary indexes go (needs ~3x the vectors' size)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--gpu", action="store_true",
                    help="GPU FAISS kinds (gpu-flat, gpu-ivf, gpu-ivfpq, gpu-cagra) beside CPU HNSW; needs medrag[gpu]")
    sp.add_argument("--batch-sizes", default="64,1024", help="queries per call for the queries/s columns")
    sp.set_defaults(func=_cmd_eval_speed)
    ee = ev.add_parser("entities", help="extractor precision/recall on hand-checked reports")
    ee.add_argument("--gold", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/iu_xray_gold50.json"))
    ee.add_argument("--annotation", required=True, help="IU X-ray annotation.json")
    ee.add_argument("--errors", action="store_true")
    ee.set_defaults(func=_cmd_eval_entities)
    ec = ev.add_parser("cxr", help="image retrieval on a labelled / notes folder: Jaccard@10, P@10 per finding, "
                                   "mAP@10 vs random, pixels, frozen ImageNet (and a checkpoint)")
    ec.add_argument("folder", help="folder in the shared layout (labels.csv or metadata.csv beside images/)")
    ec.add_argument("--checkpoint", help="a trained medrag-native checkpoint to score against the baselines")
    ec.add_argument("--out", required=True, help="folder for cxr_eval.json")
    ec.add_argument("-k", type=int, default=10)
    ec.add_argument("--device", default="cpu")
    ec.add_argument("--settings-compared", type=int, default=1,
                    help="training settings compared on these data before this run (printed with every table)")
    ec.set_defaults(func=_cmd_eval_cxr)
    ev_cv = ev.add_parser("cxr-cv", help="k-fold cross-validation by patient: train on k-1 folds, score the held-out "
                                         "fold, pool; paired-bootstrap CIs")
    ev_cv.add_argument("folder")
    ev_cv.add_argument("--out", required=True, help="folder for cxr_cv.json and the fold checkpoints")
    ev_cv.add_argument("--preset", help="training preset (default: cxr-notes-cpu for a metadata.csv folder, else cxr-cpu)")
    ev_cv.add_argument("--folds", type=int, default=5)
    ev_cv.add_argument("--epochs", type=int)
    ev_cv.add_argument("--image-size", type=int, help="override the preset's input side")
    ev_cv.add_argument("--probe-c", type=float, help="override the preset's linear-probe C (0: no probe)")
    ev_cv.add_argument("--probe-weight", type=float, help="override the preset's probe weight")
    ev_cv.add_argument("--spatial-prior", type=float, help="override the preset's atlas attention bias")
    ev_cv.add_argument("-k", type=int, default=10)
    ev_cv.add_argument("--device", default="cpu")
    ev_cv.set_defaults(func=_cmd_eval_cxr_cv)
    es = ev.add_parser("synth", help="write the synthetic paired image/report set")
    es.add_argument("--out", required=True)
    es.add_argument("-n", "--studies", type=int, default=600)
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--size", type=int, default=160)
    es.set_defaults(func=_cmd_eval_synth)
    eid = ev.add_parser("deid", help="report-text de-identification: recall on planted PHI, false positives "
                                     "on the original IU X-ray texts")
    eid.add_argument("annotation", help="IU X-ray annotation.json")
    eid.add_argument("--n", type=int, default=1000, help="reports to plant PHI into")
    eid.add_argument("--seed", type=int, default=0)
    eid.add_argument("--out", help="folder for result.json")
    eid.set_defaults(func=_cmd_eval_deid)


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


def _cmd_eval_speed(a: argparse.Namespace) -> int:
    from eval.speed import GPU_BACKENDS, format_table, run

    backends = GPU_BACKENDS if a.gpu else tuple(x.strip() for x in a.backends.split(",") if x.strip())
    r = run(a.out, n=a.n, dim=a.dim, nq=a.queries, seed=a.seed, work_dir=a.work_dir, backends=backends,
            batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",") if b.strip()))
    print(format_table(r))
    print(f"{r['seconds']}s; wrote {a.out}/speed.json")
    return 0


def _cmd_eval_load(a: argparse.Namespace) -> int:
    from eval.load import format_table, run

    serve_args = [f"--{name}-threads={n}" for name, n in (("torch", a.torch_threads), ("faiss", a.faiss_threads))
                  if n is not None]
    r = run(a.index, a.out, requests=a.requests, concurrency=a.concurrency, max_seconds=a.max_seconds, k=a.k,
            warmup=a.warmup, serve_args=serve_args)
    print(format_table(r))
    print(f"concurrency {r['concurrency']}, k={r['k']}, server start {r['server_startup_s']}s; wrote {a.out}/load.json")
    return 0


def _cmd_eval_draft_images(a: argparse.Namespace) -> int:
    from eval.draft_images import evaluate_drafts, format_table

    r = evaluate_drafts(a.folder, a.index, a.out, k=a.k, bootstrap=a.bootstrap, seed=a.seed, limit=a.max_queries,
                        priors=not a.no_priors, device=a.device, progress=True)
    print(format_table(r))
    print(f"{r['seconds']}s; wrote {a.out}/draft_images.json")
    return 0


def _cmd_eval_draft(a: argparse.Namespace) -> int:
    from eval.drafting import format_table, run

    only = tuple(x.strip() for x in a.methods.split(",") if x.strip()) if a.methods else None
    r = run(a.manifest, a.out, k=a.k, max_queries=a.max_queries, seed=a.seed, device=a.device,
            corpus=a.corpus, duplicates=a.duplicates, only=only, bootstrap=a.bootstrap)
    print(format_table(r))
    print(f"k={r['k']}, {r['seconds']}s; wrote {a.out}/draft.json")
    return 0


def _cmd_eval_entities(a: argparse.Namespace) -> int:
    from eval.entities import score

    r = score(a.gold, a.annotation)
    print(json.dumps({k: v for k, v in r.items() if a.errors or k != "errors"}, indent=1))
    return 0


def _cmd_eval_cxr(a: argparse.Namespace) -> int:
    from eval.labelled import CxrEvalConfig, format_table, score_directory

    r = score_directory(a.folder, a.checkpoint, a.out, CxrEvalConfig(k=a.k, settings_compared=a.settings_compared),
                        device=a.device)
    print(format_table(r))
    print(f"{r['studies']} studies, {r['seconds']}s; wrote {a.out}/cxr_eval.json")
    return 0


def _cmd_eval_cxr_cv(a: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from eval.labelled import CxrEvalConfig, cross_validate, format_table
    from indexer.train import PRESETS

    preset = a.preset or ("cxr-notes-cpu" if (Path(a.folder) / "metadata.csv").is_file() else "cxr-cpu")
    over = {k: v for k, v in {"epochs": a.epochs, "image_size": a.image_size, "probe_c": a.probe_c,
                              "probe_weight": a.probe_weight, "spatial_prior": a.spatial_prior}.items()
            if v is not None}
    cfg = replace(PRESETS[preset], **over)
    r = cross_validate(a.folder, cfg, a.out, folds=a.folds, cfg=CxrEvalConfig(k=a.k), device=a.device)
    print(format_table(r))
    per_fold = ", ".join(f"{f['train_seconds']:.0f}" for f in r["folds"])
    print(f"{r['studies']} studies, {a.folds} folds (train seconds per fold: {per_fold}), {r['seconds']}s; "
          f"wrote {a.out}/cxr_cv.json")
    return 0


def _cmd_eval_synth(a: argparse.Namespace) -> int:
    from eval.synthetic import generate

    path = generate(a.out, a.studies, a.seed, a.size)
    print(f"wrote {a.studies} synthetic studies: {path}")
    return 0


def _cmd_eval_deid(a: argparse.Namespace) -> int:
    from eval.deid import format_table, run_deid_eval

    r = run_deid_eval(a.annotation, n=a.n, seed=a.seed)
    print(format_table(r))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(r, indent=1))
        print(f"{r['seconds']}s; wrote {out}/result.json")
    return 0
