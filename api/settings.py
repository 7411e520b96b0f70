"""Service settings: one typed struct, filled from the CLI (``medrag serve``) or by tests."""

from __future__ import annotations

import msgspec


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    index: str  # index URI (faiss:/dir, qdrant+local:/dir, http://host:6333/name)
    api_keys_file: str | None = None  # JSON of hashed keys; None only with allow_anonymous
    allow_anonymous: bool = False  # development only: no key needed
    device: str = "cpu"
    max_body_bytes: int = 64 * 1024 * 1024  # whole request
    max_upload_bytes: int = 48 * 1024 * 1024  # one uploaded file
    max_upload_pixels: int = 40_000_000  # rows * columns * frames of an upload
    max_upload_frames: int = 64  # DICOM multi-frame uploads
    decode_timeout_s: float = 20.0  # per upload decode (includes waiting for decode memory)
    max_decode_bytes: int = 256 * 1024 * 1024  # decoded samples of one upload (codestream / inflated size)
    decode_memory_bytes: int = 1024 * 1024 * 1024  # working memory of all decodes at once (process-wide)
    max_k: int = 100
    thumbnail_px: int = 256
    generator: str = "structured"  # structured | extractive | edit | vlm | http
    generator_model_dir: str | None = None
    generator_base_url: str | None = None
    generator_model: str | None = None
    generator_api_key: str | None = None
    load_text_encoder: bool = True  # report space (text queries); off saves memory
    torch_threads: int | None = None  # torch intra-op threads for encoders (None: torch's default)
    faiss_threads: int | None = None  # FAISS OpenMP threads per search call (None: FAISS's default)
    batch_max: int = 32  # concurrent searches merged into one index call (retrieval/batching.py)
    reload_interval_s: float = 2.0  # poll for a newly published index version (0: never reload)
    reload_retry_s: float = 30.0  # a published version that failed to open is tried again this often
    reload_grace_s: float = 60.0  # a replaced version stays open this long for requests already on it
    batch_wait_ms: float = 2.0  # how long a batch waits for company when other requests are in flight
