"""Where a by-vector request's time goes inside the service (no HTTP): cProfile over N requests.

Opens the API's ``Service`` on an index, then answers ``N`` by-vector queries (stored image
vectors, k=10) the way ``POST /api/search/vector`` does: ``Searcher.by_vector`` then
``Service.search_out``. Prints the mean time per request and the functions that took most.

Run: ``.venv/bin/python scripts/profile_by_vector.py faiss:/tmp/ix [N]``
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

from api.app import Service
from api.settings import Settings
from retrieval.index import SearchFilter
from retrieval.search import Query


def main(uri: str, n: int) -> None:
    svc = Service(Settings(index=uri, allow_anonymous=True, load_text_encoder=False, reload_interval_s=0))
    try:
        ids = [p.id for p in svc.index.find(SearchFilter(), limit=5000)][:256]
        vectors = svc.index.vectors("image", ids)
        q = Query(k=10)

        def one(i: int) -> None:
            t0 = time.perf_counter()
            svc.search_out(svc.searcher.by_vector(vectors[i % len(vectors)], "image", q), time.perf_counter() - t0)

        for i in range(50):  # warm caches
            one(i)
        t0 = time.perf_counter()
        for i in range(n):
            one(i)
        plain = (time.perf_counter() - t0) / n
        prof = cProfile.Profile()
        prof.enable()
        for i in range(n):
            one(i)
        prof.disable()
        print(f"{uri}: {plain * 1e6:.0f} us per by-vector request in-process (no HTTP), {n} requests")
        stats = pstats.Stats(prof).strip_dirs().sort_stats("cumulative")
        stats.print_stats(18)
        stats.sort_stats("tottime").print_stats(12)
    finally:
        svc.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
