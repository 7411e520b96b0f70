"""GPU FAISS: GPU-built kinds answer like the exact scan (the congruence check of the CPU backends),
are saved as CPU index files, and load onto a GPU when asked.

The ``gpu`` tests skip without a CUDA build of FAISS and a GPU. Run them on a GPU host with::

    pip install -e '.[gpu,dev]' && python -m pytest tests/test_gpu_faiss.py -q -m gpu

The rest run everywhere: the CPU form of IVF-PQ, the factory strings, and the clear error a GPU
kind gives on a machine without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import IndexError_, IndexMeta, open_index, open_writer
from retrieval.index.faiss_index import GPU_KINDS, factory_string, gpu_available
from tests.test_index_congruence import FILTERS, K, N, _build, _data, _exact

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA build of FAISS and a GPU (medrag[gpu])")


def _check_congruent(ix, x, payloads, exact: bool, min_recall: float) -> float:
    rng = np.random.default_rng(1)
    queries = x[rng.choice(N, 8, replace=False)] + 0.05 * rng.standard_normal((8, x.shape[1])).astype(np.float32)
    recalls = []
    for flt in FILTERS:
        for q in queries:
            got = ix.search("image", q[None], K, flt)[0]
            ref_ids, ref_sims = _exact(x, payloads, q, flt, K)
            assert all(flt is None or flt.matches(h.payload) for h in got)
            if exact:
                np.testing.assert_allclose([h.score for h in got], ref_sims, atol=1e-4)
            recalls.append(len({h.id for h in got} & set(ref_ids)) / max(1, len(ref_ids)))
    assert np.mean(recalls) >= min_recall, np.mean(recalls)
    return float(np.mean(recalls))


def test_factory_strings_of_the_gpu_kinds_are_the_cpu_files():
    assert factory_string("gpu-flat", 10**6) == "IDMap2,Flat"
    assert factory_string("gpu-ivf", 10**6) == factory_string("ivf", 10**6) == "IDMap2,IVF4000,Flat"
    assert factory_string("gpu-ivfpq", 10**6) == "IDMap2,IVF4000,PQ64"
    assert factory_string("gpu-cagra", 100) == "IDMap2,Flat"  # too few points for a graph
    with pytest.raises(IndexError_, match="unknown FAISS index kind 'gpu-hnsw'"):
        factory_string("gpu-hnsw", 10)


@pytest.mark.skipif(gpu_available(), reason="checks the error a CPU-only FAISS gives")
@pytest.mark.parametrize("kind", GPU_KINDS)
def test_a_gpu_kind_without_cuda_fails_clearly_before_any_work(kind, tmp_path):
    spaces = {"image": 8}
    with pytest.raises(IndexError_, match=r"CUDA build of FAISS.*medrag\[gpu\]"):
        open_writer(f"faiss:{tmp_path}/g", spaces, IndexMeta(backend="", spaces=spaces, count=0), kind)
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").rglob("*.faiss"))


@pytest.mark.skipif(gpu_available(), reason="checks the error a CPU-only FAISS gives")
def test_opening_on_a_gpu_without_cuda_fails_clearly(tmp_path):
    x, r, payloads = _data()
    _build(f"faiss:{tmp_path}/f", "flat", x, r, payloads)
    with pytest.raises(IndexError_, match="CUDA build of FAISS"):
        open_index(f"faiss:{tmp_path}/f", gpu=True)


def test_ivfpq_on_the_cpu_is_congruent_within_pq_error(tmp_path):
    # 24-d vectors cannot be split in 64 sub-quantizers; PQ needs dim % PQ_M == 0, so 64-d here
    rng = np.random.default_rng(0)
    x, _, payloads = _data()
    x = np.concatenate([x, x, 0.1 * rng.standard_normal((N, 16)).astype(np.float32)], axis=1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    big = np.concatenate([x] * 2)  # IVF needs >= 1 024 points; ids >= N are unfiltered filler
    uri = f"faiss:{tmp_path}/pq"
    w = open_writer(uri, {"image": 64}, IndexMeta(backend="", spaces={"image": 64}, count=0), "ivfpq")
    w.add(np.arange(2 * N), {"image": big}, payloads + [dict(p, study_id="x" + p["study_id"]) for p in payloads])
    w.commit()
    ix = open_index(uri)
    assert ix.meta.index_kind == "ivfpq"
    q = x[3]
    got = ix.search("image", q[None], 2)[0]
    assert {h.id for h in got} == {3, N + 3}  # a duplicated point comes back first, twice


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "exact", "min_recall"), [("gpu-flat", True, 1.0), ("gpu-ivf", False, 0.9),
                                                           ("gpu-ivfpq", False, 0.5), ("gpu-cagra", False, 0.9)])
def test_gpu_built_kinds_are_congruent_and_saved_as_cpu_files(kind, exact, min_recall, tmp_path):
    import faiss

    if kind == "gpu-cagra" and not hasattr(faiss, "GpuIndexCagra"):
        pytest.skip("this FAISS wheel has no CAGRA (needs cuVS)")
    x, r, payloads = _data()
    if kind == "gpu-ivfpq":  # 64 sub-quantizers need a dimension divisible by 64
        pytest.skip("IVF-PQ is measured by `medrag eval speed` at 512-d; the congruence set is 24-d")
    big_x = np.concatenate([x] * 2) if kind in ("gpu-ivf", "gpu-cagra") else x
    uri = f"faiss:{tmp_path}/{kind}"
    if big_x is x:
        _build(uri, kind, x, r, payloads)
    else:  # graph and list kinds need >= 1 024 points: the set twice, the copies never match a filter
        spaces = {"image": x.shape[1]}
        w = open_writer(uri, spaces, IndexMeta(backend="", spaces=spaces, count=0), kind)
        w.add(np.arange(2 * N), {"image": big_x},
              payloads + [dict(p, study_id="x", modality="none", patient_id="none") for p in payloads])
        w.commit()
    cpu = open_index(uri)  # the saved file is a CPU index: any machine opens it
    assert cpu._gpu == {} and cpu.meta.index_kind == kind
    if big_x is x:
        _check_congruent(cpu, x, payloads, exact, min_recall)
    gpu = open_index(uri, gpu=True)
    assert gpu._gpu["image"] is not None
    q = x[:4]
    for a, b in zip(cpu.search("image", q, K), gpu.search("image", q, K), strict=True):
        assert len({h.id for h in a} & {h.id for h in b}) >= (K if exact else K - 2)
    if big_x is x:
        _check_congruent(gpu, x, payloads, exact, min_recall)
