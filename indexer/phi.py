"""The PHI guard: what of a DICOM header may reach a manifest, an index, a log or a response.

DICOM PS3.15 Annex E (Basic Application Level Confidentiality Profile) lists the attributes
that identify a patient. medrag keeps none of them as they are:

* identifiers (PatientID, StudyInstanceUID, AccessionNumber, ...) become keyed pseudonyms,
  HMAC-SHA256 with ``MEDRAG_PHI_KEY`` - stable, so a patient's studies still group, and not
  reversible without the key;
* dates are shifted by a per-patient offset derived from the same key (the profile's
  "Retain Longitudinal Temporal Information with Modified Dates" option): intervals between a
  patient's studies survive, the calendar dates do not;
* everything else in the profile (names, birth date, addresses, institution, physicians,
  descriptions, free-text comments, ...) is dropped: :func:`deidentify` returns an allow-list.

Images flagged ``BurnedInAnnotation = YES`` may carry names in the pixels; they are skipped
unless the caller allows them explicitly.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.settings import env

log = logging.getLogger(__name__)
DEFAULT_KEY = "medrag-default-key-set-MEDRAG_PHI_KEY"
MAX_SHIFT_DAYS = 365

# PS3.15 Table E.1-1, Basic Profile attributes (keywords); medrag reads few of them, and keeps none raw.
BASIC_PROFILE = frozenset("""
AccessionNumber AcquisitionComments AcquisitionDate AcquisitionDateTime AcquisitionDeviceProcessingDescription
AcquisitionTime AdditionalPatientHistory AdmissionID AdmittingDiagnosesDescription Allergies Arbitrary
AuthorObserverSequence BranchOfService CommentsOnThePerformedProcedureStep ConsultingPhysicianName ContentDate
ContentTime ContrastBolusAgent CountryOfResidence CurrentPatientLocation CurveDate CurveTime DerivationDescription
DetectorID DeviceSerialNumber DeviceUID DischargeDiagnosisDescription EthnicGroup FrameOfReferenceUID
GantryID GeneratorID ImageComments InstanceCreationDate InstanceCreationTime InstitutionAddress
InstitutionalDepartmentName InstitutionName IssuerOfPatientID MedicalAlerts MedicalRecordLocator MilitaryRank
NameOfPhysiciansReadingStudy Occupation OperatorsName OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
OverlayDate OverlayTime PatientAddress PatientAge PatientBirthDate PatientBirthName PatientBirthTime
PatientComments PatientID PatientInsurancePlanCodeSequence PatientMotherBirthName PatientName
PatientReligiousPreference PatientSex PatientSexNeutered PatientSize PatientState PatientTelephoneNumbers
PatientWeight PerformedLocation PerformedProcedureStepDescription PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime PerformingPhysicianName PhysiciansOfRecord
PregnancyStatus ProtocolName ReferencedPatientSequence ReferencedSOPInstanceUID ReferringPhysicianAddress
ReferringPhysicianName ReferringPhysicianTelephoneNumbers RequestAttributesSequence RequestingPhysician
RequestingService ResultsInterpretationAuthor SeriesDate SeriesDescription SeriesInstanceUID SeriesTime
SmokingStatus SOPInstanceUID SpecialNeeds StationName StudyDate StudyDescription StudyID StudyInstanceUID
StudyTime TextComments TextString TimezoneOffsetFromUTC UID
""".split())

# What a manifest may hold, and in what form.
PSEUDONYMISED = {"PatientID": "patient", "StudyInstanceUID": "study", "SeriesInstanceUID": "series",
                 "SOPInstanceUID": "instance", "AccessionNumber": "accession"}
SHIFTED_DATES = ("StudyDate",)
CLINICAL = ("Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation", "Rows", "Columns",
            "NumberOfFrames", "InstanceNumber")


@dataclass(frozen=True)
class PhiPolicy:
    key: bytes
    allow_burned_in: bool = False

    @classmethod
    def from_env(cls, allow_burned_in: bool = False) -> PhiPolicy:
        raw = env().phi_key
        if raw is None:
            log.warning("MEDRAG_PHI_KEY is not set: pseudonyms use a public default key")
        return cls((raw or DEFAULT_KEY).encode(), allow_burned_in)

    def pseudonym(self, value: str, kind: str) -> str:
        """Keyed, stable, non-reversible id (``kind`` keeps namespaces apart)."""
        return hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:20]

    def date_shift(self, patient: str) -> int:
        digest = hmac.new(self.key, f"date-shift:{patient}".encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big") % (2 * MAX_SHIFT_DAYS + 1) - MAX_SHIFT_DAYS

    def shift_date(self, value: str | None, patient: str) -> str | None:
        """DICOM DA (YYYYMMDD) -> shifted ISO date; None for missing or malformed values."""
        if not value or len(value) != 8 or not value.isdigit():
            return None
        try:
            d = dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
        except ValueError:
            return None
        return (d + dt.timedelta(days=self.date_shift(patient))).isoformat()


def burned_in(header: dict[str, Any]) -> bool:
    return str(header.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def deidentify(header: dict[str, Any], policy: PhiPolicy) -> dict[str, Any]:
    """An allow-list copy of ``header``: pseudonymised ids, shifted dates, clinical attributes."""
    patient = str(header.get("PatientID") or "")
    out: dict[str, Any] = {}
    for attr, kind in PSEUDONYMISED.items():
        if header.get(attr):
            out[attr] = policy.pseudonym(str(header[attr]), kind)
    for attr in SHIFTED_DATES:
        shifted = policy.shift_date(str(header.get(attr) or ""), patient)
        if shifted:
            out[attr] = shifted
    for attr in CLINICAL:
        if header.get(attr) not in (None, ""):
            out[attr] = header[attr]
    return out


# ---- image references: paths never leave the build ---------------------------------------------
# A DICOM export path names the patient ("export/MRN-8675300_Smith_John/img.dcm"). Payloads,
# segments, `medrag search` output and API answers carry only a keyed, opaque reference; the
# reference -> path map is recomputed from the build's private state (``published.jsonl`` in
# :func:`indexer.build.private_dir_for`, outside the index folder, which holds the absolute paths
# for incremental builds anyway) by the readers that must open the file: the server's thumbnails
# and attention maps, the CLI heat-maps. Indexes built before issue 23 kept it in ``<index>/.build``;
# that is still read until their next publish moves it.
IMAGE_REF_PREFIX = "img-"


@functools.lru_cache(maxsize=4)
def _ref_policy(key: str | None) -> PhiPolicy:
    return PhiPolicy((key or DEFAULT_KEY).encode())


def image_ref(path: str, key: str | None = None) -> str:
    """Opaque, stable reference of the image at absolute ``path`` (HMAC with ``MEDRAG_PHI_KEY``)."""
    policy = _ref_policy(key if key is not None else env().phi_key)
    return IMAGE_REF_PREFIX + policy.pseudonym(path, "image")


def is_image_ref(ref: str) -> bool:
    return ref.startswith(IMAGE_REF_PREFIX) and "/" not in ref and "\\" not in ref


def image_paths(state: Path, key: str | None = None) -> dict[str, str]:
    """reference -> absolute path of every image of the published version recorded in the folder
    ``state`` (the private state, :func:`indexer.build.private_dir_for`; empty when nothing was
    published there). Private to the build and the server: never returned to a client, never
    logged."""
    from indexer.manifest import read_manifest

    published = state / "published.jsonl"
    if not published.exists():
        return {}
    return {image_ref(p, key): p for s in read_manifest(published) for p in s.images}


_maps: dict[str, tuple[float, dict[str, str]]] = {}
_maps_lock = threading.Lock()


def stored_image_path(ref: str, uri: str, image_root: str | None, state: Path | None = None) -> Path:
    """The file behind a payload's ``image``: an opaque reference is looked up in the build's
    private map (``state``, by default the private state of ``uri`` or, for an index built before
    issue 23, its ``.build`` folder; reread when a new version is published); an older index's
    relative path goes through the guarded resolver.

    Raises:
        ImagePathError: unknown reference, or a path leaving ``image_root``.
    """
    from retrieval.imaging.paths import ImagePathError, resolve_image

    if not is_image_ref(ref):
        return resolve_image(ref, image_root)
    if state is None:
        from indexer.build import private_dir_for, state_dir_for

        state = private_dir_for(uri)
        if not (state / "published.jsonl").exists() and (state_dir_for(uri) / "published.jsonl").exists():
            state = state_dir_for(uri)
    published = state / "published.jsonl"
    stamp = published.stat().st_mtime if published.exists() else -1.0
    with _maps_lock:
        cached = _maps.get(str(state))
        if cached is None or cached[0] != stamp:
            cached = (stamp, image_paths(state))
            _maps[str(state)] = cached
    path = cached[1].get(ref)
    if path is None:
        raise ImagePathError("image reference not in this build's image map")
    return Path(path)
