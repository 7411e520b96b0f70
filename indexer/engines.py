"""Where a build's segments are encoded: ``local`` (this process, the default) or ``ray``.

Why an engine registry and not our own scheduler: Ray already places tasks on a cluster's
workers, retries a task whose worker died, and scales out to GPU nodes. Each Ray task encodes one
segment and writes it into the same :class:`indexer.segments.SegmentStore` a local build uses
(atomic rename on a filesystem every worker sees), so a resumed build, ``add_studies`` and the
atomic publish are unchanged: the driver only waits for the segments, then assembles as before.

A worker process keeps its encoders between tasks (built once per process, keyed by the
build's encoder fingerprint). A task whose worker is killed is retried on another worker
(``RAY_TASK_RETRIES``); its segment is written only on success, so nothing half-written is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from retrieval.records import Study

RAY_TASK_RETRIES = 5
Chunk = list[tuple[Study, str]]  # (study, study key) of one segment
Done = tuple[list[str], Path]  # the segment's study keys and its file


def run_local(chunks: list[Chunk], encode: Callable[[Chunk], Done], **_: Any) -> Iterator[Done]:
    """Encode the segments one after the other in this process (the default engine)."""
    for chunk in chunks:
        yield encode(chunk)


_WORKER_STATE: dict[str, Any] = {}


def _encode_in_worker(job: dict[str, Any], chunk: Chunk) -> tuple[list[str], str]:
    """Runs inside a Ray worker: encoders built once per process, one segment written."""
    from indexer.build import BuildConfig, _encode_segment
    from indexer.segments import SegmentStore
    from retrieval.encoders import create_encoder
    from retrieval.entities import EntityExtractor
    from retrieval.taxonomy import default_taxonomy

    cfg: BuildConfig = job["cfg"]
    state = _WORKER_STATE.get(job["store"])
    if state is None:
        tax = default_taxonomy()
        image_enc = create_encoder(cfg.encoder, checkpoint=cfg.checkpoint, device=cfg.device,
                                   **({"allow_random": True} if cfg.allow_random_init else {}))
        text_enc = create_encoder(cfg.text_encoder, checkpoint=cfg.text_checkpoint, device=cfg.device) \
            if cfg.text_encoder else None
        state = _WORKER_STATE[job["store"]] = (tax, EntityExtractor(tax), image_enc, text_enc)
    tax, extractor, image_enc, text_enc = state
    seg = _encode_segment(chunk, job["manifest"], image_enc, text_enc, job["conditioning"], job["spaces"], tax,
                          extractor, cfg.batch_size)
    path = SegmentStore(Path(job["store"]), collect=False).write(seg)
    return seg.study_keys, str(path)


def run_ray(chunks: list[Chunk], encode: Callable[[Chunk], Done], *, job: dict[str, Any],
            address: str | None = None, workers: int | None = None, **_: Any) -> Iterator[Done]:
    """Encode the segments as Ray tasks; yield each as it finishes (any order).

    ``address``: an existing cluster (``ray://host:10001`` or ``host:6379``, or ``auto``); without
    it a local Ray with ``workers`` CPUs is started for this build and shut down after it.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--engine ray needs Ray: pip install 'medrag[ray]'") from exc
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=False, **kw)
        started = True
    try:
        gpus = 1 if str(job["cfg"].device).startswith("cuda") else 0  # a GPU build: one GPU per task
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=RAY_TASK_RETRIES,
                          retry_exceptions=False)(_encode_in_worker)
        job_ref = ray.put(job)
        pending = [task.remote(job_ref, chunk) for chunk in chunks]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            keys, path = ray.get(ready[0])
            yield keys, Path(path)
    finally:
        if started:
            ray.shutdown()


ENGINES: dict[str, Callable[..., Iterator[Done]]] = {"local": run_local, "ray": run_ray}
