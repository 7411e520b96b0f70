"""Our extractor against the CheXpert labeler's phrase rules, per CheXpert observation.

The CheXpert labeler (Irvin et al., AAAI 2019; github.com/stanfordmlgroup/chexpert-labeler, MIT
licence) finds *mentions* by phrase lists and classifies each as negative / uncertain / positive
with NegBio rules over a dependency parse, in three passes: pre-negation uncertainty ("cannot
exclude"), negation, post-negation uncertainty. This module reimplements it without the parser:

* the **mention and unmention phrase lists are the labeler's own** (``phrases/mention/*.txt``,
  ``phrases/unmention/*.txt``, the positional cardiomegaly/cardiomediastinum unmentions of
  ``stages/extract.py``), matched as the labeler matches them (regular expressions on the
  lower-cased sentence, ``_`` as a space), on its cleaned text (``and/or`` -> ``or``, ``a/b`` ->
  ``a / b``);
* the **negation and uncertainty rules are surface approximations** of its Semgrex patterns
  (``patterns/*.txt``): the cue words and constructions those patterns name ("no", "without",
  "negative for", "free of", "clear of", "rule out", "resolution/removal of", "normal",
  "unremarkable", "within normal limits", "is not enlarged", "no longer seen", "removed";
  "cannot exclude", "not excluded", "no new"; "possible", "probable", "questionable", "suspect",
  "question", "may/might/would/could", "concern for", "worrisome for", "versus", "or",
  "may represent", "blunting of the costophrenic angle", "stable cardiomediastinal silhouette")
  looked for in the mention's clause, before it (pre-cues) or right after it (post-cues);
* its **aggregation** is the labeler's (``stages/aggregate.py``): negative+uncertain ->
  uncertain, positive wins otherwise, "chf"/"heart failure" positive adds uncertain cardiomegaly,
  No Finding when no observation except Support Devices is positive or uncertain.

It runs on the whole report (IU X-ray's R2Gen texts have no section markers; the labeler reads the
impression only). So this is "the CheXpert labeler's phrase rules", not the labeler itself.

``python -m eval.chexpert_rules --annotation annotation.json`` prints the agreement table.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from retrieval.entities import EntityExtractor, report_labels, split_sentences
from retrieval.records import ABSENT, PRESENT, STATUS_RANK, UNCERTAIN

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity",
                "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                "Pleural Other", "Fracture", "Support Devices")

# phrases/mention/*.txt of the labeler ("_" stands for a space); "no_finding" lists mentions that
# only serve to rule out No Finding
MENTIONS: dict[str, list[str]] = {
    "Atelectasis": ["atelecta", "collapse"],
    "Cardiomegaly": ["cardiomegaly", "the heart", "heart size", "cardiac enlargement", "cardiac size",
                     "cardiac shadow", "cardiac contour", "cardiac silhouette", "enlarged heart"],
    "Consolidation": ["consolidat"],
    "Edema": ["edema", "heart failure", "chf", "vascular congestion", "pulmonary congestion", "indistinctness",
              "vascular prominence"],
    "Enlarged Cardiomediastinum": [" mediastinum", "cardiomediastinum", "contour", "mediastinal configuration",
                                   "mediastinal silhouette", "pericardial silhouette",
                                   "cardiac silhouette and vascularity"],
    "Fracture": ["fracture"],
    "Lung Lesion": ["mass", "nodular density", "nodular densities", "nodular opacity", "nodular opacities",
                    "nodular opacification", "nodule", "lump", "cavitary lesion", "carcinoma", "neoplasm", "tumor"],
    "Lung Opacity": ["opaci", "decreased translucency", "increased density", "airspace disease", "air-space disease",
                     "air space disease", "infiltrate", "infiltration", "interstitial marking", "interstitial pattern",
                     "interstitial lung", "reticular pattern", "reticular marking", "reticulation",
                     "parenchymal scarring", "peribronchial thickening", "wall thickening", "scar"],
    "No Finding": ["emphysema", "blunt", "density", "elevation", "eventration", "scoliosis", "degenera", "calcifi",
                   "hyperinflation", "bronchospasm", "asthma", "hernia", "copd", "interstitial markings", "plaque",
                   "osteophytosis", "aortic disease", "bronchiolitis", "airways disease", "thickening",
                   "cephalization", "aspiration", "bullae", "hyperinflat", "contusion", "atherosclero", "osteopenia",
                   "metastasis", "granuloma", "pneumomediastinum", "pneumoperitoneum", "osteodystrophy", "cuffing",
                   "irregular lucency", "inflam", "fissure", "hypertension", "prominen", "kyphosis", "defib",
                   "hyperexpansion", "bullet", "reticula", "thoracentesis", "bronchitis", "volume loss", "deformity",
                   "hemorrhage", "hematoma", "radiopaque", "aerophagia", "arthropathy", "tracheostomy"],
    "Pleural Effusion": ["pleural fluid", "effusion"],
    "Pleural Other": ["pleural thickening", "fibrosis", "fibrothorax", "pleural scar", "pleural parenchymal scar",
                      "pleuro-parenchymal scar", "pleuro-pericardial scar"],
    "Pneumonia": ["pneumonia", "infection", "infectious process", "infectious"],
    "Pneumothorax": ["pneumothorax", "pneumothoraces"],
    "Support Devices": ["pacer", " line ", "lines", "picc", "tube", "valve", "catheter", "pacemaker", "hardware",
                        "arthroplast", "marker", "icd", "defib", "device", "drain ", "plate", "screw", "cannula",
                        "apparatus", "coil", "support", "equipment", "mediport"],
}
UNMENTIONS: dict[str, list[str]] = {
    "Lung Lesion": ["calcified nodul", "massive", "massengale"],
    "Lung Opacity": ["pleural scar"],
    "Pleural Effusion": ["pericardial effusion"],
}
_POSITIONAL = [a + b for a in ("over the", "overly the", "in the") for b in ("", " superior", " left", " right")]
UNMENTIONS["Cardiomegaly"] = [f"{p} {m.replace('the ', '')}" for p in _POSITIONAL for m in MENTIONS["Cardiomegaly"]
                              if m not in ("cardiomegaly", "cardiac enlargement")]
UNMENTIONS["Enlarged Cardiomediastinum"] = [f"{p} {m}" for p in _POSITIONAL
                                            for m in MENTIONS["Enlarged Cardiomediastinum"]]

# surface forms of the labeler's Semgrex rules (see the module docstring)
_PRE_UNC = re.compile(r"\b(cannot|can not|could not|not) (be )?(exclude|excluded|rule out|ruled out)|"
                      r"\bno new\b|\bno evidence to rule out\b")
_POST_PRE_UNC = re.compile(r"^[^.;]{0,30}?\b(is|are|be)? ?not (be )?excluded\b|^[^.;]{0,30}?\bcannot be (excluded|ruled out)")
_NEG_BEFORE = re.compile(
    r"\b(no|not|without|negative for|free of|clear of|clearing of|rule out|ruled out|resolution of|removal of|"
    r"disappearance of|drainage of|history of|absence of|absent|normal|unremarkable|neither|nor|"
    r"no evidence of|without evidence of|no focus of|no area of|no findings? of)\b")
_NEG_AFTER = re.compile(
    r"^[^.;]{0,60}?\b((is|are|appears?|remains?|was|were) (now |otherwise |again )?(normal|unremarkable|"
    r"within normal limits|clear)|within normal limits|(at|within) (the )?upper limits? of normal|"
    r"(is|are) not enlarged|not enlarged|(is|are|has|have) (been )?(removed|resolved|cleared)|"
    r"removed|resolved|no longer (seen|visualized)|(is|are) absent|(is|are) not seen)\b")
_UNC_BEFORE = re.compile(
    r"\b(possible|possibly|presumably|probable|probably|questionable|suspect|suspected|suspicious|suspicion|"
    r"question|questioned|may|might|would|could|concern for|concerning for|worrisome for|consider|"
    r"considered|favor|favored|maybe|versus|vs|or|represent|reflect|indicate|include|less likely|likely|"
    r"suggest|suggests|suggestive|suggesting|cannot)\b")
_UNC_AFTER = re.compile(
    r"^[^.;]{0,40}?\b(is|are)? ?(possible|possibly|probable|likely|suspected|questionable|versus|vs|or)\b")
_SILHOUETTE_STABLE = re.compile(r"\b(stable|unchanged|not changed|no change|similar to prior)\b")
_CLAUSE = re.compile(r"\b(but|however|although|though|which|whereas|otherwise)\b|;")


def _clean(report: str) -> str:
    text = report.lower().replace("and/or", "or")
    text = re.sub(r"(?<=[a-z])/(?=[a-z])", " / ", text)
    return text.replace("..", ".")


class ChexpertRules:
    """Label a report with the 14 CheXpert observations: 1 positive, 0 negative, -1 uncertain,
    None unmentioned."""

    def __init__(self) -> None:
        self.mentions = {o: [re.compile(re.escape(p)) for p in ps] for o, ps in MENTIONS.items()}
        self.unmentions = {o: [re.compile(re.escape(p)) for p in ps] for o, ps in UNMENTIONS.items()}

    def mentions_in(self, sentence: str) -> list[tuple[str, int, int]]:
        out = []
        for obs, rxs in self.mentions.items():
        # the labeler matches every phrase; overlapping phrases of one observation give one mention
            spans = sorted({(m.start(), m.end()) for rx in rxs for m in rx.finditer(sentence)})
            for s, e in spans:
                if any(s < u.end() and u.start() < e for rx in self.unmentions.get(obs, []) for u in rx.finditer(sentence)):
                    continue
                out.append((obs, s, e))
        return out

    def classify(self, sentence: str, obs: str, s: int, e: int) -> int:
        cuts = [0] + [m.start() for m in _CLAUSE.finditer(sentence)] + [len(sentence)]
        c0 = max(c for c in cuts if c <= s)
        c1 = min(c for c in cuts if c >= e)
        before, after = sentence[c0:s], sentence[e:c1]
        if _PRE_UNC.search(before) or _POST_PRE_UNC.search(after):
            return -1
        if _NEG_BEFORE.search(before) or _NEG_AFTER.search(after):
            return 0
        if _UNC_BEFORE.search(before) or _UNC_AFTER.search(after):
            return -1
        if obs == "Pleural Effusion" and "blunt" in sentence and "costophrenic" in sentence:
            return -1
        if obs in ("Enlarged Cardiomediastinum", "Cardiomegaly") and _SILHOUETTE_STABLE.search(after + before):
            return -1
        return 1

    def label(self, report: str) -> dict[str, int | None]:
        found: dict[str, list[int]] = {}
        for sent in split_sentences(_clean(report)):
            text = sent.text
            for obs, s, e in self.mentions_in(text):
                lab = self.classify(text, obs, s, e)
                found.setdefault(obs, []).append(lab)
                if lab != 0 and text[s:e] in ("chf", "heart failure"):
                    found.setdefault("Cardiomegaly", []).append(-1)
        out: dict[str, int | None] = {}
        no_finding = not any(lab != 0 for o, labs in found.items() if o != "Support Devices" for lab in labs)
        for obs in OBSERVATIONS:
            labs = found.get(obs)
            if obs == "No Finding":
                out[obs] = 1 if no_finding else None
            elif not labs:
                out[obs] = None
            elif 0 in labs and -1 in labs:
                out[obs] = -1
            elif 1 in labs:
                out[obs] = 1
            else:
                out[obs] = labs[0]
        return out


# our findings -> CheXpert observations (findings outside the 13 feed only No Finding)
OURS: dict[str, str] = {
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum", "widened mediastinum": "Enlarged Cardiomediastinum",
    "cardiomegaly": "Cardiomegaly", "nodule": "Lung Lesion", "mass": "Lung Lesion", "malignancy": "Lung Lesion",
    "opacity": "Lung Opacity", "interstitial pattern": "Lung Opacity", "scarring": "Lung Opacity",
    "edema": "Edema", "vascular congestion": "Edema", "heart failure": "Edema", "consolidation": "Consolidation",
    "pneumonia": "Pneumonia", "atelectasis": "Atelectasis", "pneumothorax": "Pneumothorax",
    "effusion": "Pleural Effusion", "pleural thickening": "Pleural Other", "fracture": "Fracture",
    "support device": "Support Devices",
}
_VALUE: dict[str, int] = {PRESENT: 1, UNCERTAIN: -1, ABSENT: 0}


def our_labels(report: str, ex: EntityExtractor) -> dict[str, int | None]:
    """Our extractor's labels in CheXpert's form (per observation: the strongest status over its
    findings and anatomies; No Finding: nothing present or hedged except devices)."""
    best: dict[str, str] = {}
    any_finding = False
    for (_, finding), status in report_labels(ex.extract(report)).items():
        if status != ABSENT and finding != "support device":
            any_finding = True
        obs = OURS.get(finding)
        if obs and (obs not in best or STATUS_RANK[status] > STATUS_RANK[best[obs]]):
            best[obs] = status
    out: dict[str, int | None] = {o: (_VALUE[best[o]] if o in best else None) for o in OBSERVATIONS}
    out["No Finding"] = None if any_finding else 1
    return out


def _kappa(pairs: Sequence[tuple[object, object]]) -> float:
    n = len(pairs)
    if not n:
        return float("nan")
    po = sum(a == b for a, b in pairs) / n
    ca, cb = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    pe = sum(ca[x] * cb[x] for x in set(ca) | set(cb)) / (n * n)
    return (po - pe) / (1 - pe) if pe < 1 else 1.0


def compare(reports: list[str]) -> dict[str, dict[str, float | int]]:
    """Per observation: how often each labeler mentions it, 4-class agreement (positive /
    uncertain / negative / unmentioned) and Cohen's kappa, and agreement on "positive or uncertain"
    (F1 of ours against the rules, kappa)."""
    rules, ex = ChexpertRules(), EntityExtractor()
    theirs = [rules.label(r) for r in reports]
    ours = [our_labels(r, ex) for r in reports]
    out: dict[str, dict[str, float | int]] = {}
    for obs in OBSERVATIONS:
        pairs = [(o[obs], t[obs]) for o, t in zip(ours, theirs, strict=True)]
        pos = [(o in (1, -1), t in (1, -1)) for o, t in pairs]
        tp = sum(a and b for a, b in pos)
        fp = sum(a and not b for a, b in pos)
        fn = sum(b and not a for a, b in pos)
        out[obs] = {"ours_mentioned": sum(o is not None for o, _ in pairs),
                    "rules_mentioned": sum(t is not None for _, t in pairs),
                    "ours_positive": tp + fp, "rules_positive": tp + fn,
                    "agreement": round(sum(o == t for o, t in pairs) / len(pairs), 4),
                    "kappa": round(_kappa(pairs), 4),
                    "positive_f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else float("nan"),
                    "positive_kappa": round(_kappa(pos), 4)}
    return out


def format_table(result: dict[str, dict[str, float | int]], n: int) -> str:
    lines = [f"{n} reports; ours vs CheXpert-labeler phrase rules (1/-1/0/blank per observation)",
             f"{'observation':27s} {'ours+':>6s} {'rules+':>6s} {'agree':>6s} {'kappa':>6s} {'pos F1':>6s} {'pos k':>6s}"]
    for obs, r in result.items():
        lines.append(f"{obs:27s} {r['ours_positive']:6d} {r['rules_positive']:6d} {r['agreement']:6.3f} "
                     f"{r['kappa']:6.3f} {r['positive_f1']:6.3f} {r['positive_kappa']:6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.chexpert_rules", description=__doc__.splitlines()[0])
    p.add_argument("--annotation", required=True, help="R2Gen-style annotation.json (IU X-ray)")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--out", help="write the table as JSON here")
    a = p.parse_args(argv)
    ann = json.loads(Path(a.annotation).read_text(encoding="utf-8"))
    reports = [it["report"] for sp in a.splits.split(",") for it in ann.get(sp, []) if it.get("report")]
    result = compare(reports)
    print(format_table(result, len(reports)))
    if a.out:
        Path(a.out).write_text(json.dumps({"reports": len(reports), "observations": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
