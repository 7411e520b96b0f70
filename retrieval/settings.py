"""Every environment variable medrag reads, in one place, typed and documented.

Why one module: a hospital admin configures a deployment through the environment; they need one
table (docs/architecture.md, "Settings") that is the whole truth, and code must not grow private
``os.environ.get`` calls with their own defaults. Read through :func:`env` at the moment of use
(not at import), so tests and long-running services see changes.

Secrets (keys, passwords) are read here but never logged or echoed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

QUANTIZATIONS = ("none", "scalar", "binary")


@dataclass(frozen=True)
class QdrantCollectionSettings:
    """How a build creates a collection on a Qdrant server (``http(s)://`` index URIs).

    Why settings and not flags: a cluster's shape is the deployment's, set once by the admin
    beside ``QDRANT_API_KEY``, not per build. Payload indexes on every filter field are always
    created on a server.
    """

    shard_number: int = 1  # MEDRAG_QDRANT_SHARDS: shards of a new collection (spread over the nodes)
    replication_factor: int = 1  # MEDRAG_QDRANT_REPLICAS: copies of each shard (2+: a node may fail)
    on_disk: bool = False  # MEDRAG_QDRANT_ON_DISK: vectors memory-mapped from disk, not held in RAM
    quantization: str = "none"  # MEDRAG_QDRANT_QUANTIZATION: none | scalar (int8) | binary
    rescore: bool = True  # quantized search rescored with the original vectors (oversampling 2x)

    def __post_init__(self) -> None:
        if self.shard_number < 1 or self.replication_factor < 1:
            raise ValueError(f"MEDRAG_QDRANT_SHARDS and MEDRAG_QDRANT_REPLICAS must be >= 1, got "
                             f"{self.shard_number} and {self.replication_factor}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"MEDRAG_QDRANT_QUANTIZATION={self.quantization!r}: expected one of "
                             f"{', '.join(QUANTIZATIONS)}")


def _int(name: str, value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: expected an integer") from exc


def _bool(name: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class EnvSettings:
    phi_key: str | None  # MEDRAG_PHI_KEY: HMAC key for patient pseudonyms (set it in production)
    state_dir: Path  # MEDRAG_STATE: build state of server-backed indexes (default ~/.cache/medrag)
    dicomweb_user: str | None  # MEDRAG_DICOMWEB_USER: basic-auth user for the PACS
    dicomweb_password: str | None  # MEDRAG_DICOMWEB_PASSWORD
    llm_api_key: str | None  # MEDRAG_LLM_API_KEY: key for the OpenAI-compatible generator
    qdrant_api_key: str | None  # QDRANT_API_KEY: key for a Qdrant server
    shared: Path | None  # MEDRAG_SHARED: the shared data folder (tests and benchmarks)
    verify: str = "full"  # MEDRAG_VERIFY: how readers check a version's checksums (full | size)
    qdrant: QdrantCollectionSettings = field(default_factory=QdrantCollectionSettings)  # MEDRAG_QDRANT_*

    @property
    def dicomweb_auth(self) -> tuple[str, str] | None:
        if self.dicomweb_user and self.dicomweb_password:
            return (self.dicomweb_user, self.dicomweb_password)
        return None


# name, field, default, what it is for: the source of the settings table in the docs
VARIABLES: tuple[tuple[str, str, str, str], ...] = (
    ("MEDRAG_PHI_KEY", "phi_key", "(public default, warns)", "HMAC key for patient-id pseudonyms and date shifts"),
    ("MEDRAG_STATE", "state_dir", "~/.cache/medrag", "build state (segments, lock) for server-backed indexes"),
    ("MEDRAG_DICOMWEB_USER", "dicomweb_user", "unset", "PACS basic-auth user (QIDO/WADO and Orthanc /changes)"),
    ("MEDRAG_DICOMWEB_PASSWORD", "dicomweb_password", "unset", "PACS basic-auth password"),
    ("MEDRAG_LLM_API_KEY", "llm_api_key", "unset", "bearer key of the OpenAI-compatible generator server"),
    ("QDRANT_API_KEY", "qdrant_api_key", "unset", "API key of a Qdrant server (http(s):// index URIs)"),
    ("MEDRAG_SHARED", "shared", "../shared", "shared data folder read by tests and benchmarks"),
    ("MEDRAG_VERIFY", "verify", "full", "readers check a published version's checksums: full (SHA-256) or size"),
    ("MEDRAG_QDRANT_SHARDS", "qdrant.shard_number", "1", "shards of a collection a build creates on a Qdrant server"),
    ("MEDRAG_QDRANT_REPLICAS", "qdrant.replication_factor", "1", "replicas of each shard (Qdrant cluster)"),
    ("MEDRAG_QDRANT_ON_DISK", "qdrant.on_disk", "0", "1: a server collection keeps vectors on disk (memory-mapped)"),
    ("MEDRAG_QDRANT_QUANTIZATION", "qdrant.quantization", "none",
     "none, scalar (int8) or binary quantization of a server collection (rescored)"),
    ("HF_HUB_OFFLINE", "-", "1 (set on import)", "Hugging Face libraries never reach a hub"),
    ("TRANSFORMERS_OFFLINE", "-", "1 (set on import)", "same, for transformers"),
)


def env() -> EnvSettings:
    """The settings as the environment has them now."""
    g = os.environ.get
    shared = g("MEDRAG_SHARED")
    return EnvSettings(
        phi_key=g("MEDRAG_PHI_KEY") or None,
        state_dir=Path(g("MEDRAG_STATE", "~/.cache/medrag")).expanduser(),
        dicomweb_user=g("MEDRAG_DICOMWEB_USER") or None,
        dicomweb_password=g("MEDRAG_DICOMWEB_PASSWORD") or None,
        llm_api_key=g("MEDRAG_LLM_API_KEY") or None,
        qdrant_api_key=g("QDRANT_API_KEY") or None,
        shared=Path(shared) if shared else None,
        verify=(g("MEDRAG_VERIFY") or "full").lower(),
        qdrant=QdrantCollectionSettings(
            shard_number=_int("MEDRAG_QDRANT_SHARDS", g("MEDRAG_QDRANT_SHARDS"), 1),
            replication_factor=_int("MEDRAG_QDRANT_REPLICAS", g("MEDRAG_QDRANT_REPLICAS"), 1),
            on_disk=_bool("MEDRAG_QDRANT_ON_DISK", g("MEDRAG_QDRANT_ON_DISK")),
            quantization=(g("MEDRAG_QDRANT_QUANTIZATION") or "none").lower()),
    )


def markdown_table() -> str:
    """The settings table for docs/architecture.md (a test keeps the docs in step)."""
    rows = ["| variable | default | what it is for |", "|---|---|---|"]
    rows += [f"| `{name}` | {default} | {doc} |" for name, _, default, doc in VARIABLES]
    return "\n".join(rows)
