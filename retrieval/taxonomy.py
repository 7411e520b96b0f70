"""The anatomy hierarchy and finding vocabulary that reports are mined into.

Everything that names an anatomy or a finding (the extractor, payload filters, anatomy-conditioned
encoders, the CLI's ``--anatomy``) resolves names here, so a misspelt term fails in one place with
one clear message instead of silently matching nothing.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


class UnknownTermError(ValueError):
    """An anatomy or finding name that the taxonomy does not know."""


@dataclass(frozen=True)
class Anatomy:
    name: str
    parent: str | None
    patterns: tuple[str, ...]
    box: tuple[float, float, float, float]  # frontal-view region, normalised (x0, y0, x1, y1)
    side: str | None = None  # "left" / "right" for lateralised parts
    left: str | None = None  # lateral child used when a report gives only a side
    right: str | None = None
    coarse: bool = False  # an organ-and-side level (see Taxonomy.coarse)


@dataclass(frozen=True)
class Finding:
    name: str
    kind: str  # "finding" (what is seen) or "pathology" (what it is diagnosed as)
    anatomy: str  # where it sits when the report names no place
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class NormalStatement:
    pattern: re.Pattern[str]
    findings: tuple[str, ...]  # stated absent in the matched anatomy


@dataclass(frozen=True)
class Taxonomy:
    anatomies: dict[str, Anatomy]
    findings: dict[str, Finding]
    normal_statements: tuple[NormalStatement, ...]
    conditioning_anatomies: tuple[str, ...]
    _children: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    # ---- hierarchy -------------------------------------------------------------------------
    def ancestors(self, name: str) -> list[str]:
        """``name`` and every anatomy above it, nearest first."""
        out = []
        cur: str | None = self.anatomy(name).name
        while cur is not None:
            out.append(cur)
            cur = self.anatomies[cur].parent
        return out

    def descendants(self, name: str) -> list[str]:
        """``name`` and every anatomy below it."""
        out, todo = [], [self.anatomy(name).name]
        while todo:
            cur = todo.pop()
            out.append(cur)
            todo.extend(self._children.get(cur, ()))
        return out

    def is_within(self, name: str, ancestor: str) -> bool:
        return ancestor in self.ancestors(name)

    def coarse(self, name: str) -> str:
        """The nearest ancestor of ``name`` marked ``coarse`` in the taxonomy (organ and side).

        Labels are compared at this level where the exact part is noise: "left lower lobe
        atelectasis" and "left basilar atelectasis" are the same left-lung statement.
        """
        chain = self.ancestors(name)
        return next((a for a in chain if self.anatomies[a].coarse), chain[-1])

    @property
    def coarse_order(self) -> tuple[str, ...]:
        """Coarse anatomies in reading order (the file's order, the whole chest last)."""
        coarse = [a.name for a in self.anatomies.values() if a.coarse]
        return tuple([a for a in coarse if self.anatomies[a].parent is not None]
                     + [a for a in coarse if self.anatomies[a].parent is None])

    def lateral(self, name: str, side: str) -> str:
        """The left/right part of ``name`` (``pleura`` + left -> ``left pleura``), else ``name``."""
        a = self.anatomy(name)
        return getattr(a, side, None) or name

    # ---- lookup ----------------------------------------------------------------------------
    def anatomy(self, name: str) -> Anatomy:
        key = name.strip().lower()
        if key in self.anatomies:
            return self.anatomies[key]
        for a in self.anatomies.values():  # accept a synonym such as "lungs" or "cardiac"
            if any(re.fullmatch(p, key) for p in a.patterns):
                return a
        raise UnknownTermError(_unknown("anatomy", name, self.anatomies))

    def finding(self, name: str) -> Finding:
        key = name.strip().lower().replace("_", " ")  # dataset spellings: Pleural_Thickening
        if key in self.findings:
            return self.findings[key]
        for f in self.findings.values():
            if any(re.fullmatch(p, key) for p in f.patterns):
                return f
        raise UnknownTermError(_unknown("finding", name, self.findings))


def _unknown(what: str, name: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(sorted(known))}."


def load_taxonomy(path: str | Path | None = None) -> Taxonomy:
    """Load a taxonomy file (the packaged one when ``path`` is None)."""
    if path is None:
        return default_taxonomy()
    return _parse(json.loads(Path(path).read_text(encoding="utf-8")))


@functools.cache
def default_taxonomy() -> Taxonomy:
    text = resources.files("retrieval").joinpath("taxonomy.json").read_text(encoding="utf-8")
    return _parse(json.loads(text))


def _parse(raw: dict[str, Any]) -> Taxonomy:
    anatomies = {
        a["name"]: Anatomy(
            name=a["name"],
            parent=a.get("parent"),
            patterns=tuple(a["patterns"]),
            box=(float(a["box"][0]), float(a["box"][1]), float(a["box"][2]), float(a["box"][3])),
            side=a.get("side"),
            left=a.get("left"),
            right=a.get("right"),
            coarse=bool(a.get("coarse", False)),
        )
        for a in raw["anatomies"]
    }
    children: dict[str, list[str]] = {}
    for a in anatomies.values():
        if a.parent is not None:
            if a.parent not in anatomies:
                raise ValueError(f"taxonomy: anatomy {a.name!r} has unknown parent {a.parent!r}")
            children.setdefault(a.parent, []).append(a.name)
    findings = {
        f["name"]: Finding(f["name"], f["kind"], f["anatomy"], tuple(f["patterns"]))
        for f in raw["findings"]
    }
    for f in findings.values():
        if f.anatomy not in anatomies:
            raise ValueError(f"taxonomy: finding {f.name!r} has unknown anatomy {f.anatomy!r}")
    normals = tuple(
        NormalStatement(re.compile(r"\b" + n["pattern"] + r"\b"), tuple(n["findings"]))
        for n in raw.get("normal_statements", [])
    )
    cond = tuple(raw.get("conditioning_anatomies", []))
    for c in cond:
        if c not in anatomies:
            raise ValueError(f"taxonomy: conditioning anatomy {c!r} is not an anatomy")
    return Taxonomy(
        anatomies=anatomies,
        findings=findings,
        normal_statements=normals,
        conditioning_anatomies=cond,
        _children={k: tuple(v) for k, v in children.items()},
    )
