"""``medrag index verify``: is every byte of an index what the build wrote, and if not, heal it.

What is checked: the published version against its ``checksums.json`` (full SHA-256), every
encoded segment of the build state against its ``.sha256`` sidecar and its zip structure, and
staging folders left by killed builds. With ``repair``: staging leftovers are collected, damaged
segments quarantined, and — when anything was damaged — the index is rebuilt from the build's
own record (the published manifest and configuration), which re-encodes only the quarantined
studies and publishes a fresh, verified version. A damaged published version with intact
segments costs no encoding at all.

Identifying text (issue 23): the published payloads (report text, patient ids, image fields), the
encoded segments, the index's metadata and any build record or manifest left inside the index
folder are scanned with the de-identification rules themselves (:mod:`indexer.deid`): what they
would still replace, a patient id that is no pseudonym, or a source path is reported by place and
kind, never by its text. ``--repair`` rebuilds from the build's record, which de-identifies every
study again and moves an old build record to the private state.

Why a command and not only checks at open: readers refuse a damaged version (the server answers
503 naming the file), but a hospital admin needs to know *before* a reader trips over it, from a
cron job, and to heal it without a full re-encode.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    identifying: list[str] = field(default_factory=list)  # "where: what kind" (never the text itself)

    @property
    def ok(self) -> bool:
        return not (self.version_problems or self.damaged_segments or self.staging_leftovers or self.identifying)


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
        if rep.version_problems or damaged or rep.identifying:
            rep.new_version = rebuild_locked(uri, locked).version
        if rep.identifying and loc.path is not None:  # the version before, kept for readers, holds it too
            _drop_older_versions(loc.path)
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
            else:
                seg = SegmentStore.read(f)
                for i, p in enumerate(seg.payloads):
                    _scan_payload(p, f"segment {f.name} point {i}", rep.identifying)
                for msgs in seg.skipped.values():
                    for m in msgs:
                        _scan_skip_message(m, f"segment {f.name} skip message", rep.identifying)
    _scan_published(uri, loc.path, state, rep)
    if len(rep.identifying) > MAX_FINDINGS:
        more = len(rep.identifying) - MAX_FINDINGS
        rep.identifying = rep.identifying[:MAX_FINDINGS] + [f"... and {more} more"]
    return rep, damaged


MAX_FINDINGS = 200


def _policy() -> Any:
    from indexer.phi import DEFAULT_KEY, PhiPolicy
    from retrieval.settings import env

    return PhiPolicy((env().phi_key or DEFAULT_KEY).encode())


# what medrag itself writes and the rules would read as a long id: image references, pseudonyms
_OWN_IDS = re.compile(r"(?<![\w-])(?:img-)?[0-9a-f]{16,20}(?![\w-])")


@functools.lru_cache(maxsize=4096)  # a study's points share one report: scan it once
def _kinds(text: str) -> frozenset[str]:
    from indexer.deid import deidentify_text

    return frozenset(r.kind for r in deidentify_text(_OWN_IDS.sub("[ID]", text), None, _policy()).redactions)


def _scan_text(text: str | None, where: str, out: list[str], ignore: tuple[str, ...] = ()) -> None:
    """What the de-identification rules would still replace in ``text``, by kind (medrag's own
    opaque references and pseudonyms aside)."""
    if not text:
        return
    kinds = sorted(_kinds(text) - set(ignore))
    if kinds:
        out.append(f"{where}: {', '.join(kinds)}")


_PATH = re.compile(r"[\w.-]+[/\\][\w.-]+|[\w-]+\.(?:png|jpe?g|dcm|dicom|tiff?|bmp)(?![\w])", re.IGNORECASE)


def _scan_skip_message(message: str, where: str, out: list[str]) -> None:
    """A skip message names its image by reference; a build before issue 23 wrote the path. Its
    numbers (pixel counts, byte sizes) are not ids."""
    if _PATH.search(_OWN_IDS.sub("[ID]", message)):
        out.append(f"{where}: names a source path")
    _scan_text(message, where, out, ignore=("id", "date", "url", "accession"))


def _scan_payload(p: Any, where: str, out: list[str]) -> None:
    from indexer.deid import is_pseudonym
    from indexer.phi import is_image_ref
    from retrieval.records import Payload

    p = Payload.of(p)
    where = f"{where} (study {p.study_id})"
    if p.patient_id and not is_pseudonym(p.patient_id):
        out.append(f"{where}: patient id is not a pseudonym")
    if p.image and not is_image_ref(p.image):
        out.append(f"{where}: image is a source path, not an opaque reference")
    _scan_text(p.report, f"{where} report", out)


def _scan_published(uri: str, folder: Path | None, state: Path, rep: VerifyReport) -> None:
    """The served payloads and metadata; for a local index, build records and manifests left in
    its folder (an index built before issue 23 kept ``published.jsonl`` in ``.build``)."""
    from retrieval.index import open_index

    if folder is not None and folder.is_dir():
        for f in sorted(folder.rglob("*.jsonl")):
            if _is_study_record(f):
                rep.identifying.append(f"{f.relative_to(folder)}: studies with source paths or report text inside "
                                       "the index folder (move it to the private state: --repair)")
        record = state / "published.json"
        if record.is_file() and "manifest" in json.loads(record.read_text() or "{}"):
            rep.identifying.append(f"{record.name}: names the manifest's source path (--repair moves it)")
        for older in _older_versions(folder):
            payloads = older / "payloads.jsonl"
            if payloads.is_file():
                with open(payloads, "rb") as fh:
                    for i, line in enumerate(fh):
                        _scan_payload(json.loads(line), f"older version {older.name} point {i}", rep.identifying)
    if rep.version_problems:
        return  # nothing trustworthy to read
    try:
        ix = open_index(uri)
    except Exception:  # noqa: BLE001 - an unreadable index is reported by the checks above
        return
    try:
        # a folder path, read as words: only the kinds a path can be judged by (pytest's and
        # export folders' "name0", "2019" and hashes are not ids to flag)
        root = getattr(ix.meta, "image_root", None)
        _scan_text(re.sub(r"[/\\_.]+", " ", root) if root else None, "index metadata image_root",
                   rep.identifying, ignore=("id", "url", "date", "accession"))
        n = len(ix)
        for start in range(0, n, 512):
            ids = list(range(start, min(n, start + 512)))
            for i, p in zip(ids, ix.payloads(ids), strict=True):
                _scan_payload(p, f"point {i}", rep.identifying)
    finally:
        ix.close()


def _older_versions(folder: Path) -> list[Path]:
    """Published versions but the current one (the one before is kept for readers in flight)."""
    from retrieval.index.versions import published_version

    current = published_version(folder)
    return sorted(p for p in (folder / "versions").glob("v*") if p.is_dir() and p.name != current)


def _drop_older_versions(folder: Path) -> None:
    import shutil

    for old in _older_versions(folder):
        shutil.rmtree(old, ignore_errors=True)


def _is_study_record(path: Path) -> bool:
    """Whether ``path`` holds manifest lines (studies with their image paths): a build record, or
    a manifest written into the index folder. A FAISS version's ``payloads.jsonl`` is what the
    payload scan reads."""
    if path.name in ("published.jsonl", "pending.jsonl"):
        return True
    if path.name == "payloads.jsonl":
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        line = json.loads(first) if first.strip() else {}
    except (OSError, ValueError):
        return False
    return isinstance(line, dict) and "study_id" in line and "images" in line


def format_report(rep: VerifyReport) -> str:
    lines = [f"index {rep.uri}: version {rep.version or '-'}"]
    lines += [f"  version: {p}" for p in rep.version_problems] or ["  version: checksums match"]
    lines.append(f"  segments: {rep.segments} checked, {len(rep.damaged_segments)} damaged"
                 + (f", {rep.quarantined_before} already in quarantine" if rep.quarantined_before else ""))
    lines += [f"    damaged {d}" for d in rep.damaged_segments]
    if rep.staging_leftovers:
        lines.append(f"  staging leftovers of killed builds: {', '.join(rep.staging_leftovers)}")
    lines.append(f"  identifying text: {len(rep.identifying)} finding(s)" if rep.identifying
                 else "  identifying text: none found")
    lines += [f"    {d}" for d in rep.identifying]
    if rep.repaired:
        lines.append("  repaired: leftovers collected, damaged segments quarantined"
                     + (f", re-encoded and published as {rep.new_version}" if rep.new_version else ""))
    lines.append("OK" if rep.ok else ("REPAIRED" if rep.repaired else
                                      "IDENTIFYING TEXT (run with --repair to rebuild it de-identified)"
                                      if rep.identifying and not (rep.version_problems or rep.damaged_segments
                                                                  or rep.staging_leftovers)
                                      else "DAMAGED (run with --repair)"))
    return "\n".join(lines)
