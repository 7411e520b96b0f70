"""Builds that survive: SIGKILL at random points, resume, incremental add/delete, one writer at a time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eval.synthetic import generate
from indexer.build import BuildConfig, add_studies, build_index, delete_studies, state_dir_for
from indexer.manifest import read_manifest, write_manifest
from indexer.segments import BuildLockedError, SegmentStore, build_lock
from retrieval.index import IndexError_, SearchFilter, open_index

CFG = BuildConfig(encoder="medrag-native", allow_random_init=True, conditioning=("left lung",), text_encoder=None)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("kill") / "synth", 160, seed=5, size=96)


def snapshot(uri: str) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """study id -> (payload, vectors per space) of the published version."""
    ix = open_index(uri)
    try:
        pts = ix.find(SearchFilter(), limit=100_000)
        out = {}
        for p in pts:
            vecs = {sp: ix.vectors(sp, [p.id])[0] for sp in sorted(ix.meta.spaces)}
            out[p.payload.study_id] = (p.payload, vecs)
        return out
    finally:
        ix.close()


def mismatches(a: dict, b: dict) -> int:
    bad = len(set(a) ^ set(b))
    for sid in set(a) & set(b):
        pa, va = a[sid]
        pb, vb = b[sid]
        if pa != pb or any(not np.allclose(va[s], vb[s], atol=1e-5) for s in va):
            bad += 1
    return bad


def _count(uri: str) -> int:
    return len(list((state_dir_for(uri) / "segments").glob("*/seg-*.npz")))


def _cmd(manifest, uri, *extra):
    return [sys.executable, "-m", "api.cli", "index", "build", str(manifest), "--index", uri, "--encoder",
            "medrag-native", "--random-init", "--conditioning", "left lung", "--text-encoder", "none",
            "--no-progress", "--segment-size", "8", "--batch-size", "8", *extra]


@pytest.mark.integration  # SIGKILLs real build processes
@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_converges(synth, tmp_path):
    ref_uri = f"faiss:{tmp_path}/ref"
    build_index(synth, ref_uri, CFG, progress=False, segment_size=8)
    reference = snapshot(ref_uri)
    assert len(reference) == 160

    uri = f"qdrant+local:{tmp_path}/killed"
    t0 = time.perf_counter()
    subprocess.run(_cmd(synth, f"faiss:{tmp_path}/timing"), check=True, capture_output=True)
    full = time.perf_counter() - t0  # one uninterrupted run, process start included

    rng = np.random.default_rng(0)
    store_dir = None
    kills = survived_segments = 0
    finished = False
    trail = []
    for attempt in range(12):  # bounded
        proc = subprocess.Popen(_cmd(synth, uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.3:  # anywhere: start-up, encoding, assembly or publish
            time.sleep(float(rng.uniform(0.0, 1.0)) * full)
        else:  # mid-encoding: after this run has written a new segment, plus a random delay
            deadline = time.perf_counter() + 2 * full
            while proc.poll() is None and time.perf_counter() < deadline and _count(uri) <= survived_segments:
                time.sleep(0.02)
            time.sleep(float(rng.uniform(0.0, 0.3)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        rc = proc.wait()
        state = state_dir_for(uri)
        segs = sorted((state / "segments").glob("*/seg-*.npz")) if (state / "segments").exists() else []
        # no finished segment is ever lost, and every one on disk is complete and readable
        assert len(segs) >= survived_segments, f"attempt {attempt}: segments went from {survived_segments} to {len(segs)}"
        for f in segs:
            SegmentStore.read(f)
        survived_segments = len(segs)
        trail.append((rc, len(segs)))
        store_dir = segs[0].parent if segs else store_dir
        # a reader sees either no index or a complete one, never a torn one
        try:
            ix = open_index(uri)
        except IndexError_:
            assert rc != 0
        else:
            assert len(ix) == 160
            ix.close()
            if rc == 0:
                finished = True
                break
    if not finished:
        build_index(synth, uri, CFG, progress=False, segment_size=8)
    result = snapshot(uri)
    assert mismatches(reference, result) == 0
    figures = {"kills": kills, "runs (exit code, segments on disk after)": trail, "segments_total": survived_segments,
               "mismatches": 0,
               "leftover_tmp": len(list(store_dir.glob("*.tmp*"))) if store_dir else 0}
    (tmp_path / "kill_figures.json").write_text(json.dumps(figures))
    print("kill test:", figures)
    assert kills >= 1


@pytest.mark.slow
def test_rerun_reuses_segments_and_incremental_add_delete(synth, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    studies = list(read_manifest(synth))
    first = synth.parent / "first.jsonl"
    write_manifest(first, studies[:100])
    rep = build_index(first, uri, CFG, progress=False, segment_size=16)
    assert rep.studies == 100 and rep.reused == 0 and rep.segments_written == 7
    again = build_index(first, uri, CFG, progress=False, segment_size=16)
    assert again.reused == 100 and again.segments_written == 0 and again.version != rep.version

    extra = synth.parent / "extra.jsonl"
    write_manifest(extra, studies[100:120])
    added = add_studies(extra, uri, progress=False)
    assert added.studies == 120 and added.reused == 100 and added.segments_written == 1
    snap = snapshot(uri)
    assert set(snap) == {s.study_id for s in studies[:120]}
    deleted = delete_studies(uri, [studies[0].study_id, studies[110].study_id])
    assert deleted.studies == 118 and deleted.segments_written == 0
    after = snapshot(uri)
    assert studies[0].study_id not in after and studies[110].study_id not in after
    assert mismatches({k: v for k, v in snap.items() if k in after}, after) == 0
    # thumbnails still resolve: payload image paths point at the same files
    ix = open_index(uri)
    p = ix.find(SearchFilter(study_ids=[studies[105].study_id]))[0].payload
    from indexer.phi import stored_image_path

    assert stored_image_path(str(p.image), uri, ix.meta.image_root).is_file()
    ix.close()
    with pytest.raises(ValueError, match="not in the index: nope"):
        delete_studies(uri, ["nope"])


def test_one_writer_at_a_time(synth, tmp_path):
    uri = f"faiss:{tmp_path}/locked"
    with build_lock(state_dir_for(uri)):
        with pytest.raises(BuildLockedError, match="another build"):
            build_index(synth, uri, CFG, progress=False)
    from api.cli import main

    with build_lock(state_dir_for(uri)):
        assert main(["index", "build", str(synth), "--index", uri, "--text-encoder", "none", "--no-progress"]) == 2


def test_a_work_dir_does_not_move_the_publish_lock(tmp_path):
    """Two writers with different --work-dir once both published the same index: the lock that
    decides who publishes lives with the index itself."""
    from indexer.build import writer_state
    from indexer.segments import BuildLockedError

    uri = f"faiss:{tmp_path}/ix"
    with writer_state(uri, tmp_path / "work-a") as state:
        assert state == tmp_path / "work-a"
        with pytest.raises(BuildLockedError, match="another build"):
            with writer_state(uri, tmp_path / "work-b"):
                pass
        with pytest.raises(BuildLockedError):
            with writer_state(uri):
                pass
    with writer_state(uri, tmp_path / "work-b") as state:  # released: the next writer proceeds
        assert state == tmp_path / "work-b"
