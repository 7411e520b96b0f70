"""``medrag eval speed``: build and query N x D vectors on every backend, against an exact scan.

Vectors are synthetic but clustered like real embeddings (1 000 Gaussian clusters, unit norm);
queries come from the same distribution. Every backend is driven through medrag's own writer and
reader (what a user gets, payloads and filters included), each in a fresh child process so its
build time, peak memory (VmHWM) and resident size after opening are its own. The numpy flat
scan in the parent is the reference: its top-10 is the truth for recall@10, and its per-query
latency is in the same table. Filtered queries ask for one modality of ten (10% of points).
Throughput (queries/s) is measured at each of ``batch_sizes`` rows per call, unfiltered. GPU FAISS
kinds (``faiss:gpu-flat``, ``faiss:gpu-ivf``, ``faiss:gpu-ivfpq``, ``faiss:gpu-cagra``) are built
on the GPU, saved as CPU files and searched on the GPU, beside CPU HNSW in the same run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("CR", "CT", "MR", "US", "DX", "MG", "NM", "PT", "XA", "RF")
FILTER_MODALITY = "CT"
GPU_BACKENDS = ("faiss:gpu-flat", "faiss:gpu-ivf", "faiss:gpu-ivfpq", "faiss:gpu-cagra", "faiss:hnsw")


BLOCK = 65536


def vectors(n: int, dim: int, seed: int, start: int = 0, centers: int = 1000) -> np.ndarray:
    """Rows ``start..start+n`` of the deterministic clustered set.

    Row r is drawn from a generator seeded by (seed, r // BLOCK), so any chunking of the same
    rows gives the same vectors (the reference scan and the backends see identical data).
    """
    c = np.random.default_rng(seed).standard_normal((centers, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    first, last = start // BLOCK, (start + n - 1) // BLOCK if n else start // BLOCK - 1
    for b in range(first, last + 1):
        rng = np.random.default_rng([seed, b])
        x = c[rng.integers(0, centers, BLOCK)] + 0.35 * rng.standard_normal((BLOCK, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        lo, hi = max(start, b * BLOCK), min(start + n, (b + 1) * BLOCK)
        out[lo - start:hi - start] = x[lo - b * BLOCK:hi - b * BLOCK]
    return out


def _rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentiles(lat: list[float]) -> dict[str, float]:
    ms = np.array(lat) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _recall(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)]))


def _child(backend: str, kind: str, n: int, dim: int, seed: int, queries: np.ndarray, k: int, root: str,
           out: Any, batch_sizes: tuple[int, ...] = ()) -> None:
    try:
        out.put(_run_backend(backend, kind, n, dim, seed, queries, k, root, batch_sizes))
    except BaseException as exc:  # report, do not hang the parent
        out.put({"error": f"{type(exc).__name__}: {exc}"})


def _run_backend(backend: str, kind: str, n: int, dim: int, seed: int, queries: np.ndarray, k: int,
                 root: str, batch_sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    from retrieval.index import IMAGE, IndexMeta, SearchFilter, open_index, open_writer

    uri = f"{backend}:{root}/{backend}-{kind}"
    meta = IndexMeta(backend="", spaces={IMAGE: dim}, count=0)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    writer = open_writer(uri, {IMAGE: dim}, meta, kind)
    step = 100_000
    for i in range(0, n, step):
        m = min(step, n - i)
        x = vectors(m, dim, seed, start=i)
        ids = np.arange(i, i + m, dtype=np.int64)
        payloads = [{"study_id": f"s{j}", "modality": MODALITIES[j % len(MODALITIES)]} for j in range(i, i + m)]
        writer.add(ids, {IMAGE: x}, payloads)
        del x
    writer.commit()
    build_s = time.perf_counter() - t0
    peak_build = _rss_mb("VmHWM") - rss0
    rss1 = _rss_mb()
    ix = open_index(uri, gpu=kind.startswith("gpu-"))  # GPU kinds are searched on the GPU
    open_mb = _rss_mb() - rss1
    flt = SearchFilter(modality=[FILTER_MODALITY])
    res: dict[str, Any] = {"build_s": round(build_s, 1), "build_peak_mb": round(peak_build), "open_rss_mb": round(open_mb)}
    for name, f in (("unfiltered", None), ("filtered", flt)):
        for q in queries[:5]:
            ix.search(IMAGE, q[None], k, f)
        lat, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = ix.search(IMAGE, q[None], k, f)[0]
            lat.append(time.perf_counter() - t)
            found.append([h.id for h in hits])
        res[name] = {**_percentiles(lat), "found": found}
    for b in batch_sizes:  # throughput: b queries per call (rows repeat when b > len(queries))
        qb = np.resize(queries, (b, dim))
        ix.search(IMAGE, qb, k)
        t, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - t < 1.0:
            ix.search(IMAGE, qb, k)
            calls += 1
        res[f"qps@{b}"] = round(b * calls / (time.perf_counter() - t))
    ix.close()
    res["disk_mb"] = round(sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 2**20)
    return res


def run(out_dir: str | Path, n: int = 1_000_000, dim: int = 512, nq: int = 200, k: int = 10, seed: int = 0,
        backends: tuple[str, ...] = ("faiss:hnsw", "faiss:ivf", "qdrant+local:hnsw"),
        work_dir: str | Path | None = None, batch_sizes: tuple[int, ...] = (64, 1024)) -> dict[str, Any]:
    t_all = time.perf_counter()
    queries = vectors(nq, dim, seed, start=10**9)  # same clusters, rows never indexed
    modality_of = np.arange(n) % len(MODALITIES) == MODALITIES.index(FILTER_MODALITY)
    # exact reference: numpy flat scan over the same rows (chunked to bound memory)
    data = vectors(n, dim, seed)
    lat_exact, lat_exact_f = [], []
    truth = np.zeros((nq, k), np.int64)
    truth_f = np.zeros((nq, k), np.int64)
    sub = np.flatnonzero(modality_of)
    data_f = data[sub]
    for qi, q in enumerate(queries):
        t = time.perf_counter()
        s = data @ q
        top = np.argpartition(-s, k)[:k]
        truth[qi] = top[np.argsort(-s[top])]
        lat_exact.append(time.perf_counter() - t)
        t = time.perf_counter()
        s = data_f @ q
        top = np.argpartition(-s, k)[:k]
        truth_f[qi] = sub[top[np.argsort(-s[top])]]
        lat_exact_f.append(time.perf_counter() - t)
    del data, data_f
    table: dict[str, Any] = {"numpy flat (exact)": {
        "build_s": 0.0, "unfiltered": {**_percentiles(lat_exact), "recall@10": 1.0},
        "filtered": {**_percentiles(lat_exact_f), "recall@10": 1.0},
        "open_rss_mb": round(n * dim * 4 / 2**20), "disk_mb": round(n * dim * 4 / 2**20)}}
    ctx = mp.get_context("spawn")
    for spec in backends:
        backend, kind = spec.rsplit(":", 1)
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)  # a named work dir need not exist yet
        root = tempfile.mkdtemp(prefix="medrag-speed-", dir=work_dir)
        try:
            box: Any = ctx.Queue()
            p = ctx.Process(target=_child, args=(backend, kind, n, dim, seed, queries, k, root, box, batch_sizes))
            p.start()
            res = box.get()
            p.join()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if "error" not in res:
            for name, tr in (("unfiltered", truth), ("filtered", truth_f)):
                res[name]["recall@10"] = round(_recall(res[name].pop("found"), tr, k), 4)
        table[f"{backend} {kind}"] = res
    result = {"n": n, "dim": dim, "queries": nq, "k": k, "filter": f"modality={FILTER_MODALITY} (10%)",
              "batch_sizes": list(batch_sizes),
              "seconds": round(time.perf_counter() - t_all, 1), "backends": table}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'backend':22s} {'build s':>8s} {'p50 ms':>7s} {'p99 ms':>7s} {'R@10':>6s} "
            f"{'f-p50':>7s} {'f-p99':>7s} {'f-R@10':>6s} {'peak MB':>8s} {'RSS MB':>7s} {'disk MB':>8s}"
            + "".join(f" {'q/s@' + str(b):>9s}" for b in result.get("batch_sizes", ())))
    lines = [f"{result['n']} x {result['dim']}, {result['queries']} single-vector queries, top-{result['k']}; "
             f"filtered: {result['filter']}", head]
    for name, r in result["backends"].items():
        if "error" in r:
            lines.append(f"{name:22s} error: {r['error']}")
            continue
        u, f = r["unfiltered"], r["filtered"]
        lines.append(f"{name:22s} {r['build_s']:8.1f} {u['p50_ms']:7.2f} {u['p99_ms']:7.2f} {u['recall@10']:6.3f} "
                     f"{f['p50_ms']:7.2f} {f['p99_ms']:7.2f} {f['recall@10']:6.3f} {r.get('build_peak_mb', 0):8} "
                     f"{r['open_rss_mb']:7} {r['disk_mb']:8}"
                     + "".join(f" {r.get(f'qps@{b}', '-'):>9}" for b in result.get("batch_sizes", ())))
    return "\n".join(lines)
