"""Adapters that turn what users have into a manifest (see :mod:`indexer.manifest`).

Each returns a :class:`SourceResult`: the studies, and what it skipped and why (a missing image,
an unreadable DICOM), so a build reports losses instead of hiding them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from indexer.manifest import Study


@dataclass
class SourceResult:
    studies: list[Study] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<file or id>: reason"
    fetched: int = 0  # studies fetched from a remote source in this run (DICOMweb)
