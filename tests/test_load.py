"""``medrag eval load`` end to end on the shared small index: a real ``medrag serve`` process.

The harness is what the issue-14 tables come from, so it is run here on a tiny index: every
scenario answers, the mixed one really uploads while searching, and the thread budgets reach
the server. Figures are never asserted (timing belongs to benchmarks, not tests).
"""

from __future__ import annotations

import json

import pytest

from eval.load import format_table, run

pytestmark = pytest.mark.integration  # a real server process


def test_the_three_scenarios_run_and_the_budgets_reach_the_server(small_index, tmp_path, monkeypatch):
    import eval.load as load

    started: list[tuple[str, ...]] = []
    orig = load.start_server

    def spy(uri, keys, *a, extra=(), **kw):
        started.append(tuple(extra))
        return orig(uri, keys, *a, extra=extra, **kw)

    monkeypatch.setattr(load, "start_server", spy)
    _, uri = small_index
    r = run(uri, tmp_path / "out", requests=24, concurrency=2, max_seconds=10, warmup=4,
            serve_args=("--torch-threads=1",))
    assert started == [("--torch-threads=1",)]
    sc = r["scenarios"]
    assert set(sc) == {"search-by-vector", "search-by-upload", "vector-beside-upload"}
    for name, s in sc.items():
        assert s["errors"] == 0 and s["requests"] > 0, (name, s)
    assert sc["vector-beside-upload"]["uploads_beside"] >= 1  # the encoder did run beside the searches
    assert json.loads((tmp_path / "out" / "load.json").read_text())["serve_args"] == ["--torch-threads=1"]
    assert "uploads/s" in format_table(r)
