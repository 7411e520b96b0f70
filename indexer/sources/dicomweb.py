"""A PACS over DICOMweb: QIDO-RS lists studies, WADO-RS fetches their instances.

Incremental: a state file in the cache folder remembers what was fetched; the next run asks only
for what is new, either by study date (QIDO ``StudyDate=<since>-``, any DICOMweb server) or by
Orthanc's change log (``/changes?since=<seq>``, exact even for late-arriving studies; a study is taken once Orthanc reports it stable). The
manifest written each time lists every study fetched so far, so ``medrag index build`` (which
encodes only studies it has not encoded yet) turns it into an incremental index update.

Instances are cached as ``<cache>/<study pseudonym>/<instance pseudonym>.dcm``: names come from
keyed hashes, never from server-supplied strings, so a hostile UID cannot traverse paths, and
UIDs are checked against the DICOM UID grammar before they go into a URL. Headers then pass the
PHI guard like any DICOM folder (:mod:`indexer.phi`). The cache holds the original objects (it
is a PACS cache inside the hospital); the manifest and the index hold no identifiers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from indexer.dicom import DicomDecodeError, read_header
from indexer.manifest import atomic_write_bytes, relative_to_manifest
from indexer.phi import PhiPolicy, burned_in
from indexer.sources import SourceResult
from indexer.sources.dicom_folder import _representatives, read_reports_csv, study_from_headers

log = logging.getLogger(__name__)
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_STUDY_BYTES = 2 * 1024**3
STATE = "dicomweb_state.json"


class DicomWebError(RuntimeError):
    """The server could not be queried (message names the URL and the reason)."""


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(UID.match(uid))


@dataclass
class _State:
    changes_seq: int = 0
    last_query_date: str | None = None
    studies: dict[str, list[str]] = field(default_factory=dict)  # pseudonymised uid -> cached files


class DicomWebClient:
    def __init__(self, base_url: str, timeout: float = 60.0, auth: tuple[str, str] | None = None) -> None:
        import httpx

        self.base = base_url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, auth=auth, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, url: str, accept: str, **params: Any):
        import httpx

        try:
            r = self.http.get(url, params=params or None, headers={"Accept": accept})
        except httpx.HTTPError as exc:
            raise DicomWebError(f"{url}: {type(exc).__name__}") from exc
        if r.status_code != 200:
            raise DicomWebError(f"{url}: HTTP {r.status_code}")
        return r

    def studies(self, since: str | None = None, page: int = 500) -> list[str]:
        """QIDO-RS: StudyInstanceUIDs, optionally of studies dated on or after ``since`` (YYYY-MM-DD)."""
        uids: list[str] = []
        offset = 0
        while True:
            params: dict[str, Any] = {"limit": page, "offset": offset, "includefield": "0020000D"}
            if since:
                params["StudyDate"] = since.replace("-", "") + "-"
            rows = self._get(f"{self.base}/studies", "application/dicom+json", **params).json() or []
            for row in rows:
                uid = ((row.get("0020000D") or {}).get("Value") or [""])[0]
                if valid_uid(str(uid)):
                    uids.append(str(uid))
                else:
                    log.warning("QIDO returned an invalid StudyInstanceUID; ignored")
            if len(rows) < page:
                return uids
            offset += page

    def instances(self, study_uid: str, max_bytes: int = MAX_STUDY_BYTES) -> list[bytes]:
        """WADO-RS: every instance of a study, as Part 10 bytes."""
        if not valid_uid(study_uid):
            raise DicomWebError("refusing an invalid StudyInstanceUID")
        url = f"{self.base}/studies/{study_uid}"
        with self.http.stream("GET", url, headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
            if r.status_code != 200:
                raise DicomWebError(f"{url}: HTTP {r.status_code}")
            ctype = r.headers.get("content-type", "")
            body = bytearray()
            for chunk in r.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise DicomWebError(f"{url}: study larger than {max_bytes} bytes")
        return split_multipart(bytes(body), ctype)


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise DicomWebError(f"WADO-RS answer is not multipart ({content_type[:60]!r})")
    delim = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def orthanc_changed_studies(orthanc_url: str, since_seq: int, timeout: float = 60.0) -> tuple[list[str], int]:
    """StudyInstanceUIDs of studies new or changed in Orthanc's change log after ``since_seq``."""
    import httpx

    base = orthanc_url.rstrip("/")
    ids: list[str] = []
    seq = since_seq
    with httpx.Client(timeout=timeout) as http:
        while True:
            r = http.get(f"{base}/changes", params={"since": seq, "limit": 1000})
            if r.status_code != 200:
                raise DicomWebError(f"{base}/changes: HTTP {r.status_code}")
            doc = r.json()
            for ch in doc.get("Changes", []):
                # a study is taken once Orthanc calls it stable (no new instance for StableAge
                # seconds): never half-received, and again if instances arrive later
                if ch.get("ResourceType") == "Study" and ch.get("ChangeType") == "StableStudy":
                    ids.append(str(ch["ID"]))
            seq = int(doc.get("Last", seq))
            if doc.get("Done", True):
                break
        uids = []
        for oid in dict.fromkeys(ids):
            r = http.get(f"{base}/studies/{oid}")
            if r.status_code == 200:
                uid = str((r.json().get("MainDicomTags") or {}).get("StudyInstanceUID", ""))
                if valid_uid(uid):
                    uids.append(uid)
    return uids, seq


