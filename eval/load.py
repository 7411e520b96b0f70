"""``medrag eval load``: API throughput and latency, measured from a second process on loopback.

Starts ``medrag serve`` on a free loopback port (its own process, a throwaway API key), then
drives it with an async client at a fixed concurrency, bounded by a request count and a time
limit per scenario:

* ``search-by-vector``: ``POST /api/search/vector`` with stored vectors of the index (the
  engine + API overhead, no encoder);
* ``search-by-upload``: ``POST /api/search/image`` with PNG uploads of the index's own images
  (decode + encode + search);
* ``vector-beside-upload``: by vector again, while one client uploads back to back (does search
  latency hold while the encoder runs beside it?).

Reports requests/s and p50/p90/p99 latency per scenario, after ``warmup`` uncounted requests
at the same concurrency (by upload: at most two per connection; its forwards are slow). Client and server share the machine's
cores, so figures are a floor for a dedicated server.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _payloads(uri: str, n: int, seed: int) -> tuple[list[list[float]], list[bytes]]:
    """Query vectors and PNG uploads taken from the index itself."""
    from PIL import Image

    from indexer.phi import stored_image_path
    from retrieval.imaging.images import ImageLoadError, load_image
    from retrieval.index import SearchFilter, open_index

    index = open_index(uri)
    try:
        points = [p for p in index.find(SearchFilter(), limit=5000) if p.payload.image]
        if not points:
            raise ValueError(f"{uri}: no image points to draw queries from")
        rng = np.random.default_rng(seed)
        pick = [points[i] for i in rng.choice(len(points), min(n, len(points)), replace=False)]
        vectors = index.vectors("image", [p.id for p in pick]).tolist()
        uploads = []
        for p in pick[:32]:
            try:
                arr = load_image(stored_image_path(str(p.payload.image), uri, index.meta.image_root))
            except ImageLoadError:
                continue
            buf = io.BytesIO()
            Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
            uploads.append(buf.getvalue())
        if not uploads:
            raise ValueError(f"{uri}: none of the index's images could be read back for upload queries")
        return vectors, uploads
    finally:
        index.close()


async def _drive(url: str, key: str, make_request, requests: int, concurrency: int, max_seconds: float,
                 warmup: int = 0) -> dict:
    """``warmup`` requests at full concurrency first, not counted: the server's worker threads,
    connections and caches are made by them, not by the measured requests."""
    import httpx

    lat: list[float] = []
    errors = 0
    sent = 0
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        async def worker(limit: int, deadline: float, record: bool) -> None:
            nonlocal sent, errors
            while sent < limit and time.perf_counter() < deadline:
                i = sent
                sent += 1
                t0 = time.perf_counter()
                r = await make_request(client, i)
                if not record:
                    continue
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors += 1

        warm = max(min(4, requests), warmup)
        await asyncio.gather(*(worker(warm, time.perf_counter() + max_seconds, False) for _ in range(concurrency)))
        sent = 0
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(requests, t0 + max_seconds, True) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "seconds": round(wall, 2),
            "req_per_s": round(len(lat) / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p90_ms": round(float(np.percentile(ms, 90)), 1) if len(ms) else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None}


async def _beside_uploads(url: str, key: str, by_vector, by_upload, requests: int, concurrency: int,
                          max_seconds: float, warmup: int, upload_clients: int = 1) -> dict:
    """By-vector requests driven as :func:`_drive` does while ``upload_clients`` clients upload
    images back to back: does search latency hold while the encoder runs beside it?

    Why: an encoder forward takes both cores for tens of milliseconds; how much of that a
    sub-millisecond search then waits is set by the thread budgets (``medrag serve
    --torch-threads``), which this scenario is for choosing. Uploads are counted over the whole
    run (warm-up included) and reported per second, so the price paid on the encoder side shows.
    """
    import httpx

    stop = asyncio.Event()
    done = 0

    async def uploader() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            i = 0
            while not stop.is_set():
                r = await by_upload(c, i)
                i += 1
                done += r.status_code == 200

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(uploader()) for _ in range(upload_clients)]
    try:
        res = await _drive(url, key, by_vector, requests, concurrency, max_seconds, warmup)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    res["uploads_beside"] = done
    res["uploads_per_s_beside"] = round(done / (time.perf_counter() - t0), 1)
    return res


def create_key(keys_file: Path, name: str) -> str:
    """A fresh API key, made the way an admin would (``medrag serve --add-key``), in its own process:
    the benchmark measures the service from outside and never imports it."""
    out = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--api-keys", str(keys_file), "--add-key", name],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1].strip()


def start_server(uri: str, keys_file: str | Path | None, timeout: float = 180.0, extra: Sequence[str] = (),
                 wait_ready: bool = True) -> tuple[subprocess.Popen, str]:
    """``medrag serve`` in its own process on a free loopback port; returns once it is ready (or,
    with ``wait_ready=False``, once it answers ``/health/live``: a server on a damaged index).

    ``keys_file=None`` serves with ``--allow-anonymous`` (local development); ``extra``: more
    ``medrag serve`` options."""
    import httpx

    port = _free_port()
    auth = ["--api-keys", str(keys_file)] if keys_file is not None else ["--allow-anonymous"]
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--index", uri, *auth,
                             "--port", str(port), "--no-text-encoder", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if httpx.get(url + ("/health/ready" if wait_ready else "/health/live"), timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.perf_counter() > deadline:
            proc.kill()
            err = proc.communicate()[1] if proc.stderr else ""
            raise RuntimeError(f"medrag serve did not become ready: {err[-2000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


def run(uri: str, out_dir: str | Path, requests: int = 400, concurrency: int = 4, max_seconds: float = 60.0,
        k: int = 10, seed: int = 0, warmup: int = 50, serve_args: Sequence[str] = ()) -> dict:
    """The three scenarios against one ``medrag serve`` (``serve_args``: its options, e.g. the
    thread budgets ``--torch-threads 1``)."""
    import httpx

    vectors, uploads = _payloads(uri, requests, seed)
    with tempfile.TemporaryDirectory() as tmp:
        key = create_key(Path(tmp) / "keys.json", "load-benchmark")
        t_start = time.perf_counter()
        proc, url = start_server(uri, Path(tmp) / "keys.json", extra=serve_args)
        try:
            startup = time.perf_counter() - t_start

            async def by_vector(client, i):
                return await client.post("/api/search/vector", json={"vector": vectors[i % len(vectors)], "k": k})

            async def by_upload(client, i):
                files = {"image": ("q.png", uploads[i % len(uploads)], "image/png")}
                return await client.post("/api/search/image", files=files, data={"k": str(k)})

            scenarios: dict[str, Any] = {}
            scenarios["search-by-vector"] = asyncio.run(_drive(url, key, by_vector, requests, concurrency, max_seconds,
                                                               warmup))
            scenarios["search-by-upload"] = asyncio.run(_drive(url, key, by_upload, requests, concurrency, max_seconds,
                                                               min(warmup, 2 * concurrency)))
            scenarios["vector-beside-upload"] = asyncio.run(_beside_uploads(
                url, key, by_vector, by_upload, requests, concurrency, max_seconds, warmup))
            metrics = httpx.get(url + "/metrics", timeout=5).text
        finally:
            stop_server(proc)
    result = {"index": uri, "concurrency": concurrency, "k": k, "warmup": warmup, "serve_args": list(serve_args),
              "server_startup_s": round(startup, 2),
              "upload_bytes_mean": int(np.mean([len(u) for u in uploads])) if uploads else 0,
              "scenarios": scenarios,
              "server_counted": sum(1 for line in metrics.splitlines()
                                    if line.startswith("medrag_requests_total") and "/api/search" in line)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    lines = [f"{'scenario':20s} {'n':>5s} {'err':>4s} {'req/s':>7s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}"]
    for name, s in result["scenarios"].items():
        lines.append(f"{name:20s} {s['requests']:5d} {s['errors']:4d} {s['req_per_s']:7.1f} {s['p50_ms'] or 0:8.1f} "
                     f"{s['p90_ms'] or 0:8.1f} {s['p99_ms'] or 0:8.1f}"
                     + (f"   (1 upload client beside: {s['uploads_per_s_beside']} uploads/s)"
                        if "uploads_per_s_beside" in s else ""))
    return "\n".join(lines)
