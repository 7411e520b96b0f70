"""``medrag search``: similar cases for an image, a stored study or a text.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

import msgspec


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("search", help="find similar cases")
    s.add_argument("--index", required=True)
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", nargs="+", help="query image(s) of one study (PNG/JPEG/DICOM)")
    what.add_argument("--study", help="id of a study already in the index")
    what.add_argument("--text", help="free-text query")
    s.add_argument("--reports", action="store_true", help="rank reports (image->report, text->report)")
    s.add_argument("--anatomy", help='condition on an anatomy, e.g. "left lung"')
    s.add_argument("--finding", help="only cases whose report states this finding (in --anatomy if given)")
    s.add_argument("--finding-by", choices=("report", "image"), default="report",
                   help="report: only cases whose report states --finding; image: ask --finding of the "
                   "images (encoders with a label probe), so cases without a report count too")
    s.add_argument("--include-uncertain", action="store_true", help="hedged findings pass --finding")
    s.add_argument("--modality", action="append", help="restrict to modality (repeatable)")
    s.add_argument("--exclude-patient", help="exclude this patient id's studies")
    s.add_argument("--other-patients", action="store_true", help="with --study: skip the same patient")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.add_argument("--heatmaps", metavar="DIR", help="with --image and --anatomy: write PNG overlays of where the "
                   "anatomy's query looked, on the query and on each hit (medrag-native encoders)")
    s.set_defaults(func=_cmd_search)


def _cmd_search(a: argparse.Namespace) -> int:
    from retrieval.imaging.images import load_image
    from retrieval.index import open_index
    from retrieval.search import Query, Searcher

    index = open_index(a.index)
    searcher = Searcher.for_index(index, device=a.device, load_text=bool(a.text) or a.reports)
    exclude = None
    if a.exclude_patient:  # the index holds the keyed pseudonym of the id the user types
        from indexer.deid import patient_pseudonym

        exclude = patient_pseudonym(a.exclude_patient)
    q = Query(k=a.k, anatomy=a.anatomy, finding=a.finding, finding_by=a.finding_by,
              include_uncertain=a.include_uncertain,
              modality=tuple(a.modality) if a.modality else None, exclude_patient_id=exclude)
    if a.heatmaps and not (a.image and a.anatomy):
        raise ValueError("--heatmaps needs --image and --anatomy")
    if a.image:
        images = [load_image(f) for f in a.image]
        res = searcher.reports_by_image(images, q) if a.reports else searcher.by_image(images, q)
    elif a.study:
        res = searcher.by_study(a.study, q, same_patient=not a.other_patients)
    else:
        res = searcher.reports_by_text(a.text, q) if a.reports else searcher.by_text(a.text, q)
    if a.heatmaps:
        paths = _heatmaps(a.heatmaps, searcher, index, images, a.anatomy, res.hits, a.index)
    if a.json:
        print(msgspec.json.format(msgspec.json.encode(res), indent=1).decode())
        return 0
    print(f"{res.mode} in space '{res.space}' (conditioning: {res.conditioning}); "
          f"index {index.meta.backend} {index.meta.version}, {len(index)} points")
    if not res.hits:
        print("no matching cases")
    for rank, h in enumerate(res.hits, 1):
        print(f"{rank:2d}. {h.score:+.4f}  study {h.study_id}  {h.modality or '-'}  {h.study_date or ''}  "
              f"{h.image or '(report only)'}")  # an opaque image reference, never a path
        if h.matched_entities:
            print(f"      entities: {', '.join(str(e) for e in h.matched_entities)}")
        if h.labels is not None:  # a labelled set: what the case is labelled with
            print(f"      labels: {', '.join(h.labels) or 'No Finding'}")
        if h.report or h.labels is None:
            snippet = (h.report or "(no report)").replace("\n", " ")
            print(textwrap.indent(textwrap.shorten(snippet, 160), "      "))
    if a.heatmaps:
        print(f"attention heat-maps ({a.anatomy}): {len(paths)} PNGs in {a.heatmaps}")
    return 0


def _heatmaps(out_dir: str, searcher: Any, index: Any, images: list[Any], anatomy: str,
              hits: list[Any], uri: str) -> list[str]:
    """query_<i>.png and hit_<rank>_<study>.png: the anatomy query's attention over each image."""
    from pathlib import Path

    from indexer.phi import stored_image_path
    from retrieval.imaging.images import load_image
    from retrieval.imaging.overlay import overlay_png

    enc: Any = getattr(searcher, "image_encoder", None)
    if not hasattr(enc, "attention_maps"):
        raise ValueError("--heatmaps needs an index built with a medrag-native encoder (it has attention)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    named = [(f"query_{i}.png", img) for i, img in enumerate(images)]
    root = getattr(getattr(index, "meta", None), "image_root", None)
    for rank, h in enumerate(hits, 1):
        if getattr(h, "image", None):
            named.append((f"hit_{rank:02d}_{h.study_id}.png", load_image(stored_image_path(h.image, uri, root))))
    for name, img in named:
        (out / name).write_bytes(overlay_png(img, enc.attention_maps([img], anatomy=anatomy)[0]))
        written.append(str(out / name))
    return written
