"""Filtered vs unfiltered FAISS p50: new paths vs the old selector path (same index, same process)."""
import sys, time, tempfile, json
import numpy as np
import retrieval.index.faiss_index as fi
from retrieval.index import IMAGE, IndexMeta, SearchFilter, open_index, open_writer
from eval.speed import vectors, MODALITIES

n, dim, nq, k = int(sys.argv[1]), 512, 200, 10
kinds = sys.argv[2].split(",")
queries = vectors(nq, dim, 0, start=10**9)
data = vectors(n, dim, 0)
sub = np.flatnonzero(np.arange(n) % 10 == 1)
truth_f = []
for q in queries:
    s = data[sub] @ q if False else None
ds = data[sub]
for q in queries:
    s = ds @ q; top = np.argpartition(-s, k)[:k]; truth_f.append(set(sub[top].tolist()))
del ds
res = {}
for kind in kinds:
    root = tempfile.mkdtemp(prefix="b6-", dir=None)
    uri = f"faiss:{root}/ix"
    t0 = time.perf_counter()
    w = open_writer(uri, {IMAGE: dim}, IndexMeta(backend="", spaces={IMAGE: dim}, count=0), kind)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        w.add(np.arange(i, i + m), {IMAGE: data[i:i + m]}, [{"study_id": f"s{j}", "modality": MODALITIES[j % 10]} for j in range(i, i + m)])
    w.commit()
    build = time.perf_counter() - t0
    ix = open_index(uri)
    flt = SearchFilter(modality=["CT"])
    def run(f):
        for q in queries[:5]: ix.search(IMAGE, q[None], k, f)
        lat, rec = [], []
        for qi, q in enumerate(queries):
            t = time.perf_counter(); h = ix.search(IMAGE, q[None], k, f)[0]; lat.append(time.perf_counter() - t)
            if f is not None: rec.append(len({x.id for x in h} & truth_f[qi]) / k)
        return round(float(np.percentile(np.array(lat) * 1000, 50)), 3), round(float(np.percentile(np.array(lat) * 1000, 99)), 3), (round(float(np.mean(rec)), 4) if rec else None)
    u = run(None)
    new = run(flt)
    # the old path: an ID selector over the full index (what search did before for >2% subsets)
    saved = (fi.POSTFILTER_MAX_K, fi.EXACT_SUBSET)
    fi.POSTFILTER_MAX_K = 0
    orig = fi.FaissIndex._subset_scan
    fi.FaissIndex._subset_scan = lambda self, space, key, allowed, q, k, cache=True: fi.FaissIndex._selector_search(self, key, self._index[space], fi._faiss().downcast_index(self._index[space].index), allowed, q, k)
    old = run(flt)
    fi.FaissIndex._subset_scan = orig; fi.POSTFILTER_MAX_K = saved[0]
    res[kind] = {"build_s": round(build, 1), "unfiltered p50/p99": u[:2], "filtered new p50/p99/R@10": new, "filtered old (selector) p50/p99/R@10": old,
                 "ratio new": round(new[0] / u[0], 2), "ratio old": round(old[0] / u[0], 2)}
    print(kind, json.dumps(res[kind]), flush=True)
    ix.close()
    import shutil; shutil.rmtree(root)
