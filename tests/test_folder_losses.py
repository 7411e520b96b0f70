"""Nothing silently dropped (issue 23): every image of a folder is a study, a CSV row without an
image and an image without a row are named, and a rebuild that would lose served studies says
which and publishes nothing unless ``--allow-removals``."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from api.cli import main
from indexer.build import BuildConfig, RemovalRefused, build_index, delete_studies
from indexer.manifest import read_manifest, write_manifest
from indexer.sources import source
from retrieval.index import open_index

from .conftest import save_png, synthetic_cxr

CFG = BuildConfig(encoder="pixels", text_encoder=None, index_kind="flat")


def _folder(root: Path, n: int = 9, rows: int = 3) -> tuple[Path, Path]:
    """``n`` images img00..; a CSV of ``rows`` rows naming the first ones, plus one row naming no image."""
    for i in range(n):
        save_png(root / "images" / f"img{i:02d}.png", synthetic_cxr(i, left_blob=i % 2 == 0, size=48))
    with open(root / "reports.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["study_id", "report"])
        w.writeheader()
        w.writerows([{"study_id": f"img{i:02d}", "report": "Small left pleural effusion."} for i in range(rows)])
        w.writerow({"study_id": "gone07", "report": "Heart size is normal."})
    return root / "images", root / "reports.csv"


def test_every_image_is_a_study_and_every_loss_is_named(tmp_path, capsys):
    images, reports = _folder(tmp_path)
    res = source("folder")(images, reports, tmp_path / "m.jsonl")
    assert sorted(s.study_id for s in res.studies) == [f"img{i:02d}" for i in range(9)]
    with_report = {s.study_id for s in res.studies if s.report}
    assert with_report == {"img00", "img01", "img02"}
    assert res.skipped == [f"study gone07 ({reports}:5): no image of it in {images}"]
    assert sorted(w.split(":")[0] for w in res.warnings) == [f"img{i:02d}.png" for i in range(3, 9)]
    assert all("no row in reports.csv" in w for w in res.warnings)

    out = tmp_path / "cli.jsonl"
    assert main(["index", "manifest", "folder", str(images), "--reports", str(reports), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote 9 studies to {out}: 9 images, 3 with a report, 1 skipped (listed below); warnings 6"
    assert any("gone07" in line and line.startswith("  skipped:") for line in printed)
    for i in range(3, 9):  # each image without a row, by name
        assert any(line.startswith(f"  warning: img{i:02d}.png: no row") for line in printed), i
    assert len(list(read_manifest(out))) == 9


def test_an_image_with_a_row_and_a_subfolder_study_are_not_duplicated(tmp_path):
    images, reports = _folder(tmp_path, n=2, rows=2)
    save_png(images / "s9" / "a.png", synthetic_cxr(20, size=48))  # <study_id>/ folder with no row
    save_png(images / "img00_lateral.png", synthetic_cxr(21, size=48))  # <study_id>_*: claimed by img00
    res = source("folder")(images, reports, tmp_path / "m.jsonl")
    by_id = {s.study_id: s for s in res.studies}
    assert set(by_id) == {"img00", "img01", "s9/a"}
    assert len(by_id["img00"].images) == 2 and by_id["s9/a"].report is None


@pytest.fixture
def built(tmp_path):
    images, reports = _folder(tmp_path, n=6, rows=2)
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, source("folder")(images, reports, manifest).studies)
    uri = f"faiss:{tmp_path}/index"
    rep = build_index(manifest, uri, CFG, progress=False)
    assert rep.studies == 6 and rep.removed == []
    return tmp_path, images, reports, manifest, uri


def _served(uri: str) -> set[str]:
    ix = open_index(uri)
    try:
        return {p.study_id for p in ix.payloads(range(len(ix)))}
    finally:
        ix.close()


def test_rebuild_after_an_image_disappeared_names_it_and_publishes_nothing(built, capsys):
    root, images, reports, manifest, uri = built
    (images / "img04.png").unlink()
    # the folder manifest written again: img04 is no longer a study of it
    assert main(["index", "manifest", "folder", str(images), "--reports", str(reports), "-o", str(manifest)]) == 0
    capsys.readouterr()
    argv = ["index", "build", str(manifest), "--index", uri, "--encoder", "pixels", "--text-encoder", "none",
            "--kind", "flat", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would remove 1 studies" in err[0] and "(img04)" in err[0], err
    assert "nothing was published" in err[0] and "--allow-removals" in err[0]
    assert _served(uri) == {f"img{i:02d}" for i in range(6)}  # the served version is untouched

    assert main([*argv, "--allow-removals"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 studies the previous version served: img04" in out
    assert _served(uri) == {f"img{i:02d}" for i in range(6)} - {"img04"}


def test_unreadable_image_in_an_unchanged_manifest_is_a_removal_too(built):
    _, images, _, manifest, uri = built
    (images / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # a study with a report
    (images / "img05.png").unlink()
    with pytest.raises(RemovalRefused) as exc:
        build_index(manifest, uri, CFG, progress=False)
    assert exc.value.removed == ["img01", "img05"]
    assert len(_served(uri)) == 6
    rep = build_index(manifest, uri, CFG, progress=False, allow_removals=True)
    assert rep.removed == ["img01", "img05"] and rep.studies == 4
    # the next build compares with what is served now: nothing more to remove
    assert build_index(manifest, uri, CFG, progress=False).removed == []


def test_delete_removes_what_it_was_asked_to_and_nothing_else(built):
    _, images, _, _, uri = built
    rep = delete_studies(uri, ["img03"])
    assert rep.removed == ["img03"] and _served(uri) == {f"img{i:02d}" for i in range(6)} - {"img03"}
