"""A PACS over DICOMweb: QIDO-RS lists studies and their instances, WADO-RS fetches each instance.

The protocol work (query strings, multipart decoding, transfer-syntax negotiation, retries of
429/503 answers) is ``dicomweb-client``'s; this module adds what medrag needs around it: one
``requests`` session carrying the credentials for every call (QIDO, WADO and Orthanc's change
log alike), UID checks, errors that name the server and the HTTP status but no identifier, and a
cache written instance by instance: a study is never held in memory whole, only the instance
being written, and an instance already cached is not fetched again.

Incremental: a state file in the cache folder remembers what was fetched; the next run asks only
for what is new, either by study date (QIDO ``StudyDate=<since>-``, any DICOMweb server) or by
Orthanc's change log (``/changes?since=<seq>``, exact even for late-arriving studies; a study is
taken once Orthanc reports it stable). The manifest written each time lists every study fetched
so far, so ``medrag index build`` (which encodes only studies it has not encoded yet) turns it
into an incremental index update.

Instances are cached as ``<cache>/<study pseudonym>/<instance pseudonym>.dcm``, each written
atomically: names come from keyed hashes, never from server-supplied strings, so a hostile UID
cannot traverse paths, and UIDs are checked against the DICOM UID grammar before they go into a
URL. Headers then pass the PHI guard like any DICOM folder (:mod:`indexer.phi`). The cache holds
the original objects (it is a PACS cache inside the hospital; WADO-RS is asked for the stored
transfer syntax); the manifest and the index hold no identifiers.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from indexer.manifest import relative_to_manifest
from indexer.phi import PhiPolicy, burned_in
from indexer.sources import SourceResult
from indexer.sources.dicom_folder import _representatives, read_reports_csv, study_from_headers
from retrieval.imaging.dicom import DicomDecodeError, read_header
from retrieval.storage import atomic_write_bytes

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")  # Orthanc's resource ids (SHA-1 in 5 groups)
MAX_STUDY_BYTES = 2 * 1024**3  # disk guard: fetching a study stops once its cached instances exceed this
QIDO_PAGE = 500
RETRY_ATTEMPTS = 3  # per request, for 408/429/503/504 answers and connection errors
RETRY_WAIT_MS = 250  # exponential back-off multiplier: waits 0.5 s, then 1 s
STATE = "dicomweb_state.json"
TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID = "0020000D", "0020000E", "00080018"


class DicomWebError(RuntimeError):
    """The server could not be queried (message names the URL and the reason)."""


def valid_uid(uid: str) -> bool:
    return len(uid) <= 64 and bool(UID.match(uid))


@dataclass
class _State:
    changes_seq: int = 0
    last_query_date: str | None = None
    studies: dict[str, list[str]] = field(default_factory=dict)  # pseudonymised uid -> cached files


def make_session(auth: tuple[str, str] | None = None) -> requests.Session:
    """The one HTTP session for a sync: basic auth when given, redirects refused.

    Redirects are refused (as before the move to ``requests``): a PACS answer that points
    elsewhere is an error to look at, not a place to send the hospital's credentials.
    """
    import requests

    session = requests.Session()
    if auth is not None:
        session.auth = requests.auth.HTTPBasicAuth(*auth)
    session.max_redirects = 0
    return session


@contextmanager
def _errors(where: str) -> Iterator[None]:
    """``requests`` / ``dicomweb-client`` failures -> :class:`DicomWebError` naming ``where``.

    ``where`` is the server's base URL and the transaction, never a UID: messages end up in the
    build's skip list and logs.
    """
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "error"
        raise DicomWebError(f"{where}: HTTP {code}") from exc
    except requests.TooManyRedirects as exc:
        raise DicomWebError(f"{where}: the server answered with a redirect (not followed)") from exc
    except requests.RequestException as exc:
        raise DicomWebError(f"{where}: {type(exc).__name__}") from exc
    except ValueError as exc:  # malformed multipart or JSON, a UID dicomweb-client rejects
        raise DicomWebError(f"{where}: malformed answer ({type(exc).__name__})") from exc


def _first(row: dict[str, Any], tag: str) -> str:
    return str(((row.get(tag) or {}).get("Value") or [""])[0])


class DicomWebClient:
    """QIDO-RS and WADO-RS through ``dicomweb_client.DICOMwebClient`` on one session.

    Args:
        base_url: the DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        timeout: seconds per request (connect and read).
        auth: ``(user, password)`` for HTTP basic auth, or None.
        session: an existing session to share (its auth is used as is; not closed here).
    """

    def __init__(self, base_url: str, timeout: float = 60.0, auth: tuple[str, str] | None = None,
                 session: requests.Session | None = None) -> None:
        from dicomweb_client import DICOMwebClient

        self.base = base_url.rstrip("/")
        self._own_session = session is None
        self.session = session if session is not None else make_session(auth)
        try:
            self.dw = DICOMwebClient(self.base, session=self.session, timeout=timeout)
        except ValueError as exc:
            raise DicomWebError(f"{self.base}: not a DICOMweb URL ({exc})") from exc
        self.dw.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS,
                                      wait_exponential_multiplier=RETRY_WAIT_MS)

    def close(self) -> None:
        if self._own_session:
            self.session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def studies(self, since: str | None = None, page: int = QIDO_PAGE) -> list[str]:
        """QIDO-RS: StudyInstanceUIDs, optionally of studies dated on or after ``since`` (YYYY-MM-DD)."""
        filters = {"StudyDate": since.replace("-", "") + "-"} if since else None
        with _errors(f"{self.base}/studies"):
            rows = self.dw.search_for_studies(limit=page, fields=["StudyInstanceUID"], search_filters=filters,
                                              get_remaining=True)
        uids: list[str] = []
        for row in rows:
            uid = _first(row, TAG_STUDY_UID)
            if valid_uid(uid):
                uids.append(uid)
            else:
                log.warning("QIDO returned an invalid StudyInstanceUID; ignored")
        return list(dict.fromkeys(uids))

    def instance_refs(self, study_uid: str, page: int = QIDO_PAGE) -> list[tuple[str, str]]:
        """QIDO-RS: ``(SeriesInstanceUID, SOPInstanceUID)`` of every instance of a study.

        Rows with a UID outside the DICOM grammar are dropped (and logged without the UID).
        """
        if not valid_uid(study_uid):
            raise DicomWebError("refusing an invalid StudyInstanceUID")
        with _errors(f"{self.base}/studies/…/instances"):
            rows = self.dw.search_for_instances(study_instance_uid=study_uid, limit=page,
                                                fields=["SeriesInstanceUID", "SOPInstanceUID"], get_remaining=True)
        refs: list[tuple[str, str]] = []
        for row in rows:
            series, sop = _first(row, TAG_SERIES_UID), _first(row, TAG_SOP_UID)
            if valid_uid(series) and valid_uid(sop):
                refs.append((series, sop))
            else:
                log.warning("QIDO returned an instance with an invalid Series/SOP Instance UID; ignored")
        return list(dict.fromkeys(refs))

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """WADO-RS: one instance in its stored transfer syntax, as DICOM Part 10 bytes.

        Only this instance is in memory (dicomweb-client reads it, pydicom writes it back as a
        Part 10 file with its original transfer syntax and pixel data).

        Raises:
            DicomWebError: the server did not deliver it.
            DicomDecodeError: what it delivered is not readable DICOM.
        """
        import pydicom

        if not (valid_uid(study_uid) and valid_uid(series_uid) and valid_uid(sop_uid)):
            raise DicomWebError("refusing an invalid UID")
        where = f"{self.base}/studies/…/instances/…"
        try:
            with _errors(where):
                ds = self.dw.retrieve_instance(study_uid, series_uid, sop_uid)  # ("application/dicom", "*")
        except DicomWebError:
            raise
        except Exception as exc:  # pydicom could not parse the part
            raise DicomDecodeError(f"{where}: not readable DICOM ({type(exc).__name__})") from exc
        buf = io.BytesIO()
        try:
            pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        except Exception as exc:  # a dataset pydicom read but cannot write back
            raise DicomWebError(f"{where}: instance cannot be stored ({type(exc).__name__})") from exc
        return buf.getvalue()


def orthanc_changed_studies(orthanc_url: str, since_seq: int, timeout: float = 60.0,
                            session: requests.Session | None = None) -> tuple[list[str], int]:
    """StudyInstanceUIDs of studies new or changed in Orthanc's change log after ``since_seq``.

    ``session`` is the DICOMweb client's (so a PACS behind basic auth answers here too); without
    one a plain session is opened for the call.

    Raises:
        DicomWebError: the change log or a study in it cannot be read (the sequence number is then
            not advanced by the caller, so nothing is lost: a study answering 404 was deleted since
            the change and is left out).
    """
    import requests

    base = orthanc_url.rstrip("/")
    http = session if session is not None else make_session()
    ids: list[str] = []
    seq = since_seq
    try:
        while True:
            with _errors(f"{base}/changes"):
                r = http.get(f"{base}/changes", params={"since": seq, "limit": 1000}, timeout=timeout)
                r.raise_for_status()
                doc = r.json()
            for ch in doc.get("Changes", []):
                # a study is taken once Orthanc calls it stable (no new instance for StableAge
                # seconds): never half-received, and again if instances arrive later
                if ch.get("ResourceType") == "Study" and ch.get("ChangeType") == "StableStudy":
                    oid = str(ch.get("ID", ""))
                    if ORTHANC_ID.match(oid):
                        ids.append(oid)
                    else:
                        log.warning("Orthanc's change log names an invalid study id; ignored")
            seq = int(doc.get("Last", seq))
            if doc.get("Done", True):
                break
        uids = []
        for oid in dict.fromkeys(ids):
            with _errors(f"{base}/studies/…"):
                r = http.get(f"{base}/studies/{oid}", timeout=timeout)
                if r.status_code == requests.codes.not_found:
                    continue  # deleted since it was stable
                r.raise_for_status()
                uid = str((r.json().get("MainDicomTags") or {}).get("StudyInstanceUID", ""))
            if valid_uid(uid):
                uids.append(uid)
    finally:
        if session is None:
            http.close()
    return uids, seq


def from_dicomweb(base_url: str, cache: str | Path, manifest_path: str | Path, since: str | None = None,
                  orthanc_url: str | None = None, reports_csv: str | Path | None = None,
                  allow_burned_in: bool = False, auth: tuple[str, str] | None = None) -> SourceResult:
    """Fetch what is new on a DICOMweb server into ``cache`` and describe every cached study.

    Args:
        base_url: the DICOMweb root (QIDO-RS and WADO-RS).
        cache: folder for the instances and the sync state.
        manifest_path: where the manifest will be written (image paths are made relative to it).
        since: first study date (YYYY-MM-DD) of a by-date sync; default: the last sync's date.
        orthanc_url: Orthanc's REST root: sync by its change log instead of by date.
        reports_csv: reports by StudyInstanceUID or AccessionNumber.
        allow_burned_in: keep images flagged ``BurnedInAnnotation=YES``.
        auth: ``(user, password)`` for HTTP basic auth, used for DICOMweb and the change log.

    Returns:
        The studies of the whole cache; ``fetched`` counts the studies fetched in this run.

    Raises:
        DicomWebError: the server cannot be listed (the state is then left as it was).
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    policy = PhiPolicy.from_env(allow_burned_in)
    state = _load_state(cache)
    out = SourceResult()
    with DicomWebClient(base_url, auth=auth) as client:
        if orthanc_url:
            uids, seq = orthanc_changed_studies(orthanc_url, state.changes_seq, session=client.session)
        else:
            uids, seq = client.studies(since or state.last_query_date), state.changes_seq
        for uid in uids:
            key = policy.pseudonym(uid, "study")
            if key in state.studies and not orthanc_url:
                continue  # by date we cannot tell a changed study; Orthanc's log can
            out.fetched += 1
            files = _fetch_study(client, uid, cache / key, set(state.studies.get(key, [])), policy, out)
            if files is not None:
                state.studies[key] = files
        state.changes_seq = seq
        if not orthanc_url:
            import datetime as dt

            state.last_query_date = dt.date.today().isoformat()
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