def from_dicomweb(base_url: str, cache: str | Path, manifest_path: str | Path, since: str | None = None,
                  orthanc_url: str | None = None, reports_csv: str | Path | None = None,
                  allow_burned_in: bool = False, auth: tuple[str, str] | None = None) -> SourceResult:
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    policy = PhiPolicy.from_env(allow_burned_in)
    state = _load_state(cache)
    out = SourceResult()
    client = DicomWebClient(base_url, auth=auth)
    try:
        if orthanc_url:
            uids, seq = orthanc_changed_studies(orthanc_url, state.changes_seq)
        else:
            uids, seq = client.studies(since or state.last_query_date), state.changes_seq
        for uid in uids:
            key = policy.pseudonym(uid, "study")
            if key in state.studies and not orthanc_url:
                continue  # by date we cannot tell a changed study; Orthanc's log can
            out.fetched += 1
            try:
                blobs = client.instances(uid)
            except DicomWebError as exc:
                out.skipped.append(f"study {key}: {exc}")
                continue
            folder = cache / key
            folder.mkdir(exist_ok=True)
            files: list[str] = []
            for blob in blobs:
                try:
                    head = read_header(blob)
                except DicomDecodeError as exc:
                    out.skipped.append(f"study {key}: an instance is not readable DICOM ({exc})")
                    continue
                sop = str(head.get("SOPInstanceUID") or "")
                name = policy.pseudonym(sop or str(len(files)), "instance") + ".dcm"
                atomic_write_bytes(folder / name, blob)
                files.append(name)
            state.studies[key] = sorted(set(state.studies.get(key, [])) | set(files))
        state.changes_seq = seq
        if not orthanc_url:
            import datetime as dt

            state.last_query_date = dt.date.today().isoformat()
    finally:
        client.close()
    _save_state(cache, state)
    reports = read_reports_csv(reports_csv)
    for key, files in sorted(state.studies.items()):
        members = []
        for name in files:
            path = cache / key / name
            try:
                head = read_header(path)
            except DicomDecodeError as exc:
                out.skipped.append(str(exc))
                continue
            if burned_in(head) and not policy.allow_burned_in:
                out.skipped.append(f"study {key}: an image is flagged BurnedInAnnotation=YES; skipped")
                continue
            members.append((path, head))
        if not members:
            continue
        chosen = _representatives(members)
        first = chosen[0][1]
        report = reports.get(str(first.get("StudyInstanceUID"))) or reports.get(str(first.get("AccessionNumber", "")))
        out.studies.append(study_from_headers([(relative_to_manifest(manifest_path, p), h) for p, h in chosen],
                                              report, policy))
    return out


def _load_state(cache: Path) -> _State:
    p = cache / STATE
    if not p.is_file():
        return _State()
    raw = json.loads(p.read_text())
    return _State(int(raw.get("changes_seq", 0)), raw.get("last_query_date"), dict(raw.get("studies", {})))


def _save_state(cache: Path, state: _State) -> None:
    atomic_write_bytes(cache / STATE, json.dumps({"changes_seq": state.changes_seq, "last_query_date": state.last_query_date,
                                             "studies": state.studies}, indent=1).encode())
