#!/usr/bin/env python3
"""Issue 13's attack table, rerun: store corruption, killed builds, a server on damaged states,
hot reload of deletions. Prints ``attack | tries | failures | what was measured``.

Usage: ``.venv/bin/python scripts/attack_table.py [--kills 30] [--out runs/attack]``

A failure is what the issue filed as a defect: a build that stops (or publishes different
vectors) after a segment is damaged; a damaged published version that opens without an error; a
staging folder left after the next build; a server process that exits, says "ok" on a damaged
index, or shows an absolute path on ``/health``; a deleted study still served after 10 s.
The upload bombs, slow clients, entity-extraction time, PHI and the API contract have their own
runs (README, "Hardening"): ``pytest -s tests/test_decode_budget.py``, ``scripts/slowloris.py``,
``medrag eval deid``, ``tests/test_schema_contract.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from eval.load import create_key, start_server, stop_server  # noqa: E402
from eval.synthetic import generate  # noqa: E402
from indexer.build import BuildConfig, build_index, delete_studies, state_dir_for  # noqa: E402
from indexer.verify import verify_index  # noqa: E402
from retrieval.index import IndexError_, SearchFilter, open_index  # noqa: E402
from retrieval.index.versions import current_version  # noqa: E402

CFG = BuildConfig(encoder="pixels", conditioning=("left lung",), text_encoder=None)
ROWS: list[tuple[str, int, int, str]] = []


def row(attack: str, tries: int, failures: int, note: str = "") -> None:
    ROWS.append((attack, tries, failures, note))
    print(f"{attack:<58} {tries:>6} {failures:>9}  {note}", flush=True)


def vectors(uri: str) -> dict[str, np.ndarray]:
    ix = open_index(uri)
    try:
        return {str(p.payload.study_id): ix.vectors("image", [p.id])[0]
                for p in ix.find(SearchFilter(), limit=100_000)}
    finally:
        ix.close()


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.allclose(a[k], b[k]) for k in a)


# ---- damage --------------------------------------------------------------------------------------
def _flip(p: Path, at: float) -> None:
    d = bytearray(p.read_bytes())
    if d:
        d[min(len(d) - 1, int(len(d) * at))] ^= 0xFF
        p.write_bytes(bytes(d))


def _truncate(p: Path, frac: float) -> None:
    p.write_bytes(p.read_bytes()[: int(p.stat().st_size * frac)])


def _zero_block(p: Path) -> None:
    d = bytearray(p.read_bytes())
    mid = len(d) // 2
    d[mid:mid + 4096] = bytes(len(d[mid:mid + 4096]))
    p.write_bytes(bytes(d))


SEGMENT_MODES = {
    **{f"flip byte at {int(a * 100)}%": (lambda p, a=a: _flip(p, a)) for a in (0.0, 0.01, 0.25, 0.5, 0.75, 0.999)},
    **{f"truncate to {int(f * 100)}%": (lambda p, f=f: _truncate(p, f)) for f in (0.0, 0.1, 0.5, 0.9, 0.999)},
    "zero a 4 KB block": _zero_block,
    "append garbage": lambda p: p.write_bytes(p.read_bytes() + os.urandom(512)),
    "random bytes, same size": lambda p: p.write_bytes(os.urandom(p.stat().st_size)),
    "flip + sidecar removed": lambda p: (_flip(p, 0.5), p.with_suffix(".sha256").unlink()),
    "sidecar corrupted": lambda p: p.with_suffix(".sha256").write_text("0" * 64),
}


def segments_attack(work: Path, manifest: Path) -> None:
    """Every mode on one segment, each a fresh copy of the same store; the next build must
    quarantine it, re-encode and publish vectors identical to the reference."""
    ref_uri = f"faiss:{work}/seg-ref"
    build_index(manifest, ref_uri, CFG, progress=False, segment_size=8)
    reference = vectors(ref_uri)
    fails, notes = 0, []
    for i, (name, damage) in enumerate(SEGMENT_MODES.items()):
        for backend in ("faiss", "qdrant+local"):
            uri = f"{backend}:{work}/seg-{i}-{backend.split('+')[0]}"
            build_index(manifest, uri, CFG, progress=False, segment_size=8)
            segs = sorted((state_dir_for(uri) / "segments").glob("*/seg-*.npz"))
            victim = segs[i % len(segs)]
            damage(victim)
            try:
                rep = build_index(manifest, uri, CFG, progress=False, segment_size=8)
                ok = same(vectors(uri), reference) and (victim.name in rep.quarantined or name == "sidecar corrupted"
                                                         or verify_index(uri).ok)
            except Exception as exc:  # noqa: BLE001 - the defect being counted
                ok = False
                notes.append(f"{name}: {type(exc).__name__}")
            fails += not ok
            if not ok and not notes:
                notes.append(name)
    row("damaged segment, next build (modes x 2 backends)", 2 * len(SEGMENT_MODES), fails,
        "; ".join(notes) or "named, quarantined, re-encoded; vectors identical")


def version_attack(work: Path, manifest: Path) -> None:
    """Each file of a published version flipped, truncated or deleted: opening must raise
    IndexError_ naming the damage (never open silently, never another exception)."""
    tries = fails = 0
    notes: list[str] = []
    rng = random.Random(0)
    for backend in ("faiss", "qdrant+local"):
        base = work / f"ver-{backend.split('+')[0]}"
        build_index(manifest, f"{backend}:{base}", CFG, progress=False)
        files = sorted(p.relative_to(current_version(base)) for p in current_version(base).rglob("*")
                       if p.is_file() and p.name != "checksums.json")
        if len(files) > 12:  # the embedded engine's many small files: a sample plus the large ones
            big = sorted(files, key=lambda f: -(current_version(base) / f).stat().st_size)[:6]
            files = sorted(set(big) | set(rng.sample(files, 6)))
        for rel in files:
            for how in ("flip", "truncate", "delete"):
                copy = work / f"ver-copy-{tries}"
                shutil.copytree(base, copy, symlinks=True)
                target = current_version(copy) / rel
                if target.stat().st_size == 0 and how != "delete":
                    shutil.rmtree(copy)
                    continue
                {"flip": lambda p: _flip(p, 0.5), "truncate": lambda p: _truncate(p, 0.5),
                 "delete": lambda p: p.unlink()}[how](target)
                tries += 1
                try:
                    open_index(f"{backend}:{copy}").close()
                    fails += 1
                    notes.append(f"{backend} {rel} {how}: opened")
                except IndexError_ as exc:
                    if str(rel).split("/")[-1] not in str(exc) and "missing" not in str(exc):
                        notes.append(f"{rel} {how}: not named")
                except Exception as exc:  # noqa: BLE001
                    fails += 1
                    notes.append(f"{backend} {rel} {how}: {type(exc).__name__}")
                shutil.rmtree(copy, ignore_errors=True)
    row("damaged published version, open (file x flip/truncate/delete)", tries, fails,
        "; ".join(notes[:4]) or "every one refused with IndexError_ naming the file")


def kill_attack(work: Path, manifest: Path, kills: int) -> None:
    """SIGKILL builds at random moments; then one build must leave no staging folder and equal a
    clean build."""
    ref = vectors(f"faiss:{work}/seg-ref")
    rng = random.Random(1)
    leaked_before = 0
    for backend in ("faiss", "qdrant+local"):
        idx = work / f"kill-{backend.split('+')[0]}"
        uri = f"{backend}:{idx}"
        for k in range(kills):
            if k % 4 == 0:  # a fresh encoder state now and then, so kills land in encoding too
                shutil.rmtree(state_dir_for(uri) / "segments", ignore_errors=True)
            proc = subprocess.Popen([sys.executable, "-m", "api.cli", "index", "build", str(manifest), "--index", uri,
                                     "--encoder", "pixels", "--conditioning", "left lung", "--text-encoder", "none",
                                     "--no-progress", "--segment-size", "8"], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, 4.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            leaked_before = max(leaked_before, len(list(idx.glob(".staging-*"))))
    fails = left = 0
    for backend in ("faiss", "qdrant+local"):
        idx = work / f"kill-{backend.split('+')[0]}"
        build_index(manifest, f"{backend}:{idx}", CFG, progress=False, segment_size=8)
        left += len(list(idx.glob(".staging-*")))
        fails += bool(left) or not same(vectors(f"{backend}:{idx}"), ref) or not verify_index(f"{backend}:{idx}").ok
    row("SIGKILL of builds, then one build (x 2 backends)", 2 * kills, fails,
        f"staging folders left by a kill: up to {leaked_before} at once; after the next build: {left}; "
        "final index equal to a clean build and verified")


# ---- the server -------------------------------------------------------------------------------------
def _get(url: str, key: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    """``medrag serve`` on a free port (eval.load's helpers), polling for new versions every 1 s;
    up as soon as it answers /health/live, since a damaged index never becomes ready."""

    def __init__(self, uri: str, work: Path) -> None:
        keys = Path(tempfile.mkdtemp(dir=work)) / "keys.json"
        self.key = create_key(keys, "attack")
        self.proc, self.base = start_server(uri, keys, timeout=60, extra=("--reload-interval", "1"),
                                            wait_ready=False)

    def health(self) -> dict:
        return json.loads(_get(self.base + "/health")[1])

    def stop(self) -> None:
        stop_server(self.proc)


def server_states_attack(work: Path, manifest: Path) -> None:
    """A server started on each damaged state must stay up, answer 503 / an error health with a
    path-free reason, and become ready after the admin repairs the index."""
    def truncated(base: Path) -> str:
        build_index(manifest, f"faiss:{base}", CFG, progress=False)
        f = next(current_version(base).glob("*.faiss"))
        _truncate(f, 0.5)
        return f"faiss:{base}"

    def missing_segment(base: Path) -> str:
        build_index(manifest, f"qdrant+local:{base}", CFG, progress=False)
        shutil.rmtree(next((current_version(base) / "shard" / "segments").iterdir()))
        return f"qdrant+local:{base}"

    def flipped(base: Path) -> str:
        build_index(manifest, f"faiss:{base}", CFG, progress=False)
        _flip(next(current_version(base).glob("*.npy")), 0.6)
        return f"faiss:{base}"

    def nothing(base: Path) -> str:
        return f"faiss:{base}"

    tries = fails = 0
    notes = []
    for name, make in (("truncated .faiss", truncated), ("missing Qdrant segment", missing_segment),
                       ("flipped vector byte", flipped), ("nothing published", nothing)):
        base = work / f"srv-{name.replace(' ', '-').replace('.', '')}"
        uri = make(base)
        srv = Server(uri, work)
        tries += 1
        try:
            h = srv.health()
            status, body = _get(srv.base + "/api/taxonomy", srv.key)
            bad = h["ready"] or h["status"] != "error" or str(work) in json.dumps(h) or status != 503 \
                or str(work) in body or srv.proc.poll() is not None
            if name == "nothing published":
                build_index(manifest, uri, CFG, progress=False)
            else:
                verify_index(uri, repair=True)
            t0 = time.time()
            while not srv.health()["ready"] and time.time() - t0 < 20:
                time.sleep(0.2)
            healed = srv.health()["ready"]
            fails += bad or not healed
            notes.append(f"{name}: '{h['detail'][:70]}'; ready {time.time() - t0:.1f} s after repair")
        finally:
            srv.stop()
    row("server started on a damaged index (4 states)", tries, fails, " | ".join(notes))


def reload_attack(work: Path, manifest: Path, n: int = 5) -> None:
    uri = f"faiss:{work}/reload"
    build_index(manifest, uri, CFG, progress=False)
    srv = Server(uri, work)
    fails, waits = 0, []
    try:
        for i in range(n):
            sid = f"syn{i:05d}"
            assert _get(f"{srv.base}/api/cases/{sid}", srv.key)[0] == 200
            t0 = time.time()
            delete_studies(uri, [sid])
            while _get(f"{srv.base}/api/cases/{sid}", srv.key)[0] != 404 and time.time() - t0 < 10:
                time.sleep(0.05)
            waited = time.time() - t0
            waits.append(waited)
            fails += waited >= 10 or srv.proc.poll() is not None
    finally:
        srv.stop()
    row("deleted study, running server (--reload-interval 1)", n, fails,
        f"gone after {min(waits):.2f}-{max(waits):.2f} s (delete + publish + reload)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="SIGKILLs per backend")
    ap.add_argument("--out", help="folder for attack_table.json")
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)  # quarantine warnings are expected here by the hundred
    os.environ.setdefault("MEDRAG_STATE", tempfile.mkdtemp(prefix="medrag-attack-state-"))
    with tempfile.TemporaryDirectory(prefix="medrag-attack-") as tmp:
        work = Path(tmp)
        manifest = generate(work / "synth", 32, seed=7, size=64)
        print(f"{'attack':<58} {'tries':>6} {'failures':>9}  measured")
        t0 = time.time()
        segments_attack(work, manifest)
        version_attack(work, manifest)
        kill_attack(work, manifest, a.kills)
        server_states_attack(work, manifest)
        reload_attack(work, manifest)
        print(f"({time.time() - t0:.0f} s)")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "attack_table.json").write_text(json.dumps(
            [{"attack": r[0], "tries": r[1], "failures": r[2], "measured": r[3]} for r in ROWS], indent=1))
    return 1 if any(r[2] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