def _fetch_study(client: DicomWebClient, uid: str, folder: Path, cached: set[str], policy: PhiPolicy,
                 out: SourceResult) -> list[str] | None:
    """Cache the instances of one study not cached yet, one at a time; the study's file names.

    An instance whose file (named by its SOP UID's pseudonym) is already in the cache is not
    fetched again, so a study that grew is topped up, not downloaded anew; files are written
    atomically, so one that exists is complete. ``MAX_STUDY_BYTES`` bounds the study on disk.
    Problems go to ``out.skipped`` under the study's pseudonym; None when the study could not be
    listed (its state is then left as it was).
    """
    key = folder.name

    def name_of(sop: str) -> str:
        return policy.pseudonym(sop, "instance") + ".dcm"

    try:
        refs = client.instance_refs(uid)
    except DicomWebError as exc:
        out.skipped.append(f"study {key}: {exc}")
        return None
    files = {n for n in cached if (folder / n).is_file()}
    size = sum((folder / n).stat().st_size for n in files)
    for series, sop in refs:
        name = name_of(sop)
        if (folder / name).is_file():  # written atomically, so complete: cached by a past run
            files.add(name)
            continue
        try:
            blob = client.instance(uid, series, sop)
            head = read_header(blob)
        except DicomWebError as exc:
            out.skipped.append(f"study {key}: an instance could not be fetched ({exc})")
            continue
        except DicomDecodeError as exc:
            out.skipped.append(f"study {key}: an instance is not readable DICOM ({exc})")
            continue
        if str(head.get("SOPInstanceUID") or "") != sop:
            out.skipped.append(f"study {key}: the server sent another instance than the one asked for")
            continue
        size += len(blob)
        if size > MAX_STUDY_BYTES:
            out.skipped.append(f"study {key}: study larger than {MAX_STUDY_BYTES} bytes; the rest not fetched")
            break
        folder.mkdir(exist_ok=True)
        atomic_write_bytes(folder / name, blob)
        files.add(name)
    return sorted(files)


def _load_state(cache: Path) -> _State:
    p = cache / STATE
    if not p.is_file():
        return _State()
    raw = json.loads(p.read_text())
    return _State(int(raw.get("changes_seq", 0)), raw.get("last_query_date"), dict(raw.get("studies", {})))


def _save_state(cache: Path, state: _State) -> None:
    atomic_write_bytes(cache / STATE, json.dumps({"changes_seq": state.changes_seq, "last_query_date": state.last_query_date,
                                             "studies": state.studies}, indent=1).encode())
