"""``medrag index verify``: is every byte of an index what the build wrote, and if not, heal it.

What is checked: the published version against its ``checksums.json`` (full SHA-256), every
encoded segment of the build state against its ``.sha256`` sidecar and its zip structure, and
staging folders left by killed builds. With ``repair``: staging leftovers are collected, damaged
segments quarantined, and — when anything was damaged — the index is rebuilt from the build's
own record (the published manifest and configuration), which re-encodes only the quarantined
studies and publishes a fresh, verified version. A damaged published version with intact
segments costs no encoding at all.

Why a command and not only checks at open: readers refuse a damaged version (the server answers
503 naming the file), but a hospital admin needs to know *before* a reader trips over it, from a
cron job, and to heal it without a full re-encode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from indexer.segments import QUARANTINE, SegmentStore
from retrieval.index import parse_uri
from retrieval.index.versions import collect_staging, current_version, stale_staging, verify_version


@dataclass
class VerifyReport:
    uri: str
    version: str | None = None
    version_problems: list[str] = field(default_factory=list)
    segments: int = 0
    damaged_segments: list[str] = field(default_factory=list)  # "name: why"
    quarantined_before: int = 0  # segments already in quarantine/ from earlier builds
    staging_leftovers: list[str] = field(default_factory=list)
    repaired: bool = False
    new_version: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.version_problems or self.damaged_segments or self.staging_leftovers)


def verify_index(uri: str, repair: bool = False, work_dir: str | Path | None = None) -> VerifyReport:
    """Inspect the index; with ``repair``, inspect under the writer lock (no build changes the
    segments meanwhile) and heal what that one pass found."""
    from indexer.build import rebuild_locked, state_dir_for, writer_state

    if not repair:
        return _inspect(uri, Path(work_dir) if work_dir else state_dir_for(uri))[0]
    with writer_state(uri, work_dir) as locked:
        rep, damaged = _inspect(uri, locked)
        if rep.ok:
            return rep
        loc = parse_uri(uri)
        if loc.path is not None:
            collect_staging(loc.path)
        for store, f, why in damaged:
            store.quarantine(f, why)
        if rep.version_problems or damaged:
            rep.new_version = rebuild_locked(uri, locked).version
        rep.repaired = True
    return rep


def _inspect(uri: str, state: Path) -> tuple[VerifyReport, list[tuple[SegmentStore, Path, str]]]:
    """The report, and each damaged segment with its store and reason (read once, whole)."""
    rep = VerifyReport(uri=uri)
    loc = parse_uri(uri)
    if loc.path is not None:
        try:
            path = current_version(loc.path)
            rep.version = path.name
            rep.version_problems = verify_version(path, mode="strict")
        except Exception as exc:  # noqa: BLE001 - any unreadable state is a finding, not a crash
            rep.version_problems = [str(exc)]
        rep.staging_leftovers = [p.name for p in stale_staging(loc.path)]
    damaged = []
    for d in sorted((state / "segments").glob("*")):
        if not d.is_dir():
            continue
        store = SegmentStore(d, collect=False)
        rep.quarantined_before += len(list((store.root / QUARANTINE).glob("*.npz")))
        for f in store.files():
            rep.segments += 1
            why = store.check(f)
            if why:
                damaged.append((store, f, why))
                rep.damaged_segments.append(f"{f.name}: {why}")
    return rep, damaged


def format_report(rep: VerifyReport) -> str:
    lines = [f"index {rep.uri}: version {rep.version or '-'}"]
    lines += [f"  version: {p}" for p in rep.version_problems] or ["  version: checksums match"]
    lines.append(f"  segments: {rep.segments} checked, {len(rep.damaged_segments)} damaged"
                 + (f", {rep.quarantined_before} already in quarantine" if rep.quarantined_before else ""))
    lines += [f"    damaged {d}" for d in rep.damaged_segments]
    if rep.staging_leftovers:
        lines.append(f"  staging leftovers of killed builds: {', '.join(rep.staging_leftovers)}")
    if rep.repaired:
        lines.append("  repaired: leftovers collected, damaged segments quarantined"
                     + (f", re-encoded and published as {rep.new_version}" if rep.new_version else ""))
    lines.append("OK" if rep.ok else ("REPAIRED" if rep.repaired else "DAMAGED (run with --repair)"))
    return "\n".join(lines)
