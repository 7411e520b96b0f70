"""De-identification of free report text: context rules, no models, no name lists.

Why this pass exists: :mod:`indexer.phi` guards DICOM *headers*, but a report's text is indexed
too, comes back in search results and is pasted into *other* patients' drafts. A report that
says "Patient: John Smith, MRN 8675309" must not carry that line anywhere.

Why rules and not a library:

* pydicom's ``deid`` recipes (and :mod:`indexer.phi`) act on header attributes, not on prose;
* Presidio and scrubadub find names with spaCy/NLTK models that must be downloaded, and this
  project installs no downloaded NLP models;
* a first/last-name dictionary would fail on the names that are words ("Hope", "Grant", "Bell")
  and would over-redact eponyms; so names are found by *context* only: a label ("Patient:"), a
  title ("Dr."), a signature or a hand-off verb ("signed by", "discussed with") or a trailing
  credential (", MD"). A name with no such cue ("John Smith tolerated the procedure") is missed;
  ``eval/deid.py`` reports that row separately.

What it does: names, MRNs, accession numbers, phone/fax/pager numbers, e-mail addresses, street
addresses, SSNs, URLs and other long identifiers become placeholders (``[NAME]``, ``[MRN]``, ...).
Dates are shifted by the same per-patient offset as the header dates
(:meth:`PhiPolicy.date_shift`, through :meth:`PhiPolicy.shift_date` itself), so intervals between
a patient's studies survive in the text as in the headers. A shifted date is written
``[DATE YYYY-MM-DD]``: the bracket marks it as already shifted, which keeps the pass idempotent (a
bare ISO date in the input is shifted; a marked one is not shifted twice). Without a patient,
or for a date that cannot be shifted (no year, impossible day), the text gets ``[DATE]``.

Every pattern is anchored at a word start and uses bounded repetition, so the pass is linear in
the text's length (no catastrophic backtracking on a 100 000-character run-on report).
"""

from __future__ import annotations

import bisect
import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec

from indexer.phi import PhiPolicy
from retrieval.records import Study

KINDS = ("name", "institution", "mrn", "accession", "phone", "email", "address", "ssn", "date", "url", "id")
# a placeholder this pass writes; never matched again (idempotence)
PLACEHOLDER_RE = re.compile(
    r"\[(?:NAME|INSTITUTION|MRN|ACCESSION|PHONE|EMAIL|ADDRESS|SSN|URL|ID|DATE(?: \d{4}-\d{2}-\d{2})?)\]")
# when two detectors claim the same span, the more specific kind names it
_RANK = {k: i for i, k in enumerate(("ssn", "mrn", "accession", "email", "url", "phone", "date",
                                     "address", "institution", "name", "id"))}


@dataclass(frozen=True)
class Redaction:
    """One replaced span of the *input* text (no copy of the text: redactions may be logged)."""

    start: int
    end: int
    kind: str


@dataclass(frozen=True)
class DeidResult:
    text: str
    redactions: tuple[Redaction, ...]


@dataclass(frozen=True)
class _Candidate:
    start: int
    end: int
    kind: str
    replacement: str


@dataclass(frozen=True)
class _Context:
    patient_id: str | None
    policy: PhiPolicy

    def shifted(self, date: object) -> str:
        """The header path's own shift (:meth:`PhiPolicy.shift_date`), so text and header agree."""
        if not isinstance(date, dt.date) or not self.patient_id:
            return "[DATE]"
        iso = self.policy.shift_date(f"{date.year:04d}{date.month:02d}{date.day:02d}", self.patient_id)
        return shifted_marker(iso) if iso else "[DATE]"


def placeholder(kind: str) -> str:
    return f"[{kind.upper()}]"


def shifted_marker(iso: str) -> str:
    """How a shifted date is written (``[DATE 2020-11-02]``)."""
    return f"[DATE {iso}]"


# ---- names ---------------------------------------------------------------------------------------
_UP, _LO = "A-ZÀ-ÖØ-Þ", "a-zß-öø-ÿ"
_WORD = rf"(?:[{_UP}]['’])?[{_UP}][{_LO}]+(?:[{_UP}][{_LO}]+)?"  # Smith, O'Brien, McDonald
_CAPS = rf"[{_UP}](?:['’]?[{_UP}])+"  # SMITH, O'BRIEN
_TOKEN = re.compile(
    rf"(?P<initial>[{_UP}]\.)"
    rf"|(?P<word>{_WORD}(?:-{_WORD})*)(?![\w])"
    rf"|(?P<caps>{_CAPS}(?:-{_CAPS})*)(?![\w])")
