"""Adapters that turn what users have into a manifest (see :mod:`indexer.manifest`).

Each returns a :class:`SourceResult`: the studies, and what it skipped and why (a missing image,
an unreadable DICOM), so a build reports losses instead of hiding them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from retrieval.records import Study


@dataclass
class SourceResult:
    studies: list[Study] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<file or id>: reason" - dropped
    warnings: list[str] = field(default_factory=list)  # "<file or row>: reason" - kept, with a loss
    fetched: int = 0  # studies fetched from a remote source in this run (DICOMweb)


# name -> "module:function" of each adapter (imported only when used; the CLI wires its flags)
SOURCES: dict[str, str] = {
    "folder": "indexer.sources.folder:from_folder",
    "r2gen": "indexer.sources.r2gen:from_r2gen",
    "dicom": "indexer.sources.dicom_folder:from_dicom_folder",
    "dicomweb": "indexer.sources.dicomweb:from_dicomweb",
    "labels-csv": "indexer.sources.labelled:from_labels_csv",
    "notes-csv": "indexer.sources.labelled:from_notes_csv",
}


def source(name: str) -> Callable[..., SourceResult]:
    """The adapter registered as ``name``, its studies de-identified by the one policy of every
    source (:func:`indexer.deid.deidentify_study`): a manifest written from any source holds
    pseudonymised patient ids, shifted dates and de-identified report text."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    module, func = SOURCES[name].split(":")
    fn: Callable[..., SourceResult] = getattr(importlib.import_module(module), func)

    @functools.wraps(fn)
    def deidentified(*args: Any, **kwargs: Any) -> SourceResult:
        from indexer.deid import deidentify_study
        from indexer.phi import PhiPolicy

        res = fn(*args, **kwargs)
        policy = PhiPolicy.from_env()
        res.studies = [deidentify_study(s, policy) for s in res.studies]
        return res

    return deidentified
