"""Thread budgets of a serving process (the micro-batching wrappers live in :mod:`retrieval.batching`:
the Searcher is built with them, see ``api.app.Service``)."""

from __future__ import annotations


def set_thread_budgets(torch_threads: int | None, faiss_threads: int | None) -> None:
    """Set torch's intra-op and FAISS's OpenMP thread counts deliberately.

    With requests served concurrently, library defaults (one thread per core each) oversubscribe
    the cores and a search waits behind an encoder forward; ``None`` keeps the library default.
    """
    if torch_threads:
        import torch  # heavy, optional here: only when a budget is set

        torch.set_num_threads(torch_threads)
    if faiss_threads:
        import faiss  # heavy, optional here: only when a budget is set

        faiss.omp_set_num_threads(faiss_threads)