_PARTICLES = r"(?:van|von|de|der|den|del|della|di|da|du|la|le|ter|ten|bin|ibn|al|el)"
_SEP = re.compile(rf"(?P<comma>,)?\s{{1,3}}(?:{_PARTICLES}\s{{1,3}}){{0,2}}")
_AND = re.compile(r",?\s{1,3}(?:and|&)\s{1,3}")
_TITLES = r"Dr|Mr|Mrs|Ms|Mx|Miss|Prof|Professor|Doctor|Nurse|Sister|Rev"
_TITLE = re.compile(rf"(?:(?P<cs>{_TITLES})\.?|(?P<caps>DR|MR|MRS|MS|PROF)\.)\s{{1,3}}")
_TITLE_CUE = re.compile(rf"(?<![\w.])(?:(?:{_TITLES})\.?|(?:DR|MR|MRS|MS|PROF)\.)(?=\s)")
# words that follow a cue but are not names: roles, services, report words, credentials
_HARD_STOP = frozenset("""
a an the this that these those his her their our my your its he she they we it who whom which
and or of for with to at on in by via from per as is was were be been has had have not no yes
today tonight yesterday tomorrow morning evening night am pm noon midnight
monday tuesday wednesday thursday friday saturday sunday
patient patients pt family husband wife son daughter mother father parent caregiver guardian
result results finding findings impression comparison technique history indication indications
exam examination report reports conclusion procedure addendum note notes study studies chest
view views frontal lateral pa ap ct cta mri mr xr us pet nm cr dx bone abdomen pelvis head neck
spine brain portable upright supine final preliminary wet read signed electronically dictated
unknown none male female man woman boy girl infant child adult
md m.d do d.o rn np pa-c phd mbbs frcr frcpc facr dnp crna jr sr ii iii iv
mrn dob ssn acc id age sex
denies denied reports reported states stated presents presented complains complained underwent
returns returned arrived admits admitted describes described tolerated remains appears
""".split())
# roles and services: not a name after a cue ("discussed with the house officer"), but a surname
# after a first name ("Dr. Gregory House") unless a role word follows ("Dr. Smith Emergency Department")
_SOFT_STOP = frozenset("""
physician physicians doctor doctors nurse nurses nursing resident residents fellow fellows
attending attendings radiologist radiologists radiology surgeon surgeons surgery surgical
clinician clinicians provider providers team teams service services staff technologist tech
techs technician sonographer consultant consult consulting referring ordering covering primary
care pcp house officer hospitalist intensivist anesthesia anesthesiologist midwife therapist
pharmacist paramedic dispatcher coordinator assistant practitioner
emergency department dept er ed icu ccu nicu picu micu sicu or pacu floor unit clinic office
hospital medicine cardiology oncology pulmonology pulmonary orthopedics orthopaedics neurology
neurosurgery pediatrics urology trauma stroke code rapid response charge on-call call oncall
telephone phone pager voicemail verbal verbally telephonically person critical urgent
general memorial medical center centre institute imaging
""".split())
_STOP = _HARD_STOP | _SOFT_STOP
_SIGNATURE_CUE = (r"dictated|transcribed|(?:electronically\s{1,3})?signed|read|reviewed|interpreted"
                  r"|verified|approved|authenticated|attested|finalized|prepared")
_PHRASE_CUE = re.compile(
    r"(?i)(?<![\w-])(?:(?P<sig>(?:" + _SIGNATURE_CUE + r")\s{1,3}by)"
    r"|discussed\s{1,3}(?:with|by)|d/w|spoke\s{1,3}(?:with|to)|spoken\s{1,3}(?:with|to)"
    r"|talked\s{1,3}(?:with|to)|notified|called|paged|texted|contacted|informed"
    r"|(?:reported|communicated|conveyed|relayed|given|read\s{1,3}back)\s{1,3}to|reviewed\s{1,3}with"
    r"|(?:seen|referred|ordered|requested)\s{1,3}by"
    r"|(?:referring|attending|ordering|dictating)\s{1,3}(?:physician|radiologist|provider|clinician))"
    r"(?![\w])(?:\s{0,3}:)?")
