"""Recall and false positives of the report-text de-identification pass (:mod:`indexer.deid`).

Why planted PHI: no licensed report set with real identifiers may be used, and the IU X-ray
reports were de-identified by their publisher (their "XXXX" tokens, left as they are). So
synthetic PHI is planted into real report texts, in varied templates at random sentence
boundaries, and recall is measured per kind:

* a planted string counts as removed when *every* one of its tokens is gone from the output
  (placeholders aside); values are drawn so that no token of one also occurs elsewhere in the
  same report, which makes the check exact;
* a planted date counts when its original string is gone *and* the output carries the date
  shifted by the patient's header offset (``PhiPolicy.shift_date``), i.e. the shift is right.

Names are drawn from lists written here, which the detector never sees (it has no name list at
all), and include names that are English words ("Hope", "Grant", "Rose", "Young", "Bell").
Names with no context cue ("Ann Lee tolerated the procedure") are expected to be missed: they get
their own row, "name (no cue)", instead of being left out.

Issue 23 grew the set (1,000 reports by default, 2-3 inline sentences) and added rows: "Dr. First
Last" (one surname in three a role word: "Gregory House"), names after a lower-case patient cue
("Report for patient Jane Doe") and institutions ("Springfield General Hospital").

False positives: the *original* IU texts carry no PHI, so every character the pass changes in
them is a false positive; the run reports how many reports changed and what was changed.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.deid import PLACEHOLDER_RE, deidentify_text, shifted_marker
from indexer.phi import PhiPolicy

EVAL_KEY = b"medrag-deid-eval"  # a fixed key: the figures do not depend on MEDRAG_PHI_KEY
ROWS = ("name (cued)", "name (Dr. First Last)", "name (patient cue)", "name (no cue)", "institution",
        "mrn", "accession", "ssn", "phone", "email", "url", "address", "date", "id")

FIRST = """Hope Grant Rose Faith Grace Joy Will Mark June April May Summer Dawn Art Bill Sandy Rusty
Guy Frank Sue Olivia Liam Noah Emma Ava Mateo Sofia Aaliyah Priya Aisha Dmitri Siobhan José Zoë Bjørn
Kwame Mei Hiroshi Fatima Oluwaseun Ingrid Rahul Lucía Nadia Tomasz Chiamaka Elif Anders Marisol Yusuf
Beatriz Ciaran Leilani Ravi Astrid Desmond Imani Thandiwe Per Gregory Jane Harold Lisa""".split()
LAST = """Young Bell Rose Hope Page Ward King Wood Marsh Black Gray Hall Park Moss Frost Stone Banks
O'Brien O'Connor McAllister MacDonald DeLuca Nguyen Garcia Kowalski Okafor Patel Schmidt Rossi Haddad
Kim Lee Chen Ivanova Lindqvist Mbeki Fernández Abernathy Whitlock Castellano Oyelaran Sandoval Brennan
Dubois Yamamoto Hakimi Novak Petrov Quintero Ferreira Adeyemi Thorsen Villanueva Kaczmarek Delacroix
Achebe Montgomery Szabo Halloran Cross Hart Doe Chase Cuddy""".split()
# surnames that are role or service words ("Dr. Gregory House"): the rows that test them
ROLE_SURNAMES = ("House", "Nurse", "Fellows", "Surgeon", "Service", "Page", "Ward", "Marsh")
STREETS = """Maple Cedar Willow Lincoln Washington Sunset Hillcrest Lakeview Ridgewood Magnolia Orchard
Juniper Chestnut Birch Sycamore Harbor Meadow Prospect Highland Valley""".split()
STREET_SUFFIXES = ("Street", "St.", "Avenue", "Ave", "Road", "Rd.", "Lane", "Drive", "Court",
                   "Boulevard", "Way", "Place", "Terrace", "Crossing", "Walk")
CITIES = ("Springfield", "Riverside", "Fairview", "Madison", "Georgetown", "Clinton", "Salem", "Ashland",
          "Burlington", "Greenville", "Bristol", "Dover", "Oxford", "Franklin", "Milford", "Kingston",
          "Newport", "Lebanon", "Winston-Salem", "Cedar Rapids", "Mount Vernon", "Lake Charles")
STATES = "AL AZ CA CO FL GA IL IN KS KY MA MD MI MN MO NC NJ NY OH OR PA TX VA WA WI".split()
DOMAINS = ("example.org", "mail.example.com", "clinic.example.net")
INSTITUTION_KINDS = ("General Hospital", "Medical Center", "Clinic", "Memorial Hospital", "Community Hospital",
                     "Regional Medical Center", "Children's Hospital", "Imaging Center", "Hospital",
                     "Health Center", "Cancer Center", "Medical Centre")

# where a template goes: "header" (report start), "inline" (a sentence boundary), "end"
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("header", "Patient: {name}."), ("header", "Patient name: {rname}."), ("header", "Name: {NAME}."),
    ("header", "Pt: {name}."), ("header", "MRN: {mrn}."), ("header", "MRN {mrn}."),
    ("header", "Medical record #: {mrn}."), ("header", "Accession #: {acc}."), ("header", "Acc: {acc}."),
    ("header", "DOB: {date}."), ("header", "Date of birth: {date}."), ("header", "SSN: {ssn}."),
    ("header", "Referring physician: {name}."), ("header", "Attending: Dr. {name}."),
    ("header", "Encounter ID: {id}."),
    ("inline", "Findings discussed with Dr. {last} at {phone} on {date}."),
    ("inline", "Compared with the exam of {date}."), ("inline", "Comparison: {date}."),
    ("inline", "{nocue} lives at {addr}."),
    ("inline", "Results were communicated to {name} by telephone on {date}."),
    ("inline", "Dr. {name} was paged at {phone}."),
    ("inline", "Please call {phone} or email {email} with questions."),
    ("inline", "Images are available at {url}."),
    ("inline", "Critical result called to Dr. {last} on {date} at 10:32."),
    ("inline", "The referring physician, Dr. {last}, was notified."),
    ("inline", "Follow-up imaging at {addr} is recommended."),
    ("inline", "Prior outside study from {date} reviewed."), ("inline", "Fax results to {phone}."),
    ("inline", "Notified {name} at {phone}."),
    ("end", "Electronically signed by {name}, MD on {date}."), ("end", "Dictated by: {name}."),
    ("end", "Read by {rname}."), ("end", "{name}, MD"),
    # added with issue 23: "Dr. First Last" (surnames that are role words too), lower-case
    # patient cues, institutions
    ("end", "Dictated by Dr. {drname}."), ("end", "Signed by Dr. {drname} on {date}."),
    ("inline", "Findings discussed with Dr. {drname} at the bedside."),
    ("inline", "Dr. {drname} reviewed the images."),
    ("header", "Report for patient {ptname}."), ("header", "Exam of patient {ptname}, age 64."),
    ("inline", "The patient, {ptname}, was positioned upright."),
    ("inline", "Discussed with patient {ptname} and family."), ("header", "pt {ptname} seen in clinic."),
    ("inline", "Transferred from {inst}."), ("inline", "Prior study from {inst} reviewed."),
    ("header", "{INST} DEPARTMENT OF RADIOLOGY."), ("inline", "Outside films from {inst} dated {date} compared."),
    ("inline", "Follow-up at {inst} is advised."),
)
NO_CUE_TEMPLATES = ("{nocue} tolerated the procedure well.", "Images reviewed together with {nocue}.")
SLOT_ROW = {"name": "name (cued)", "rname": "name (cued)", "NAME": "name (cued)", "last": "name (cued)",
            "drname": "name (Dr. First Last)", "ptname": "name (patient cue)", "inst": "institution",
            "INST": "institution",
            "nocue": "name (no cue)", "mrn": "mrn", "acc": "accession", "ssn": "ssn", "phone": "phone",
            "email": "email", "url": "url", "addr": "address", "date": "date", "id": "id"}
_SLOT = re.compile(r"\{(\w+)\}")
_TOKENS = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Planted:
    row: str
    value: str
    date: dt.date | None = None


# ---- value generators ---------------------------------------------------------------------
def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(n - 1))


def _full_name(rng: random.Random) -> str:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    r = rng.random()
    if r < 0.15:
        return f"{first} {rng.choice('ABCDEFGHJKLMNPRSTW')}. {last}"
    if r < 0.25:
        return f"{first} {last}-{rng.choice(LAST)}"
    return f"{first} {last}"


def _dr_name(rng: random.Random) -> str:
    """First Last, the surname one time in three a role or service word ("Gregory House")."""
    last = rng.choice(ROLE_SURNAMES) if rng.random() < 1 / 3 else rng.choice(LAST)
    return f"{rng.choice(FIRST)} {last}"


def _institution(rng: random.Random) -> str:
    place = rng.choice((rng.choice(CITIES), rng.choice(LAST), f"St. {rng.choice(FIRST)}'s",
                        f"{rng.choice(CITIES)} {rng.choice(('Valley', 'County', 'Lakes', 'Heights'))}"))
    r = rng.random()
    if r < 0.15:
        return f"University of {rng.choice(CITIES)} Medical Center"
    if r < 0.25:
        return f"Hospital of {rng.choice(CITIES)}"
    return f"{place} {rng.choice(INSTITUTION_KINDS)}"


def _phone(rng: random.Random) -> str:
    a, b, c = _digits(rng, 3), _digits(rng, 3), _digits(rng, 4)
    return rng.choice((f"({a}) {b}-{c}", f"{a}-{b}-{c}", f"{a}.{b}.{c}", f"+1 {a} {b} {c}",
                       f"{a}-{b}-{c} ext. {_digits(rng, 3)}"))


def _address(rng: random.Random) -> str:
    street = f"{rng.randint(2, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_SUFFIXES)}"
    city, state, zipc = rng.choice(CITIES), rng.choice(STATES), _digits(rng, 5)
    return rng.choice((street, f"{street}, {city}", f"{street}, {city}, {state} {zipc}",
                       f"{street}, {city} {state} {zipc}"))


def _date(rng: random.Random) -> tuple[str, dt.date]:
    d = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 74))
    fmt = rng.choice((
        lambda: f"{d.month:02d}/{d.day:02d}/{d.year}", lambda: f"{d.month}/{d.day}/{d.year % 100:02d}",
        lambda: d.isoformat(), lambda: f"{d:%B} {d.day}, {d.year}", lambda: f"{d.day} {d:%B} {d.year}",
        lambda: f"{d:%b}. {d.day} {d.year}", lambda: f"{d:%b} {d.day}, {d.year}",
        lambda: f"{d.month:02d}-{d.day:02d}-{d.year}"))
    return fmt(), d


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "name": _full_name, "nocue": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
    "rname": lambda r: f"{r.choice(LAST)}, {r.choice(FIRST)}",
    "NAME": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}".upper(), "last": lambda r: r.choice(LAST),
    "drname": _dr_name, "ptname": lambda r: f"{r.choice(FIRST)} {r.choice(LAST)}",
    "inst": _institution, "INST": lambda r: _institution(r).upper(),
    "mrn": lambda r: r.choice((_digits(r, 7), _digits(r, 8), "0" + _digits(r, 7), "M" + _digits(r, 7))),
    "acc": lambda r: r.choice((_digits(r, 10), f"RAD-{r.randint(2005, 2024)}-{_digits(r, 6)}",
                               "E" + _digits(r, 8))),
    "ssn": lambda r: f"{_digits(r, 3)}-{_digits(r, 2)}-{_digits(r, 4)}",
    "phone": _phone, "addr": _address, "id": lambda r: r.choice(("ENC" + _digits(r, 9), _digits(r, 9))),
    "email": lambda r: f"{r.choice(FIRST).lower()}.{r.choice(LAST).lower()}{r.randint(1, 99)}"
                       f"@{r.choice(DOMAINS)}",
    "url": lambda r: r.choice((f"https://pacs.example.org/viewer/{_digits(r, 8)}",
                               f"www.example.com/p/{_digits(r, 7)}")),
}


# parts of every URL / e-mail address: neither distinctive nor PHI on their own
# (and "of", "the", "s" of "University of ...", "St. Mary's": report words, not the institution's name)
_GENERIC_TOKENS = frozenset({"https", "http", "www", "com", "org", "net", "example", "mail", "of", "the", "s"})


def _tokens(text: str) -> set[str]:
    return set(_TOKENS.findall(text)) - _GENERIC_TOKENS


def _fill(template: str, rng: random.Random, used: set[str]) -> tuple[str, list[Planted]]:
    """The template with fresh values whose tokens occur nowhere else in the report (``used``)."""
    planted: list[Planted] = []

    def value(m: re.Match[str]) -> str:
        slot = m.group(1)
        for _ in range(100):
            date = None
            if slot == "date":
                text, date = _date(rng)
            else:
                text = GENERATORS[slot](rng)
            if not _tokens(text) & used:
                break
        used.update(_tokens(text))
        planted.append(Planted(SLOT_ROW[slot], text, date))
        return text

    return _SLOT.sub(value, template), planted


def plant(report: str, rng: random.Random) -> tuple[str, list[Planted]]:
    """``report`` with 1-2 header lines, 2-3 inline sentences, a signature and, one time in three,
    a sentence whose name has no cue."""
    by_place = {p: [t for q, t in TEMPLATES if q == p] for p in ("header", "inline", "end")}
    heads = rng.sample(by_place["header"], rng.randint(1, 2))
    inline = rng.sample(by_place["inline"], rng.randint(2, 3)) + (
        [rng.choice(NO_CUE_TEMPLATES)] if rng.random() < 1 / 3 else [])
    tail = rng.choice(by_place["end"])
    used = _tokens(report) | _tokens(_SLOT.sub(" ", " ".join(heads + inline + [tail])))
    sentences = re.split(r"(?<=\.)\s+", report.strip())
    planted: list[Planted] = []
    parts = []
    for group in (heads, inline, [tail]):
        filled = [_fill(t, rng, used) for t in group]
        parts.append([t for t, _ in filled])
        planted += [p for _, items in filled for p in items]
    for text in parts[1]:
        sentences.insert(rng.randint(0, len(sentences)), text)
    return " ".join(parts[0] + sentences + parts[2]), planted


# ---- scoring ------------------------------------------------------------------------------
def removed(item: Planted, output: str, patient: str, policy: PhiPolicy) -> bool:
    """Whether ``item`` is gone from ``output`` (dates: gone *and* correctly shifted)."""
    if item.date is not None:
        iso = policy.shift_date(item.date.strftime("%Y%m%d"), patient)
        return item.value not in output and iso is not None and shifted_marker(iso) in output
    bare = PLACEHOLDER_RE.sub(" ", output)
    return not any(re.search(rf"(?<![^\W_]){re.escape(t)}(?![^\W_])", bare) for t in _tokens(item.value))


def _load(annotation_path: str | Path) -> list[dict[str, Any]]:
    ann = json.loads(Path(annotation_path).read_text())
    return [r for split in ("train", "val", "test") for r in ann.get(split, [])]


def _false_positives(reports: list[dict[str, Any]], policy: PhiPolicy) -> dict[str, Any]:
    changes: Counter[tuple[str, str]] = Counter()
    changed = chars = total = 0
    for r in reports:
        text = r["report"]
        res = deidentify_text(text, f"iu-{r['id']}", policy)
        total += len(text)
        changed += bool(res.redactions)
        chars += sum(x.end - x.start for x in res.redactions)
        changes.update((x.kind, text[x.start:x.end]) for x in res.redactions)
    return {"reports_changed": changed, "reports": len(reports), "chars_changed": chars,
            "chars_total": total,
            "top": [{"kind": k, "text": t, "count": c} for (k, t), c in changes.most_common(10)]}


def run_deid_eval(annotation_path: str | Path, n: int = 1000, seed: int = 0,
                  policy: PhiPolicy | None = None) -> dict[str, Any]:
    """Plant PHI into ``n`` IU reports (seeded), de-identify, score recall per kind; count the
    pass's changes to the same reports unplanted (false positives) and second-pass changes."""
    t0 = time.perf_counter()
    policy = policy or PhiPolicy(EVAL_KEY)
    rng = random.Random(seed)
    pool = _load(annotation_path)
    reports = rng.sample(pool, min(n, len(pool)))
    counts = {row: [0, 0] for row in ROWS}
    missed: dict[str, list[str]] = {row: [] for row in ROWS}
    not_idempotent = 0
    for r in reports:
        patient = f"iu-{r['id']}"
        text, planted = plant(r["report"], rng)
        out = deidentify_text(text, patient, policy).text
        not_idempotent += deidentify_text(out, patient, policy).text != out
        for item in planted:
            ok = removed(item, out, patient, policy)
            counts[item.row][0] += 1
            counts[item.row][1] += ok
            if not ok and len(missed[item.row]) < 5:
                missed[item.row].append(item.value)
    recall = {row: {"planted": p, "removed": k, "recall": round(k / p, 4) if p else None,
                    "missed_examples": missed[row]} for row, (p, k) in counts.items()}
    return {"reports": len(reports), "seed": seed, "recall": recall,
            "false_positives": _false_positives(reports, policy), "not_idempotent": not_idempotent,
            "seconds": round(time.perf_counter() - t0, 2)}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"planted PHI in {result['reports']} IU X-ray reports (seed {result['seed']})",
             f"{'kind':<21} {'planted':>7} {'removed':>7} {'recall':>7}"]
    for row, r in result["recall"].items():
        rec = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(f"{row:<21} {r['planted']:>7} {r['removed']:>7} {rec:>7}")
    fp = result["false_positives"]
    lines.append(f"false positives on the unplanted reports: {fp['reports_changed']}/{fp['reports']} "
                 f"reports changed, {fp['chars_changed']} of {fp['chars_total']} characters")
    lines += [f"  {t['count']:>4} x {t['kind']}: {t['text']!r}" for t in fp["top"]]
    lines.append(f"second pass changed {result['not_idempotent']}/{result['reports']} planted reports")
    return "\n".join(lines)
