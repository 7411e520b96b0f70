"""``medrag draft``: a comparative report drafted from retrieved analog cases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from retrieval.index.base import VectorIndex
from retrieval.records import Payload


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    d.add_argument("--generator", choices=["structured", "extractive", "edit", "vlm", "http"], default="structured",
                   help="structured: sentences rendered from the findings table (the image's reading + the cases' "
                   "votes; the default); extractive / edit: retrieved sentences, safety-gated; vlm / http: a model")
    d.add_argument("--patient", help="the current study's patient id: that patient's studies are never analog cases, "
                   "and a --prior-study of another patient is refused")
    d.add_argument("--date", help="the current study's date (YYYY-MM-DD): a prior dated after it is refused")
    d.add_argument("--method", choices=["both", "image", "retrieval"], default="both",
                   help="evidence for the findings table: the image reading and the cases (both), or one alone")
    d.add_argument("--edit-base", choices=["nearest+len", "mbr+len"], default="nearest+len",
                   help="edit: the report whose wording is kept: the nearest case's, or the minimum-Bayes-risk "
                   "choice among the top 5 (docs/drafting.md; its weight was chosen on report-retrieval scores)")
    d.add_argument("--model-dir", help="vlm: local transformers model directory")
    d.add_argument("--base-url", help="http: OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    d.add_argument("--model", help="http: model name on that server")
    d.add_argument("--api-key-env", default="MEDRAG_LLM_API_KEY", help="http: environment variable holding the key")
    d.add_argument("--timeout", type=float, default=120.0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_cmd_draft)


def _cmd_draft(a: argparse.Namespace) -> int:
    import os

    from retrieval.imaging.images import load_image
    from retrieval.index import open_index
    from retrieval.rag import create_generator
    from retrieval.rag.draft import check_prior, draft_report
    from retrieval.search import Query, Searcher

    if a.generator == "vlm" and not a.model_dir:
        raise ValueError("--generator vlm needs --model-dir (a local transformers model directory)")
    if a.generator == "http" and not (a.base_url and a.model):
        raise ValueError("--generator http needs --base-url and --model")
    if a.patient and a.exclude_patient and a.patient != a.exclude_patient:
        raise ValueError("--patient and --exclude-patient name different patients: give one")
    patient = a.patient or a.exclude_patient
    if patient:  # the index stores every source's patient ids as keyed pseudonyms (indexer.deid)
        from indexer.deid import patient_pseudonym

        patient = patient_pseudonym(patient)
    prior_report = None
    if a.prior_report:
        prior_report = Path(a.prior_report).read_text(encoding="utf-8", errors="replace")
    gen = create_generator(a.generator, base=a.edit_base if a.generator == "edit" else None, model_dir=a.model_dir,
                           base_url=a.base_url, model=a.model, api_key=os.environ.get(a.api_key_env),
                           timeout=a.timeout, device=a.device)
    index = open_index(a.index)
    prior_date = a.prior_date
    if a.prior_study:
        stored = _stored_prior(index, a.prior_study)
        if stored is not None:
            prior_date = prior_date or stored.study_date
            check_prior(patient, stored.patient_id, None, None)
    check_prior(None, None, a.date, prior_date)
    searcher = Searcher.for_index(index, device=a.device, load_text=False)
    q = Query(k=a.k, anatomy=a.anatomy, finding=a.finding, exclude_patient_id=patient)
    draft = draft_report(searcher, [load_image(f) for f in a.image], gen, q,
                         prior_images=[load_image(f) for f in a.prior_image], prior_report=prior_report,
                         prior_study_id=a.prior_study or "prior", prior_date=prior_date, query_date=a.date,
                         method=a.method)
    print(msgspec.json.format(msgspec.json.encode(draft), indent=1).decode() if a.json else draft.render())
    return 0


def _stored_prior(index: VectorIndex, study_id: str) -> Payload | None:
    from retrieval.index.base import SearchFilter

    points = index.find(SearchFilter(study_ids=[study_id]), limit=1)
    return Payload.of(points[0].payload) if points else None
