"""API keys: random tokens given to a client once, stored only as SHA-256 hashes.

Why SHA-256 and not a password hash: the keys are 256-bit random tokens, so there is nothing to
brute-force; a slow hash would only slow every request. Comparison is constant-time.

Key file (JSON, written atomically, mode 0600): ``{"keys": [{"name": ..., "sha256": ..., "created": ...}]}``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from pathlib import Path

from retrieval.storage import atomic_write_json

PREFIX = "mrk_"


class KeyFileError(ValueError):
    """The key file is missing or malformed (message names the file)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = dict(hashes)  # sha256 hex -> client name

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        p = Path(path)
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            entries = {e["sha256"].lower(): str(e["name"]) for e in doc["keys"]}
        except FileNotFoundError as exc:
            raise KeyFileError(f"API key file {p} does not exist (create one with `medrag serve --add-key NAME`)") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"API key file {p} is malformed ({exc})") from exc
        if any(len(h) != 64 for h in entries):
            raise KeyFileError(f"API key file {p}: every sha256 must be 64 hex characters")
        return cls(entries)

    def __len__(self) -> int:
        return len(self._hashes)

    def verify(self, authorization: str | None) -> str | None:
        """The client name for a valid ``Bearer <key>`` header, else None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        h = digest(key.strip())
        for known, name in self._hashes.items():
            if hmac.compare_digest(known, h):
                return name
        return None


def add_key(path: str | Path, name: str) -> str:
    """Create a key for ``name``, store its hash in ``path``; returns the key (shown once)."""
    p = Path(path)
    doc = json.loads(p.read_text(encoding="utf-8")) if p.exists() else {"keys": []}
    if any(e.get("name") == name for e in doc["keys"]):
        raise KeyFileError(f"{p}: a key named {name!r} exists already")
    key = PREFIX + secrets.token_urlsafe(32)
    doc["keys"].append({"name": name, "sha256": digest(key),
                        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    atomic_write_json(p, doc, mode=0o600)
    return key
