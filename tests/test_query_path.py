"""The query path's joints (issue 22): what a hit needs is stored at build time and typed at the
index edge; batching wraps the index and encoder the Searcher is built with."""

from __future__ import annotations

from types import SimpleNamespace

from api.app import Service
from retrieval.entities import EntityExtractor
from retrieval.records import Label, Mention

REPORT = "Small left pleural effusion. No pneumothorax. Heart size is normal."


def test_highlights_from_stored_mentions_equal_those_mined_per_request():
    svc = SimpleNamespace(extractor=EntityExtractor())
    matched = [Label("left pleura", "effusion", "present")]
    mined = Service.highlights(svc, REPORT, matched)  # type: ignore[arg-type]  # no mentions stored: mined now
    stored = [Mention(e.span[0], e.span[1], e.anatomy, e.finding, e.status) for e in EntityExtractor().extract(REPORT)]
    assert len(mined) >= 2 and [h.matched for h in mined].count(True) == 1
    assert Service.highlights(svc, REPORT, matched, stored) == mined  # type: ignore[arg-type]
    # stored mentions are used as they are: an empty list is not mined again
    assert Service.highlights(svc, REPORT, matched, []) == []  # type: ignore[arg-type]


def test_the_documented_query_path_names_code_that_exists():
    """docs/architecture.md "Query path": every file it names exists, every hop it names is there."""
    import re
    from pathlib import Path

    from api.app import search_vector
    from indexer.build import payload_for
    from retrieval.batching import BatchingEncoder, BatchingIndex
    from retrieval.search import Searcher

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "architecture.md").read_text().split("## Query path", 1)[1].split("\n## ", 1)[0]
    files = set(re.findall(r"`((?:api|retrieval|indexer|eval|scripts)/[\w/]+\.py)`", doc))
    assert {"api/app.py", "retrieval/search.py", "retrieval/batching.py", "indexer/build.py"} <= files
    assert all((root / f).is_file() for f in files)
    for owner, name in ((Searcher, "by_vector"), (Searcher, "_run"), (BatchingIndex, "search"),
                        (BatchingEncoder, "encode_images"), (Service, "search_out")):
        assert f"{owner.__name__}.{name}" in doc and callable(getattr(owner, name))
    assert "search_vector" in doc and search_vector is not None and "payload_for" in doc and callable(payload_for)