_LABEL_CUE = re.compile(
    r"(?i)(?<![\w-])(?P<label>patient(?:'s)?(?:\s{1,3}(?:full\s{1,3}|legal\s{1,3})?name)?"
    r"|pt\.?(?:\s{1,3}name)?|(?:full\s{1,3}|legal\s{1,3}|last\s{1,3}|first\s{1,3})?name"
    r"|(?:attending|referring|ordering|requesting|consulting|dictating|reading)"
    r"(?:\s{1,3}(?:physician|radiologist|provider|doctor|clinician|md|dr))?"
    r"|radiologist|resident|fellow|technologist|sonographer|tech|physician|provider|clinician"
    r"|consultant|pcp|cc|guardian|contact|next\s{1,3}of\s{1,3}kin|emergency\s{1,3}contact)\s{0,3}:")
_CREDENTIAL_CUE = re.compile(
    rf"(?<![\w'’.-])(?P<seq>(?:{_WORD}(?:-{_WORD})*|{_CAPS}|[{_UP}]\.)"
    rf"(?:\s{{1,3}}(?:{_WORD}(?:-{_WORD})*|{_CAPS}|[{_UP}]\.)){{0,2}})"
    r",?\s{1,3}(?:MD|M\.D\.|DO|D\.O\.|RN|NP|PA-C|PhD|MBBS|FRCR|FRCPC|FACR|DNP|CRNA)(?![\w])")
_NAME_LABEL_OK_BEFORE = frozenset({"patient", "patient's", "pt", "pt.", "full", "legal", "last", "first"})


def _is_name_token(m: re.Match[str], allow_caps: bool) -> bool:
    if m.lastgroup == "initial":
        return True
    tok = m.group()
    if tok.lower() in _STOP or tok.lower().rstrip(".") in _STOP:
        return False
    if m.lastgroup == "caps":
        return allow_caps and set(tok) != {"X"}  # "XXXX": the IU data set's own redaction
    return True


def _next_token(text: str, m: re.Match[str]) -> re.Match[str] | None:
    nxt = _TOKEN.match(text, _skip_ws(text, m.end()))
    return nxt if nxt and nxt.start() > m.end() else None


def _is_surname_after_first(text: str, m: re.Match[str], allow_caps: bool) -> bool:
    """A role word after a first name or a title is a surname ("Dr. Gregory House", "Dr. House"),
    unless another role word follows it ("Dr. Smith Emergency Department")."""
    if not (m.lastgroup == "word" or (allow_caps and m.lastgroup == "caps")) or m.group().lower() not in _SOFT_STOP:
        return False
    nxt = _next_token(text, m)
    return not (nxt and nxt.group().lower() in _STOP)


_DETERMINERS = frozenset("a an the this that these those his her their our my your its".split())


def _is_given_name_word(text: str, m: re.Match[str]) -> bool:
    """A capitalised function word right after a cue, before a name, is a given name ("discussed
    with Per Bell"): mid-sentence, "per" is written in lower case."""
    tok = m.group()
    if m.lastgroup != "word" or tok.lower() not in _HARD_STOP or tok.lower() in _DETERMINERS:
        return False
    nxt = _next_token(text, m)
    return bool(nxt and nxt.lastgroup == "word" and _is_name_token(nxt, False))


def _scan_name(text: str, pos: int, allow_caps: bool) -> tuple[int, int] | None:
    """The 1-3 name tokens at ``pos`` (after an optional title), as a span; None if none."""
    t = _TITLE.match(text, pos)
    if t:
        pos, allow_caps = t.end(), allow_caps or bool(t.group("caps"))
    start = end = -1
    for count in range(3):
        m = _TOKEN.match(text, pos)
        if not m or not (_is_name_token(m, allow_caps)
                         or ((count or t) and _is_surname_after_first(text, m, allow_caps))
                         or (not count and _is_given_name_word(text, m))):
            break
        start, end = (m.start() if start < 0 else start), m.end()
        sep = _SEP.match(text, end)
        if not sep or (sep.group("comma") and count):  # a comma only in "Smith, John"
            break
        pos = sep.end()
    return (start, end) if start >= 0 else None


def _names_from(text: str, pos: int, allow_caps: bool) -> Iterator[tuple[int, int]]:
    """The name at ``pos`` and any joined to it by "and" ("Dr. Hope and Dr. Bell")."""
    for _ in range(4):
        span = _scan_name(text, pos, allow_caps)
        if span is None:
            return
        yield span
        joined = _AND.match(text, span[1])
        if not joined:
            return
        pos = joined.end()


def _skip_ws(text: str, pos: int) -> int:
    end = min(len(text), pos + 3)
    while pos < end and text[pos].isspace():
        pos += 1
    return pos


