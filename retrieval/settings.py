"""Every environment variable medrag reads, in one place, typed and documented.

Why one module: a hospital admin configures a deployment through the environment; they need one
table (docs/architecture.md, "Settings") that is the whole truth, and code must not grow private
``os.environ.get`` calls with their own defaults. Read through :func:`env` at the moment of use
(not at import), so tests and long-running services see changes.

Secrets (keys, passwords) are read here but never logged or echoed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EnvSettings:
    phi_key: str | None  # MEDRAG_PHI_KEY: HMAC key for patient pseudonyms (set it in production)
    state_dir: Path  # MEDRAG_STATE: build state of server-backed indexes (default ~/.cache/medrag)
    dicomweb_user: str | None  # MEDRAG_DICOMWEB_USER: basic-auth user for the PACS
    dicomweb_password: str | None  # MEDRAG_DICOMWEB_PASSWORD
    llm_api_key: str | None  # MEDRAG_LLM_API_KEY: key for the OpenAI-compatible generator
    qdrant_api_key: str | None  # QDRANT_API_KEY: key for a Qdrant server
    shared: Path | None  # MEDRAG_SHARED: the shared data folder (tests and benchmarks)

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
    )


def markdown_table() -> str:
    """The settings table for docs/architecture.md (a test keeps the docs in step)."""
    rows = ["| variable | default | what it is for |", "|---|---|---|"]
    rows += [f"| `{name}` | {default} | {doc} |" for name, _, default, doc in VARIABLES]
    return "\n".join(rows)
