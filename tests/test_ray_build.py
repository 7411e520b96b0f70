"""Ray builds (issue 14 item 2): segments encoded as Ray tasks on a local cluster (2 worker CPUs)
give the same index as the single-process build, also when a worker is killed mid-build."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

from indexer.build import BuildConfig, build_index
from indexer.manifest import write_manifest
from retrieval.index import open_index
from retrieval.records import Study

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.slow]
CFG = BuildConfig(encoder="pixels", text_encoder=None, conditioning=("lung",), batch_size=4)


def _manifest(tmp_path, n=40):
    rng = np.random.default_rng(0)
    studies = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        studies.append(Study(study_id=f"s{i}", patient_id=f"p{i % 5}", images=[f"{i}.png"], report=f"report {i}"))
    write_manifest(tmp_path / "m.jsonl", studies)
    return tmp_path / "m.jsonl"


def _ray_workers() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            # a worker running our task retitles itself; the raylet's own command line names
            # default_worker.py too, so that is no test (killing the raylet ends the cluster)
            if cmd.startswith(b"ray::_encode_in_worker"):
                pids.append(int(d))
    return pids


def test_a_ray_build_with_a_killed_worker_equals_the_local_build(tmp_path, monkeypatch):
    m = _manifest(tmp_path)
    local = build_index(m, f"faiss:{tmp_path}/local", CFG, progress=False, segment_size=2)
    killed: list[int] = []

    def killer() -> None:  # SIGKILL one busy Ray worker once the first segments are written
        seg_root = tmp_path / "ray" / ".build" / "segments"
        t0 = time.time()
        while time.time() - t0 < 120 and not killed:
            if seg_root.exists() and any(seg_root.rglob("*.npz")):
                pids = _ray_workers()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.01)

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    t = threading.Thread(target=killer)
    t.start()
    rep = build_index(m, f"faiss:{tmp_path}/ray", CFG, progress=False, segment_size=2, engine="ray", workers=2)
    t.join()
    assert killed, "no Ray worker was seen to kill"
    assert rep.studies == local.studies == 40 and rep.segments_written == 20
    a, b = open_index(f"faiss:{tmp_path}/local"), open_index(f"faiss:{tmp_path}/ray")
    ids = list(range(len(a)))
    assert len(a) == len(b) == 40
    assert [p.study_id for p in a.payloads(ids)] == [p.study_id for p in b.payloads(ids)]
    for space in a.meta.spaces:
        np.testing.assert_array_equal(a.vectors(space, ids), b.vectors(space, ids))
    # resume: a rerun with the Ray engine finds every segment and encodes nothing
    again = build_index(m, f"faiss:{tmp_path}/ray", CFG, progress=False, segment_size=2, engine="ray", workers=2)
    assert again.reused == 40 and again.segments_written == 0


def test_an_unknown_engine_is_named(tmp_path):
    from indexer.manifest import ManifestError

    with pytest.raises(ManifestError, match="unknown build engine 'spark'"):
        build_index(_manifest(tmp_path, 2), f"faiss:{tmp_path}/x", CFG, progress=False, engine="spark")