def _label_allowed(text: str, m: re.Match[str]) -> bool:
    """A bare "Name:" labels a patient, "Exam name:" or "Procedure name:" does not."""
    label = m.group("label").lower()
    if not label.endswith("name") or label.startswith(("patient", "pt")):
        return True
    before = text[max(0, m.start() - 30):m.start()].split()
    return not before or not before[-1].isalpha() or before[-1].lower() in _NAME_LABEL_OK_BEFORE


# a patient named without a colon: "Report for patient Jane Doe", "the patient, John Smith,";
# a capitalised "Patient" (a heading: "Patient Positioning") counts only before two name tokens
_PATIENT_CUE = re.compile(
    r"(?<![\w-])(?:(?P<lower>patient|pt\.?)|(?P<cap>Patient|PATIENT|Pt\.?))"
    r"(?:(?:'s)?\s{1,3}(?:named|name\s{1,3}is|is\s{1,3}named)|,)?\s{1,3}"
    r"|(?<![\w-])(?P<named>named|name\s{1,3}is|(?:his|her|their)\s{1,3}name\s{1,3}is)\s{1,3}")


def _patient_names(text: str) -> Iterator[_Candidate]:
    for m in _PATIENT_CUE.finditer(text):
        for s, e in _names_from(text, m.end(), allow_caps=False):
            if m.group("cap") and len(_TOKEN.findall(text, s, e)) < 2:
                break
            yield _Candidate(s, e, "name", "[NAME]")


def _names(text: str, ctx: _Context) -> Iterator[_Candidate]:
    yield from _patient_names(text)
    for m in _LABEL_CUE.finditer(text):
        if _label_allowed(text, m):
            for s, e in _names_from(text, _skip_ws(text, m.end()), allow_caps=True):
                yield _Candidate(s, e, "name", "[NAME]")
    for m in _PHRASE_CUE.finditer(text):
        for s, e in _names_from(text, _skip_ws(text, m.end()), allow_caps=bool(m.group("sig"))):
            yield _Candidate(s, e, "name", "[NAME]")
    for m in _TITLE_CUE.finditer(text):
        for s, e in _names_from(text, m.start(), allow_caps=False):
            yield _Candidate(s, e, "name", "[NAME]")
    for m in _CREDENTIAL_CUE.finditer(text):
        span = _trailing_names(text, m.start("seq"), m.end("seq"))
        if span:
            yield _Candidate(span[0], span[1], "name", "[NAME]")


