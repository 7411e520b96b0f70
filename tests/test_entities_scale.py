"""Entity extraction is linear in the report's length (issue 13) and capped.

No timed assertions: the work per mention is measured by how many characters the cue checks see
(it must not grow with the clause), and a 72 KB report without sentence breaks must still give
correct entities at its far end.
"""

from __future__ import annotations

import logging

import pytest

import retrieval.entities as ents
from retrieval.entities import CONTEXT_CHARS, MAX_REPORT_CHARS, EntityExtractor, ReportTooLong

UNIT = "small left pleural effusion with mild cardiomegaly and right basilar atelectasis "


def _no_breaks(n: int) -> str:
    return (UNIT * (n // len(UNIT) + 1))[:n]


@pytest.fixture(scope="module")
def ex() -> EntityExtractor:
    return EntityExtractor()


def _scanned(monkeypatch, ex: EntityExtractor, text: str) -> tuple[int, int]:
    """(mentions, characters the clause-level cue checks looked at) for one extraction."""
    seen = {"calls": 0, "chars": 0}
    orig = ents._uncertain

    def counting(before: str, after: str, clause: str, first: bool) -> bool:
        seen["calls"] += 1
        seen["chars"] += len(clause)
        return orig(before, after, clause, first)

    monkeypatch.setattr(ents, "_uncertain", counting)
    ex.extract(text)
    return seen["calls"], seen["chars"]


def test_work_per_mention_does_not_grow_with_the_clause(monkeypatch, ex):
    m10, c10 = _scanned(monkeypatch, ex, _no_breaks(10_000))
    m80, c80 = _scanned(monkeypatch, ex, _no_breaks(80_000))
    assert m80 > 7 * m10  # eight times the text, about eight times the mentions
    # before the fix each mention saw its whole clause: chars/mention grew 8x with the text
    assert c10 / m10 <= 2 * CONTEXT_CHARS + 40
    assert c80 / m80 <= 2 * CONTEXT_CHARS + 40
    assert c80 < 9 * c10


def test_72kb_report_without_breaks_is_mined_to_its_end(ex):
    text = _no_breaks(72_000) + " no pneumothorax"
    found = ex.extract(text)
    last = [e for e in found if e.finding == "pneumothorax"]
    assert len(last) == 1 and last[0].negated
    assert last[0].span[0] > 72_000
    assert {("effusion", "left pleura")} <= {(e.finding, e.anatomy) for e in found}


def test_report_over_the_cap_is_truncated_with_a_warning(ex, caplog):
    text = "x " * (MAX_REPORT_CHARS // 2) + "large right pleural effusion"
    with caplog.at_level(logging.WARNING, logger="retrieval.entities"):
        found = ex.extract(text)
    assert found == []  # the finding lies past the cap
    assert f"report of {len(text)} characters: entities mined from the first {MAX_REPORT_CHARS} only" in caplog.text
    with pytest.raises(ReportTooLong, match=f"report of {len(text)} characters exceeds the {MAX_REPORT_CHARS}"):
        ex.extract(text, strict=True)


def test_short_report_unchanged(ex):
    found = {(e.anatomy, e.finding, e.status) for e in ex.extract(
        "No pleural effusion, but there is left lower lobe atelectasis. Heart size is normal.")}
    assert ("left lower lobe", "atelectasis", "present") in found
    assert ("pleura", "effusion", "absent") in found
