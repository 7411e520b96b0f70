"""Quantization recall vs exact on qdrant-edge (Qdrant's engine in-process), 20k x 512 clustered."""
import sys, time, tempfile, json
import numpy as np
import qdrant_edge as e
from eval.speed import vectors
n, dim, nq, k = int(sys.argv[1]), 512, 100, 10
x = vectors(n, dim, 0); qs = vectors(nq, dim, 0, start=10**9)
truth = [set(np.argsort(-(x @ q))[:k].tolist()) for q in qs]
out = {}
for name in ("none", "scalar", "binary"):
    quant = None
    if name == "scalar": quant = e.ScalarQuantizationConfig(type=e.ScalarType.Int8, quantile=0.99, always_ram=True)
    if name == "binary": quant = e.BinaryQuantizationConfig(always_ram=True)
    d = tempfile.mkdtemp(dir=None)
    t0 = time.perf_counter()
    shard = e.EdgeShard.create(d + "/s", e.EdgeConfig(vectors={"image": e.EdgeVectorParams(size=dim, distance=e.Distance.Dot, quantization_config=quant)}, wal_enabled=False))
    for i in range(0, n, 2000):
        shard.update(e.UpdateOperation.upsert_points([e.Point(j, {"image": x[j].tolist()}, {}) for j in range(i, min(n, i + 2000))]))
    shard.optimize(); build = time.perf_counter() - t0
    for rescore in ([False, True] if quant is not None else [None]):
        sp = e.SearchParams(hnsw_ef=128, quantization=e.QuantizationSearchParams(rescore=rescore, oversampling=2.0) if quant is not None else None)
        lat, rec = [], []
        for qi, q in enumerate(qs):
            t = time.perf_counter()
            pts = shard.query(e.QueryRequest(limit=k, query=e.Query.Nearest(q.tolist(), using="image"), params=sp))
            lat.append(time.perf_counter() - t)
            rec.append(len({int(p.id) for p in pts} & truth[qi]) / k)
        row = {"build_s": round(build, 1), "recall@10": round(float(np.mean(rec)), 4), "p50_ms": round(float(np.median(lat)) * 1000, 2)}
        print(name, "rescore" if rescore else "no-rescore" if rescore is False else "-", json.dumps(row), flush=True)
    shard.close()
