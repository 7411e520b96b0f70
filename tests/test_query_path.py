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
