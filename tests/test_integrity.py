"""Index integrity: checksums, `medrag index verify`, quarantine and re-encoding of damaged
segments, collection of killed builds' staging folders, read-only embedded Qdrant.

Each test reproduces a defect first seen by attacking the store (issue 13): a flipped byte in a
segment stopped every later build with an unnamed ``BadZipFile``; flipped bytes in published
vectors went unnoticed; an embedded-Qdrant index with a segment file missing served "ok" with 0
studies; killed builds leaked ``.staging-*`` folders; the embedded engine wrote into a published
version when opening it (a read-only mount failed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.synthetic import generate
from indexer.build import BuildConfig, build_index, state_dir_for
from indexer.segments import SegmentStore
from indexer.verify import verify_index
from retrieval.index import IndexError_, SearchFilter, open_index
from retrieval.index.versions import CHECKSUMS, current_version, verify_version

CFG = BuildConfig(encoder="pixels", conditioning=("left lung",), text_encoder=None)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("integrity") / "synth", 24, seed=3, size=64)


def vectors_by_study(uri: str) -> dict[str, np.ndarray]:
    ix = open_index(uri)
    try:
        pts = ix.find(SearchFilter(), limit=10_000)
        return {p.payload.study_id: ix.vectors("image", [p.id])[0] for p in pts}
    finally:
        ix.close()


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def segments(uri: str) -> list[Path]:
    return sorted((state_dir_for(uri) / "segments").glob("*/seg-*.npz"))


def test_every_published_version_has_checksums_that_match(synth, tmp_path):
    for uri in (f"faiss:{tmp_path}/f", f"qdrant+local:{tmp_path}/q"):
        build_index(synth, uri, CFG, progress=False)
        root = Path(uri.split(":", 1)[1])
        version = current_version(root)
        assert (version / CHECKSUMS).is_file()
        for _ in range(2):  # opening must not change a byte (the embedded engine once did)
            open_index(uri).close()
        assert verify_version(version, mode="strict") == []


def test_flipped_byte_in_published_vectors_is_named_and_repaired(synth, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False, segment_size=8)
    before = vectors_by_study(uri)
    version = current_version(tmp_path / "ix")
    victim = next(version.glob("*.npy"))
    flip(victim)
    with pytest.raises(IndexError_, match=rf"{victim.name}: content differs from its checksum"):
        open_index(uri)

    rep = verify_index(uri)
    assert not rep.ok and any(victim.name in p for p in rep.version_problems)
    out = subprocess.run([sys.executable, "-m", "api.cli", "index", "verify", "--index", uri],
                         capture_output=True, text=True)
    assert out.returncode == 1 and victim.name in out.stdout and "DAMAGED" in out.stdout

    fixed = verify_index(uri, repair=True)
    assert fixed.repaired and fixed.new_version and fixed.new_version != rep.version
    assert verify_index(uri).ok
    after = vectors_by_study(uri)
    assert set(after) == set(before)
    assert all(np.allclose(after[s], before[s]) for s in before)


def test_truncated_faiss_file_is_an_index_error_not_a_crash(synth, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False)
    f = next(current_version(tmp_path / "ix").glob("*.faiss"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(IndexError_, match=r"\.faiss: \d+ bytes, expected \d+ \(truncated"):
        open_index(uri)


def test_embedded_qdrant_with_a_segment_file_missing_is_refused(synth, tmp_path):
    uri = f"qdrant+local:{tmp_path}/q"
    build_index(synth, uri, CFG, progress=False)
    seg_dir = next((current_version(tmp_path / "q") / "shard" / "segments").iterdir())
    shutil.rmtree(seg_dir)
    with pytest.raises(IndexError_, match="missing"):
        open_index(uri)


def test_damaged_segment_is_quarantined_and_reencoded_by_the_next_build(synth, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False, segment_size=8)
    reference = vectors_by_study(uri)
    segs = segments(uri)
    assert len(segs) == 3
    flip(segs[1], 0.6)  # in the vectors: the zip directory still reads, the checksum does not
    segs[2].write_bytes(segs[2].read_bytes()[:100])  # truncated: BadZipFile when reading its keys

    rep = verify_index(uri)
    assert sorted(d.split(":")[0] for d in rep.damaged_segments) == sorted([segs[1].name, segs[2].name])

    report = build_index(synth, uri, CFG, progress=False, segment_size=8)
    assert sorted(report.quarantined) == sorted([segs[1].name, segs[2].name])
    assert report.segments_written == 2  # the two damaged segments, encoded again
    quarantine = segs[0].parent / "quarantine"
    assert len(list(quarantine.glob("*.npz"))) == 2
    after = vectors_by_study(uri)
    assert set(after) == set(reference) and all(np.allclose(after[s], reference[s]) for s in reference)
    assert verify_index(uri).ok


def test_verify_repair_reencodes_only_the_damaged_segment(synth, tmp_path):
    uri = f"qdrant+local:{tmp_path}/q"
    build_index(synth, uri, CFG, progress=False, segment_size=8)
    reference = vectors_by_study(uri)
    victim = segments(uri)[0]
    flip(victim, 0.7)
    rep = verify_index(uri, repair=True)
    assert rep.repaired and rep.new_version
    assert [d.split(":")[0] for d in rep.damaged_segments] == [victim.name]
    published = json.loads((state_dir_for(uri) / "published.json").read_text())
    assert published["config"]["encoder"] == "pixels"
    after = vectors_by_study(uri)
    assert all(np.allclose(after[s], reference[s]) for s in reference)
    assert SegmentStore(victim.parent).check(victim) is None  # re-encoded under the same name
    assert verify_index(uri).ok


def test_staging_folders_of_killed_builds_are_collected(synth, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited: its pid is not alive
    leftover = tmp_path / "ix" / f".staging-{pid}-abcd"
    (leftover / "x").mkdir(parents=True)
    live = tmp_path / "ix" / f".staging-{os.getppid()}-live"  # a live writer's (our parent): kept
    live.mkdir()
    rep = verify_index(uri)
    assert rep.staging_leftovers == [leftover.name] and not rep.ok
    build_index(synth, uri, CFG, progress=False)
    assert not leftover.exists() and live.exists()


def test_read_only_embedded_qdrant_version_is_searched_from_a_private_copy(synth, tmp_path, monkeypatch):
    uri = f"qdrant+local:{tmp_path}/q"
    build_index(synth, uri, CFG, progress=False)
    expected = vectors_by_study(uri)
    real_access = os.access

    def read_only(path, mode, *a, **kw):  # what a read-only mount answers for the version folder
        if mode & os.W_OK and str(tmp_path / "q") in str(path):
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", read_only)
    ix = open_index(uri)
    try:
        private = ix._private
        assert private is not None and private.exists()
        assert len(ix) == len(expected)
    finally:
        ix.close()
    assert not private.exists()


@pytest.mark.integration
def test_read_only_bind_mount(synth, tmp_path):
    """The real thing where the test may mount (root in a container): a read-only bind mount."""
    uri = f"qdrant+local:{tmp_path}/q"
    build_index(synth, uri, CFG, progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "q"), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        ix = open_index(f"qdrant+local:{ro}")
        try:
            assert len(ix) == 24
            hits = ix.search("image", np.ones((1, ix.meta.spaces["image"]), np.float32), 3)
            assert len(hits[0]) == 3
        finally:
            ix.close()
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.integration
def test_full_disk_is_an_index_error_and_leaves_the_version_intact(synth, tmp_path):
    """Issue 13 saw SIGBUS on a full tmpfs: the embedded engine wrote into the published version
    as it opened it. Now the build settles those writes before checksumming, and a full disk is
    a clear :class:`IndexError_` (the API's 503), after which the version is still intact."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        uris = {b: f"{b}:{mnt}/{b.split('+')[0]}" for b in ("faiss", "qdrant+local")}
        for uri in uris.values():
            build_index(synth, uri, CFG, progress=False)
        with open(mnt / "filler", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
        open_index(uris["faiss"]).close()  # a reader that only reads is unaffected
        with pytest.raises(IndexError_, match="No space left on device"):
            open_index(uris["qdrant+local"])
        (mnt / "filler").unlink()
        assert verify_version(current_version(mnt / "qdrant"), mode="strict") == []
        ix = open_index(uris["qdrant+local"])
        assert len(ix) == 24
        ix.close()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