def _trailing_names(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The name tokens just before a credential: the run of non-stop tokens ending at ``end``."""
    toks = [m for m in _TOKEN.finditer(text, start, end)]
    keep: list[re.Match[str]] = []
    for m in reversed(toks):
        if not _is_name_token(m, allow_caps=True):
            break
        keep.append(m)
    return (keep[-1].start(), keep[0].end()) if keep else None


# ---- institutions: "Springfield General Hospital", "St. Mary's Medical Center", "Mayo Clinic" ----
_INST_KINDS = (r"Hospital|Clinic|Infirmary|Hospice|Sanatorium|Polyclinic|Medical\s{1,3}Cent(?:er|re)"
               r"|Health\s{1,3}(?:Cent(?:er|re)|System|Sciences\s{1,3}Cent(?:er|re))"
               r"|(?:Imaging|Cancer|Surgery|Surgical|Rehabilitation|Trauma|Heart|Diagnostic)\s{1,3}Cent(?:er|re)"
               r"|Cancer\s{1,3}Institute|Nursing\s{1,3}Home|Medical\s{1,3}Group|Radiology\s{1,3}Associates")
_INST_WORD = rf"(?:(?:St|Mt|Ft)\.|[{_UP}][\w'’&.-]{{0,30}})"
_INST_JOIN = r"(?:\s{1,3}(?:of|the|and|&|for|at|de|del|la)){0,2}\s{1,3}"
_INSTITUTION = re.compile(
    rf"(?<![\w'’.-])(?P<pre>{_INST_WORD}(?:{_INST_JOIN}{_INST_WORD}){{0,5}})\s{{1,3}}"
    rf"(?P<kind>(?i:{_INST_KINDS}))(?![\w])"
    rf"(?P<post>\s{{1,3}}of(?:\s{{1,3}}the)?\s{{1,3}}{_INST_WORD}(?:{_INST_JOIN}{_INST_WORD}){{0,3}})?"
    rf"|(?<![\w'’.-])(?P<lead>Hospital|Clinic|Infirmary|HOSPITAL|CLINIC)\s{{1,3}}of(?:\s{{1,3}}the)?\s{{1,3}}"
    rf"{_INST_WORD}(?:{_INST_JOIN}{_INST_WORD}){{0,3}}")
# words before the kind that do not name the place ("seen at Outside Hospital", "Comparison: ...")
_INST_LEAD_SKIP = _HARD_STOP | frozenset("""outside prior referring receiving transferring local our this
that at from to seen transferred admitted discharged imaged performed obtained done comparison""".split())
_INST_GENERIC = frozenset("""general memorial community regional university county state medical
children's childrens saint st. mount mt. veterans affairs va city district national teaching main
academic private public rural""".split())


def _institutions(text: str, ctx: _Context) -> Iterator[_Candidate]:
    for m in _INSTITUTION.finditer(text):
        if m.group("lead"):
            yield _Candidate(m.start(), m.end(), "institution", "[INSTITUTION]")
            continue
        words = list(re.finditer(r"\S+", m.group("pre")))
        while words and words[0].group().lower().rstrip(",:;") in _INST_LEAD_SKIP:
            words.pop(0)
        distinctive = [w for w in words if w.group().lower() not in _INST_GENERIC
                       and w.group().lower() not in _INST_LEAD_SKIP]
        if not distinctive and not m.group("post"):
            continue  # "General Hospital", "Outside Hospital": no place named
        start = m.start("pre") + words[0].start() if words else m.start("kind")
        yield _Candidate(start, m.end(), "institution", "[INSTITUTION]")


# ---- numbers with labels: MRN, accession, SSN, other ids ------------------------------------------
_VALUE = r"(?P<v>(?=[A-Za-z0-9-]{0,40}\d)[A-Za-z0-9][A-Za-z0-9-]{2,})(?![\w])"
_NO = r"(?:\s{0,3}(?:#|no\.?|num\.?|number))?"
_JOIN = r"\s{0,3}[:#-]?\s{0,3}(?:#\s{0,2})?(?:(?:is|of)\s{1,3})?"
_MRN = re.compile(
    r"(?i)(?<![\w])(?:mrn|mr\s{0,2}(?:#|no\.?|number)|med(?:ical)?\.?\s{1,3}rec(?:ord)?\.?" + _NO
    + r"|(?:patient|pt\.?)\s{1,3}(?:id|identifier)|chart" + _NO + r"|hospital\s{0,3}(?:#|no\.?|number)"
    + r"|unit\s{1,3}(?:#|no\.?|number))" + _JOIN + _VALUE)
_ACCESSION = re.compile(r"(?i)(?<![\w])(?:accession|acc)\.?" + _NO + _JOIN + _VALUE)
_OTHER_ID = re.compile(
    r"(?i)(?<![\w])(?:(?:encounter|visit|account|acct|order|requisition|study|exam|case|fin|csn"
    r"|insurance|member|policy|claim|serial|device|license|licence|npi|dea|plan)\.?"
    r"\s{0,3}(?:#|id|no\.?|num\.?|number)|id|npi|dea)" + _JOIN + _VALUE)
_SSN_LABEL = re.compile(
    r"(?i)(?<![\w])(?:ssn|ss#|social\s{1,3}security" + _NO + r")" + _JOIN
    + r"(?P<v>\d{3}[ -]?\d{2}[ -]?\d{4})(?![\w])")
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
# no label: a token with six digits in a row, or a dotted UID
_LONG_ID = re.compile(r"(?<![\w.-])(?=[A-Za-z0-9-]{0,40}\d{6})[A-Za-z0-9-]+(?![\w]|\.\d)")
_UID = re.compile(r"(?<![\w.])\d{1,10}(?:\.\d{1,10}){4,64}(?![\w]|\.\d)")


def _labelled(pattern: re.Pattern[str], kind: str) -> Callable[[str, _Context], Iterator[_Candidate]]:
    def find(text: str, ctx: _Context) -> Iterator[_Candidate]:
        for m in pattern.finditer(text):
            yield _Candidate(m.start("v"), m.end("v"), kind, placeholder(kind))
    return find


def _plain(pattern: re.Pattern[str], kind: str) -> Callable[[str, _Context], Iterator[_Candidate]]:
    def find(text: str, ctx: _Context) -> Iterator[_Candidate]:
        for m in pattern.finditer(text):
            yield _Candidate(m.start(), m.end(), kind, placeholder(kind))
    return find


# ---- phone, e-mail, URL -----------------------------------------------------------------------
_EXT = r"(?:\s{0,2}(?:x|ext\.?|extension)\s{0,2}\d{1,5})?"
_PHONE = re.compile(
    r"(?<![\w+(])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s{0,2}|\d{3}[\s.-])\d{3}[\s.-]\d{4}" + _EXT + r"(?![\w])"
    r"|(?<![\w-])\d{3}-\d{4}" + _EXT + r"(?![\w-])")
_PHONE_LABEL = re.compile(
    r"(?i)(?<![\w])(?:pager|pgr|beeper|ext\.?|extension|phone|tel\.?|telephone|fax|cell|mobile"
    r"|callback|call\s{1,3}back)\s{0,3}(?:#|no\.?|number)?\s{0,3}[:#]?\s{0,3}(?:at\s{1,3})?"
    r"(?P<v>\+?\(?\d(?:[\s.()-]{0,2}\d){3,14})(?![\w])")
_EMAIL = re.compile(r"(?<![\w.+'’-])[\w.+'’-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}(?![\w])")
_URL = re.compile(r"(?i)(?<![\w@/])(?:(?:https?|ftp)://|www\.)[^\s<>\"'\[\]]{1,2000}")
_DOMAIN = re.compile(
    r"(?i)(?<![\w@.-])(?:[a-z0-9-]{1,63}\.){1,5}(?:com|org|net|edu|gov|mil|io|health)"
    r"(?:/[^\s<>\"'\[\]]{0,2000})?(?![\w-])")


def _urls(text: str, ctx: _Context) -> Iterator[_Candidate]:
    for pattern in (_URL, _DOMAIN):
        for m in pattern.finditer(text):
            end = m.end()
            while end > m.start() and text[end - 1] in ".,;:!?)'\"":  # sentence punctuation
                end -= 1
            yield _Candidate(m.start(), end, "url", "[URL]")


# ---- addresses --------------------------------------------------------------------------------
_SUFFIX = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl"
           r"|Terrace|Ter|Parkway|Pkwy|Circle|Cir|Highway|Hwy|Square|Sq|Trail|Trl|Row|Alley|Plaza"
           r"|Crescent|Close|Loop|Path|Pike|Ridge|Heights|Hts|Broadway|Crossing|Xing|Walk|Run|Bend|Pass|Commons"
           r"|Glen|Grove|Hollow|Landing|Meadows|Gardens|Knoll|Creek|Expressway|Expy|Freeway|Fwy|Turnpike"
           r"|Tpke)\.?")
_STREET_WORD = rf"(?:{_WORD}|\d{{1,3}}(?:st|nd|rd|th)|[NSEW]\.?)"
_ADDRESS = re.compile(
    rf"(?<![\w.])(?P<core>\d{{1,6}}(?:-?[A-Z])?\s{{1,3}}(?:{_STREET_WORD}\s{{1,3}}){{0,3}}{_SUFFIX}(?![\w])"
    r"(?:,?\s{1,3}(?:Apt|Apartment|Suite|Ste|Unit|Rm|Room|Fl|Floor|#)\.?\s{0,3}#?\s{0,2}[A-Za-z0-9-]{1,6})?)"
    rf"(?:,\s{{0,3}}(?P<city>{_WORD}(?:[ -]{_WORD}){{0,2}}))?"
    r"(?:(?:,\s{0,3}|\s{1,3})(?P<state>[A-Z]{2})(?![\w]))?"
    r"(?:,?\s{1,3}(?P<zip>\d{5}(?:-\d{4})?)(?![\w-]))?")
_PO_BOX = re.compile(r"(?i)(?<![\w])P\.?\s?O\.?\s{0,2}Box\s{0,3}#?\s{0,2}\d{1,8}(?![\w])")


def _addresses(text: str, ctx: _Context) -> Iterator[_Candidate]:
    for m in _ADDRESS.finditer(text):
        yield _Candidate(m.start(), _address_end(m), "address", "[ADDRESS]")
    for m in _PO_BOX.finditer(text):
        yield _Candidate(m.start(), m.end(), "address", "[ADDRESS]")


def _address_end(m: re.Match[str]) -> int:
    """A "city" that is a report word ("..., Impression") ends the address before it."""
    city = m.group("city")
    if city and any(w.lower() in _STOP for w in re.split(r"[ -]", city)):
        return m.end("core")
    return m.end()


# ---- dates ------------------------------------------------------------------------------------
_MONTH_NAMES = ("january february march april may june july august september october november "
                "december jan feb mar apr jun jul aug sep sept oct nov dec").split()
_MONTH_NUMBER = {n: i + 1 for i, n in enumerate(_MONTH_NAMES[:12])} | {
    "jan": 1, "feb": 2, "mar": 3, "apr": 4, "jun": 6, "jul": 7, "aug": 8, "sep": 9, "sept": 9,
    "oct": 10, "nov": 11, "dec": 12}
_MON = "(?P<mon>" + "|".join(f"{n.capitalize()}|{n.upper()}" for n in
                             sorted(_MONTH_NAMES, key=len, reverse=True)) + r")\.?"
_ORD = r"(?:st|nd|rd|th)?"
_NUMERIC_MDY = re.compile(
    r"(?<![\w/.-])(?P<m>\d{1,2})(?P<sep>[/-])(?P<d>\d{1,2})(?P=sep)(?P<y>\d{4}|\d{2})(?![\w/]|[.-]\d)")
_NUMERIC_YMD = re.compile(
    r"(?<![\w/.-])(?P<y>\d{4})(?P<sep>[-/.])(?P<m>\d{1,2})(?P=sep)(?P<d>\d{1,2})(?![\w/]|[.-]\d)")
_MONTH_D_Y = re.compile(rf"(?<![\w])(?:{_MON})\s{{0,3}}(?P<d>\d{{1,2}}){_ORD}(?:\s{{0,3}},\s{{0,3}}|\s{{1,3}})"
                        r"(?P<y>\d{4})(?![\w])")
_D_MONTH_Y = re.compile(rf"(?<![\w/.-])(?P<d>\d{{1,2}}){_ORD}(?:\s{{1,3}}|-)(?:of\s{{1,3}})?(?:{_MON})"
                        r"(?:,?\s{1,3}|-)(?P<y>\d{4}|\d{2})(?![\w])")
_MONTH_D = re.compile(rf"(?<![\w])(?:{_MON})\s{{1,3}}(?P<d>\d{{1,2}}){_ORD}"
                      r"(?![\w]|[.,:/-]\d|\s{0,2}(?:mm|cm|mg|ml|%))")
_MONTH_Y = re.compile(rf"(?<![\w])(?:{_MON}),?\s{{1,3}}(?P<y>(?:18|19|20|21)\d{{2}})(?![\w])")
_MM_YYYY = re.compile(r"(?<![\w/.-])(?P<m>0?[1-9]|1[0-2])/(?P<y>(?:19|20)\d{2})(?![\w/]|[.-]\d)")
_NOT_A_DATE = object()


def _year(raw: str) -> int:
    """Two-digit years: the most recent past century (``"24"`` -> 2024, ``"50"`` -> 1950)."""
    y = int(raw)
    if len(raw) == 4:
        return y
    return 2000 + y if y <= dt.date.today().year % 100 else 1900 + y


def _month(m: re.Match[str]) -> int:
    return int(m.group("m")) if "mon" not in m.groupdict() else _MONTH_NUMBER[m.group("mon").lower()]


def _date_of(m: re.Match[str]) -> dt.date | object | None:
    """The calendar date of a match; None if it cannot be parsed, _NOT_A_DATE if it is no date."""
    month, day = _month(m), int(m.group("d"))
    groups = m.groupdict()
    if groups.get("sep") == "-" and len(m.group("y")) == 2:
        return _NOT_A_DATE  # "3-4-21": a range of levels as likely as a date
    if "mon" not in groups and month > 12:
        if day > 12:
            return _NOT_A_DATE
        month, day = day, month  # 14/03/2021, day first
    year = _year(m.group("y"))
    if not 1800 <= year <= 2199:
        return _NOT_A_DATE
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _dates(text: str, ctx: _Context) -> Iterator[_Candidate]:
    for pattern in (_NUMERIC_MDY, _NUMERIC_YMD, _MONTH_D_Y, _D_MONTH_Y):
        for m in pattern.finditer(text):
            date = _date_of(m)
            if date is not _NOT_A_DATE:
                yield _Candidate(m.start(), m.end(), "date", ctx.shifted(date))
    for pattern in (_MONTH_D, _MONTH_Y, _MM_YYYY):  # no day or no year: nothing to shift
        for m in pattern.finditer(text):
            yield _Candidate(m.start(), m.end(), "date", "[DATE]")


# ---- the pass ---------------------------------------------------------------------------------
_DETECTORS: tuple[Callable[[str, _Context], Iterator[_Candidate]], ...] = (
    _labelled(_SSN_LABEL, "ssn"), _plain(_SSN, "ssn"), _labelled(_MRN, "mrn"),
    _labelled(_ACCESSION, "accession"), _plain(_EMAIL, "email"), _urls,
    _plain(_PHONE, "phone"), _labelled(_PHONE_LABEL, "phone"), _dates, _addresses, _institutions, _names,
    _labelled(_OTHER_ID, "id"), _plain(_LONG_ID, "id"), _plain(_UID, "id"),
)


def _merge(cands: list[_Candidate], protected: list[tuple[int, int]]) -> list[_Candidate]:
    """Overlapping candidates become one span (the union: what any rule found is removed), named
    by its longest member; a candidate touching a placeholder is dropped (idempotence)."""
    keep = sorted((c for c in cands if not _overlaps(c, protected)), key=lambda c: (c.start, -c.end))
    out: list[_Candidate] = []
    group: list[_Candidate] = []
    group_end = -1
    for c in keep:
        if group and c.start >= group_end:
            out.append(_union(group, group_end))
            group = []
        group.append(c)
        group_end = max(group_end, c.end) if len(group) > 1 else c.end
    if group:
        out.append(_union(group, group_end))
    return out


def _union(group: list[_Candidate], end: int) -> _Candidate:
    start = group[0].start
    best = min(group, key=lambda g: (-(g.end - g.start), _RANK[g.kind]))
    if (best.start, best.end) == (start, end):
        return best
    return _Candidate(start, end, best.kind, placeholder(best.kind))


def _overlaps(c: _Candidate, spans: list[tuple[int, int]]) -> bool:
    """Whether ``c`` touches one of the sorted, disjoint ``spans`` (binary search: linear pass)."""
    i = bisect.bisect_left(spans, (c.end, -1))  # spans starting before c ends
    return i > 0 and spans[i - 1][1] > c.start


def deidentify_text(text: str, patient_id: str | None, policy: PhiPolicy) -> DeidResult:
    """``text`` with PHI replaced; dates shifted by ``policy.date_shift(patient_id)``.

    ``patient_id`` is the raw DICOM PatientID, the same value :func:`indexer.phi.deidentify`
    shifts the header's StudyDate with; None replaces every date with ``[DATE]``.
    Redaction spans refer to ``text``.
    """
    ctx = _Context(patient_id, policy)
    protected = [m.span() for m in PLACEHOLDER_RE.finditer(text)]
    cands = [c for detect in _DETECTORS for c in detect(text, ctx) if c.end > c.start]
    chosen = _merge(cands, protected)
    parts: list[str] = []
    pos = 0
    for c in chosen:
        parts += [text[pos:c.start], c.replacement]
        pos = c.end
    parts.append(text[pos:])
    return DeidResult("".join(parts), tuple(Redaction(c.start, c.end, c.kind) for c in chosen))


# ---- the study: one policy for every source -----------------------------------------------------
_PSEUDONYM = re.compile(r"[0-9a-f]{20}")


def is_pseudonym(value: str) -> bool:
    """Whether ``value`` has the form of :meth:`PhiPolicy.pseudonym` (20 lower-case hex digits)."""
    return bool(_PSEUDONYM.fullmatch(value))


def patient_pseudonym(value: str, policy: PhiPolicy | None = None) -> str:
    """The stored form of a patient id a user typed (``--exclude-patient MRN-8675309``): its keyed
    pseudonym, or the value itself when it already is one (copied from an answer). Without a
    policy, the environment's key (no warning per request: the server warned at start)."""
    value = value.strip()
    if is_pseudonym(value):
        return value
    if policy is None:
        from indexer.phi import DEFAULT_KEY
        from retrieval.settings import env

        policy = PhiPolicy((env().phi_key or DEFAULT_KEY).encode())
    return policy.pseudonym(value, "patient")


def deidentify_study(study: Study, policy: PhiPolicy) -> Study:
    """The one de-identification policy of every source (folder CSV, R2Gen, labels and notes CSVs,
    hand-written manifests; the DICOM sources apply the same rules to headers and mark their
    studies): the patient id becomes the keyed pseudonym the DICOM path uses
    (``policy.pseudonym(id, "patient")``), the study date moves by the patient's one offset
    (:meth:`PhiPolicy.date_shift`) and so do the dates in the report text, whose other PHI becomes
    placeholders. A study without a patient id is its own patient (offset keyed by its study id),
    so its metadata and text dates still agree. Idempotent: a marked study is returned as it is.
    """
    if study.deidentified:
        return study
    raw = (study.patient_id or "").strip() or None
    anchor = raw or f"study:{study.study_id}"
    date = policy.shift_date(study.study_date.replace("-", ""), anchor) if study.study_date else None
    report = deidentify_text(study.report, anchor, policy).text if study.report else study.report
    return msgspec.structs.replace(study, patient_id=policy.pseudonym(raw, "patient") if raw else None,
                                   study_date=date, report=report, deidentified=True)
