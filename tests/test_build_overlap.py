"""Build decode overlap (issue 14 item 5): images are decoded by a thread pool ahead of the encoder,
with the same points, order and skip messages as the serial decode."""

from __future__ import annotations

import threading
import time

import numpy as np
from PIL import Image

import indexer.build as build
from retrieval.records import Study


def _folder(tmp_path, n=12):
    studies = []
    for i in range(n):
        rel = f"img{i}.png"
        if i == 5:
            (tmp_path / rel).write_bytes(b"not a png")
        elif i != 7:
            Image.fromarray(np.full((16, 16), i * 10, np.uint8)).save(tmp_path / rel)
        studies.append(Study(study_id=f"s{i}", patient_id="p", images=[rel] if i != 9 else [],
                             report="r" if i in (3, 9) else None))
    return studies, tmp_path / "manifest.jsonl"


def _run(gen_fn, studies, manifest):
    skips: list[tuple[str, str]] = []
    batches = list(gen_fn(studies, manifest, 4, lambda s, m: skips.append((s.study_id, m))))
    return [[(s.study_id, rel, None if px is None else px.tobytes()) for s, rel, px, _ in b] for b in batches], skips


def test_parallel_decode_equals_the_serial_decode(tmp_path):
    studies, manifest = _folder(tmp_path)
    assert _run(build._batches, studies, manifest) == _run(build._batches_serial, studies, manifest)
    got, skips = _run(build._batches, studies, manifest)
    assert [sid for sid, _ in skips] == ["s5", "s5", "s7", "s7"]  # unreadable file, then "no readable image"
    assert [p[0] for b in got for p in b] == ["s0", "s1", "s2", "s3", "s4", "s6", "s8", "s9", "s10", "s11"]


def test_decoding_runs_ahead_on_other_threads_while_the_consumer_works(tmp_path, monkeypatch):
    studies, manifest = _folder(tmp_path)
    studies = [s for s in studies if s.study_id not in ("s5", "s7", "s9")]
    seen: list[tuple[str, float]] = []
    real = build.load_image

    def slow_load(path, name=None):
        time.sleep(0.05)
        seen.append((threading.current_thread().name, time.perf_counter()))
        return real(path, name=name)

    monkeypatch.setattr(build, "load_image", slow_load)
    t0 = time.perf_counter()
    for _ in build._batches(studies, manifest, 4, lambda s, m: None):
        time.sleep(0.1)  # the "encoder"
    wall = time.perf_counter() - t0
    assert all(name.startswith("medrag-decode") for name, _ in seen)
    # serial: 9 x 0.05 decode + 3 x 0.1 encode = 0.75 s; overlapped it is close to the larger part
    assert wall < 0.65, wall
