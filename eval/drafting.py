"""``medrag eval draft``: drafting quality against held-out reports.

Protocol. Queries are the studies of ``manifest``; their analog cases are retrieved by report
embedding (MiniLM; report-only mode, so retrieval sees the held-out report's meaning: an *oracle*
retriever, the same for every method) from ``corpus`` (a separate split: retrieve from train,
draft val) or, without ``corpus``, from the other studies of ``manifest`` (leave-one-out). A
corpus study is never used for a query with the same study id or the same patient id (when the
manifest has patient ids). With ``duplicates="both"`` every method is scored twice: with the
corpus as it is, and with the corpus studies whose report text equals the query's (after
lower-casing and dropping "XXXX" and punctuation: boilerplate twins) removed; the run counts them.

Scores per method, each draft against its held-out report:

* entity P/R/F1: (coarse anatomy, finding, status) labels from our extractor, negation-aware
  ("no effusion" only matches "no effusion"), micro-averaged, plus F1 per finding;
* BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap (the R2Gen literature's scorer) on lower-cased
  alphanumeric tokens without "xxxx"; our own BLEU-4/ROUGE-L are kept in the JSON;
* contradictions per 100 drafts (:class:`retrieval.rag.consistency.ConsistencyChecker`), also for
  the held-out reports themselves (the checker's false-alarm floor);
* mean length ratio (draft tokens / reference tokens) and the share of cited sentences;
* paired-bootstrap 95% intervals of (method - copy-nearest) for entity F1, BLEU-4 and ROUGE-L
  (:func:`paired_intervals`): the held-out reports are resampled (``bootstrap`` resamples,
  ``seed``), the same resamples for every method and metric. Entity F1 (micro) and BLEU-4
  (pycocoevalcap's corpus BLEU) are recomputed on each resample from per-report counts (true/false
  positives and negatives; n-gram matches, candidate n-grams, candidate and reference lengths),
  so they are the table's corpus-level scores, not averages of sentence scores; pycocoevalcap's
  ROUGE-L is already the mean of per-report scores. CIDEr has no interval: its idf weights come
  from the evaluated reference set itself, so a resample would need its own document
  frequencies (a full CIDEr run per resample), not a sum of per-report numbers.

Methods: ``copy-nearest`` (the top report verbatim), ``extractive`` (sentence voting without the
checker: the drafter as it was), ``extractive+check``, ``edit-nearest`` and ``edit-consensus``
(retrieve-and-edit from the top report or from the consensus report; ``+neg`` also adds the
consensus's negative statements), ``copy-consensus`` (the consensus report verbatim),
``edit-nearest+len`` (:class:`~retrieval.rag.extractive.ConsensusEditGenerator`: the nearest report
edited only where the other cases disagree strongly, deleted sentences replaced by the most similar
allowed sentence, length kept), ``copy-mbr`` (:class:`~retrieval.rag.mbr.CopyMBRGenerator`: the
minimum-Bayes-risk report of the retrieved cases verbatim) and ``mbr+len`` (the edit-nearest+len
editing applied to that MBR report instead of the nearest).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.stats import Interval, paired_bootstrap, paired_bootstrap_totals
from indexer.manifest import read_manifest
from retrieval.entities import EntityExtractor
from retrieval.rag.consistency import ConsistencyChecker
from retrieval.rag.context import ContextBuilder, labels_of
from retrieval.rag.extractive import (
    ConsensusEditGenerator,
    EditNearestGenerator,
    ExtractiveGenerator,
    copy_nearest,
)
from retrieval.rag.mbr import CopyMBRGenerator
from retrieval.rag.overlap import rouge_l
from retrieval.rag.types import Draft, DraftContext
from retrieval.records import Label, Study, as_labels
from retrieval.taxonomy import default_taxonomy

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t != "xxxx"]


def bleu4(refs: list[list[str]], hyps: list[list[str]]) -> float:
    match, total = [0] * 4, [0] * 4
    ref_len = hyp_len = 0
    for r, h in zip(refs, hyps, strict=True):
        ref_len += len(r)
        hyp_len += len(h)
        for n in range(1, 5):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0:
        return 0.0
    logs = [math.log((match[i] + (i > 0)) / (total[i] + (i > 0))) if total[i] + (i > 0) and match[i] + (i > 0) else -1e9
            for i in range(4)]
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(sum(logs) / 4)


@dataclass
class _Acc:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, gold: set[Label], pred: set[Label]) -> None:
        self.tp += len(gold & pred)
        self.fp += len(pred - gold)
        self.fn += len(gold - pred)

    def prf(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4)}


def normalise(text: str) -> str:
    """The text that decides exact duplicates: lower case, no "XXXX", words only."""
    return " ".join(tokens(text))


def methods() -> dict[str, Callable[[DraftContext], Draft]]:
    """Every drafting variant the harness scores (name -> draft function)."""
    extractive = ExtractiveGenerator(check=False)
    checked = ExtractiveGenerator(check=True)
    edit_nearest = EditNearestGenerator(base="nearest")
    edit_negatives = EditNearestGenerator(base="nearest", add_negatives=True)
    edit_consensus = EditNearestGenerator(base="consensus")
    copy_consensus = EditNearestGenerator(base="consensus", keep_at=0.0, add=False, check=False)
    copy_consensus.decide = lambda ctx: {}  # type: ignore[method-assign]  # keep every sentence
    return {"copy-nearest": copy_nearest, "extractive": extractive.generate, "extractive+check": checked.generate,
            "copy-consensus": copy_consensus.generate, "edit-nearest": edit_nearest.generate,
            "edit-nearest+neg": edit_negatives.generate,
            "edit-consensus": edit_consensus.generate, "edit-nearest+len": ConsensusEditGenerator().generate,
            "copy-mbr": CopyMBRGenerator().generate, "mbr+len": ConsensusEditGenerator(base="mbr").generate}


def coco_scores(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L, CIDEr with pycocoevalcap (its BLEU prints; silenced)."""
    return _coco(refs, hyps)[0]


def _coco(refs: list[str], hyps: list[str]) -> tuple[dict[str, float], np.ndarray]:
    """:func:`coco_scores` and pycocoevalcap's per-report ROUGE-L (its corpus ROUGE-L is their mean)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [r or "empty"] for i, r in enumerate(refs)}
    res = {i: [h or "empty"] for i, h in enumerate(hyps)}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts, res)
        rouge, per_rouge = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": round(float(b), 4) for n, b in enumerate(bleu)}
    out.update(rougeL=round(float(rouge), 4), cider=round(float(cider), 4))
    return out, np.asarray(per_rouge, np.float64).reshape(len(refs))


def bleu_counts(refs: list[str], hyps: list[str]) -> np.ndarray:
    """Per-report BLEU statistics as pycocoevalcap counts them, (reports, 10): candidate length,
    reference length, candidate 1..4-grams, clipped 1..4-gram matches. Summed over any set of
    reports they give that set's corpus BLEU (:func:`coco_bleu4`)."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    rows = []
    for r, h in zip(refs, hyps, strict=True):
        c = cook_test(h or "empty", cook_refs([r or "empty"]), eff="closest")  # one reference: its length
        rows.append([c["testlen"], c["reflen"], *c["guess"], *c["correct"]])
    return np.asarray(rows, np.float64).reshape(len(refs), 10)


def coco_bleu4(totals: np.ndarray) -> np.ndarray:
    """pycocoevalcap's corpus BLEU-4 (with its smoothing constants and brevity penalty) from summed
    :func:`bleu_counts` rows, vectorised over leading axes."""
    tiny, small = 1e-15, 1e-9
    t = np.asarray(totals, np.float64)
    log_p = np.log((t[..., 6:10] + tiny) / (t[..., 2:6] + small)).sum(-1) / 4
    ratio = (t[..., 0] + tiny) / (t[..., 1] + small)
    bp = np.where(ratio < 1, 1 - 1 / np.minimum(ratio, 1.0), 0.0)
    out: np.ndarray = np.exp(log_p + bp)
    return out


def micro_f1(totals: np.ndarray) -> np.ndarray:
    """Micro F1 from summed (true positive, false positive, false negative) counts (0 where undefined)."""
    t = np.asarray(totals, np.float64)
    tp, fp, fn = t[..., 0], t[..., 1], t[..., 2]
    den = 2 * tp + fp + fn
    out: np.ndarray = np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)
    return out


@dataclass(frozen=True)
class ReportStats:
    """One method's per-report statistics on a set of held-out reports (rows in report order)."""

    entity: np.ndarray  # (reports, 3) entity true positives, false positives, false negatives
    bleu: np.ndarray  # (reports, 10) :func:`bleu_counts`
    rouge: np.ndarray  # (reports,) pycocoevalcap ROUGE-L

    @classmethod
    def of(cls, refs: list[str], hyps: list[str], entity: list[tuple[int, int, int]],
           rouge: np.ndarray | None = None) -> ReportStats:
        if rouge is None:
            rouge = _coco(refs, hyps)[1]
        return cls(np.asarray(entity, np.float64).reshape(len(refs), 3), bleu_counts(refs, hyps), rouge)


def paired_intervals(method: ReportStats, baseline: ReportStats, n: int = 2000, seed: int = 0
                     ) -> dict[str, Interval]:
    """method - baseline on the same reports, with paired-bootstrap 95% intervals (the same
    resamples for all three metrics): entity micro F1 and corpus BLEU-4 recomputed per resample
    from per-report counts, ROUGE-L as the mean of per-report differences."""
    return {"entity_f1": paired_bootstrap_totals(method.entity, baseline.entity, micro_f1, n, seed),
            "bleu4": paired_bootstrap_totals(method.bleu, baseline.bleu, coco_bleu4, n, seed),
            "rougeL": paired_bootstrap(method.rouge, baseline.rouge, n, seed)}


def _embed(reports: list[str], device: str, cache_dir: Path | None) -> np.ndarray:
    """MiniLM report embeddings, cached on disk by a hash of the texts (re-runs skip the model)."""
    from retrieval.report_text import text_oracle

    key = hashlib.sha256("\x00".join(reports).encode()).hexdigest()[:20]
    path = cache_dir / f"minilm-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        cached: np.ndarray = np.load(path)
        return cached
    emb = np.asarray(text_oracle(reports, device)(None), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, emb)
    return emb


def run(manifest: str | Path, out_dir: str | Path, k: int = 5, max_queries: int | None = None,
        seed: int = 0, device: str = "cpu", corpus: str | Path | None = None, duplicates: str = "both",
        only: tuple[str, ...] | None = None, bootstrap: int = 2000) -> dict[str, Any]:
    """Score every drafting method; ``duplicates``: ``keep`` | ``exclude`` | ``both``.

    ``bootstrap`` resamples (seeded with ``seed``) give the intervals against copy-nearest (when it is
    among the methods; 0: none)."""
    if duplicates not in ("keep", "exclude", "both"):
        raise ValueError(f"duplicates must be keep, exclude or both, not {duplicates!r}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    queries_all = [s for s in read_manifest(manifest) if s.report]
    pool: list[Study] = [s for s in read_manifest(corpus) if s.report] if corpus else queries_all
    q_reports = [s.report or "" for s in queries_all]
    c_reports = [s.report or "" for s in pool]
    c_emb = _embed(c_reports, device, out / ".cache")
    q_emb = c_emb if corpus is None else _embed(q_reports, device, out / ".cache")
    rng = np.random.default_rng(seed)
    queries = np.arange(len(queries_all))
    if max_queries and len(queries) > max_queries:
        queries = np.sort(rng.choice(queries, max_queries, replace=False))

    by_patient: dict[str, list[int]] = {}
    by_id: dict[str, list[int]] = {}
    by_text: dict[str, list[int]] = {}
    for j, s in enumerate(pool):
        if s.patient_id:
            by_patient.setdefault(s.patient_id, []).append(j)
        by_id.setdefault(s.study_id, []).append(j)
        by_text.setdefault(normalise(c_reports[j]), []).append(j)
    counts = {"queries": int(len(queries)), "corpus": len(pool),
              "corpus_distinct_texts": len(by_text),
              "corpus_studies_sharing_text": sum(len(v) for v in by_text.values() if len(v) > 1),
              "queries_with_same_patient_in_corpus": 0, "queries_with_exact_twin": 0,
              "exact_twins_removed": 0, "patient_ids": any(s.patient_id for s in pool)}

    tax = default_taxonomy()
    ex = EntityExtractor(tax)
    builder = ContextBuilder()
    checker = ConsistencyChecker(tax)
    variants = {m: f for m, f in methods().items() if not only or m in only}
    settings = ["all", "no-duplicates"] if duplicates == "both" else (
        ["all"] if duplicates == "keep" else ["no-duplicates"])
    acc = {st: _Scores.new(variants) for st in settings}
    example = None
    for qi in queries:
        q = queries_all[qi]
        sims = c_emb @ q_emb[qi]
        excluded = set(by_id.get(q.study_id, []))
        if q.patient_id and q.patient_id in by_patient:
            counts["queries_with_same_patient_in_corpus"] += 1
            excluded |= set(by_patient[q.patient_id])
        twins = set(by_text.get(normalise(q_reports[qi]), [])) - excluded
        counts["queries_with_exact_twin"] += bool(twins)
        counts["exact_twins_removed"] += len(twins)
        gold = set(as_labels(labels_of(q_reports[qi], ex, tax)))
        ref = tokens(q_reports[qi])
        ref_contra = len(checker.check_text(q_reports[qi]))
        for st in settings:
            s2 = sims.copy()
            drop = excluded | (twins if st == "no-duplicates" else set())
            if drop:
                s2[list(drop)] = -np.inf
            top = np.argsort(-s2, kind="stable")[:k]
            ctx = builder.build([(pool[j].study_id, float(s2[j]), c_reports[j]) for j in top])
            a = acc[st]
            a.refs.append(ref)
            a.ref_contradictions += ref_contra
            for m, fn in variants.items():
                d = fn(ctx)
                a.add(m, d, gold, ref, ex, tax, checker)
                if example is None and m == "edit-consensus" and st == settings[-1] and len(ctx.cases) >= 3:
                    example = {"held_out": q.study_id, "draft": d.render()}
    result: dict[str, Any] = {"manifest": str(manifest), "corpus": str(corpus) if corpus else None, "k": k,
                              "counts": counts, "settings": {}, "seconds": 0.0}
    for st in settings:
        result["settings"][st] = acc[st].summary(BASELINE, bootstrap, seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["example"] = example
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft.json").write_text(json.dumps(result, indent=1))
    return result


@dataclass
class _Scores:
    ent: dict[str, _Acc]
    ent_items: dict[str, list[tuple[int, int, int]]]  # per report: entity tp, fp, fn
    per_finding: dict[str, dict[str, _Acc]]
    hyps: dict[str, list[list[str]]]
    rouge: dict[str, list[float]]
    cited: dict[str, list[float]]
    ratio: dict[str, list[float]]
    contradictions: dict[str, int]
    refs: list[list[str]]
    ref_contradictions: int = 0

    @classmethod
    def new(cls, variants: dict[str, Any]) -> _Scores:
        return cls({m: _Acc() for m in variants}, {m: [] for m in variants}, {m: {} for m in variants}, {m: [] for m in variants},
                   {m: [] for m in variants}, {m: [] for m in variants}, {m: [] for m in variants},
                   {m: 0 for m in variants}, [])

    def add(self, m: str, d: Draft, gold: set[Label], ref: list[str], ex: EntityExtractor, tax: Any,
            checker: ConsistencyChecker) -> None:
        pred = set(as_labels(labels_of(d.text(), ex, tax)))
        self.ent[m].add(gold, pred)
        self.ent_items[m].append((len(gold & pred), len(pred - gold), len(gold - pred)))
        for f in {lab.finding for lab in gold | pred}:
            self.per_finding[m].setdefault(f, _Acc()).add({x for x in gold if x.finding == f},
                                                         {x for x in pred if x.finding == f})
        hyp = tokens(d.text())
        self.hyps[m].append(hyp)
        self.rouge[m].append(rouge_l(ref, hyp))
        self.cited[m].append(d.citation_share())
        self.ratio[m].append(len(hyp) / max(1, len(ref)))
        self.contradictions[m] += len(checker.check(d))

    def summary(self, baseline: str = "copy-nearest", bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
        n = max(1, len(self.refs))
        out: dict[str, Any] = {"drafts": len(self.refs),
                               "reference_contradictions_per_100": round(100 * self.ref_contradictions / n, 2),
                               "methods": {}}
        refs = [" ".join(r) for r in self.refs]
        per_report: dict[str, ReportStats] = {}
        for m in self.ent:
            hyps = [" ".join(h) for h in self.hyps[m]]
            coco, rouge = _coco(refs, hyps)
            per_report[m] = ReportStats.of(refs, hyps, self.ent_items[m], rouge)
            out["methods"][m] = {
                "entity": self.ent[m].prf(), **coco,
                "bleu4_own": round(bleu4(self.refs, self.hyps[m]), 4),
                "rougeL_own": round(float(np.mean(self.rouge[m])) if self.rouge[m] else 0.0, 4),
                "contradictions_per_100": round(100 * self.contradictions[m] / n, 2),
                "length_ratio": round(float(np.mean(self.ratio[m])) if self.ratio[m] else 0.0, 3),
                "cited_sentence_share": round(float(np.mean(self.cited[m])) if self.cited[m] else 0.0, 4),
                "per_finding_f1": {f: acc.prf()["f1"] for f, acc in sorted(self.per_finding[m].items())
                                   if acc.tp + acc.fn >= 10},
            }
        if bootstrap > 0 and baseline in per_report and self.refs:
            out["vs_copy_nearest"] = {
                "baseline": baseline, "resamples": bootstrap, "seed": seed, "unit": "held-out report",
                "interval": "95% paired bootstrap (2.5th-97.5th percentiles), the same resamples for every "
                            "method and metric; [difference, low, high] of method - baseline",
                "entity_f1": "micro F1 recomputed per resample from per-report tp/fp/fn",
                "bleu4": "pycocoevalcap corpus BLEU-4 recomputed per resample from per-report n-gram counts",
                "rougeL": "pycocoevalcap ROUGE-L: mean of per-report differences",
                "cider": "no interval: its idf comes from the evaluated references themselves",
                "methods": {m: {k: [round(v, 4) + 0.0 for v in iv] for k, iv in
                                paired_intervals(per_report[m], per_report[baseline], bootstrap, seed).items()}
                            for m in per_report if m != baseline},
            }
        return out


BASELINE = "copy-nearest"  # what the bootstrap intervals compare every method with


def format_intervals(vs: dict[str, Any]) -> list[str]:
    """The intervals of ``summary()["vs_copy_nearest"]`` as lines ("*": the interval excludes 0)."""
    lines = [f"method - {vs['baseline']}, paired bootstrap 95% CI ({vs['resamples']} resamples of the "
             f"{vs['unit']}s, seed {vs['seed']}; entity F1 and BLEU-4 corpus-level, recomputed per "
             f"resample; ROUGE-L mean per report; no CIDEr CI: its idf is fitted on the references)",
             f"{'method':17s} {'d entF1 [95% CI]':>26s} {'d B-4 [95% CI]':>26s} {'d R-L [95% CI]':>26s}"]

    def cell(iv: list[float]) -> str:
        star = "*" if iv[1] > 0 or iv[2] < 0 else " "
        return f"{iv[0]:+.4f} [{iv[1]:+.4f}, {iv[2]:+.4f}]{star}"

    for m, x in vs["methods"].items():
        lines.append(f"{m:17s} {cell(x['entity_f1']):>26s} {cell(x['bleu4']):>26s} {cell(x['rougeL']):>26s}")
    return lines


def format_table(result: dict[str, Any]) -> str:
    c = result["counts"]
    lines = [f"{c['queries']} queries, corpus {c['corpus']} studies ({c['corpus_distinct_texts']} distinct texts; "
             f"{c['corpus_studies_sharing_text']} share their text with another); queries with an exact-text twin "
             f"in the corpus: {c['queries_with_exact_twin']} ({c['exact_twins_removed']} twins); with the same "
             f"patient in the corpus: {c['queries_with_same_patient_in_corpus']}"
             + ("" if c["patient_ids"] else " (no patient ids in the corpus)")]
    for st, r in result["settings"].items():
        lines.append("")
        lines.append(f"[{st}] {r['drafts']} drafts; contradictions per 100 reference reports: "
                     f"{r['reference_contradictions_per_100']}")
        lines.append(f"{'method':17s} {'entP':>6s} {'entR':>6s} {'entF1':>6s} {'B-1':>6s} {'B-2':>6s} {'B-3':>6s} "
                     f"{'B-4':>6s} {'R-L':>6s} {'CIDEr':>6s} {'contra':>6s} {'len':>5s} {'cited':>5s}")
        for m, x in r["methods"].items():
            e = x["entity"]
            lines.append(f"{m:17s} {e['precision']:6.3f} {e['recall']:6.3f} {e['f1']:6.3f} {x['bleu1']:6.3f} "
                         f"{x['bleu2']:6.3f} {x['bleu3']:6.3f} {x['bleu4']:6.3f} {x['rougeL']:6.3f} "
                         f"{x['cider']:6.3f} {x['contradictions_per_100']:6.1f} {x['length_ratio']:5.2f} "
                         f"{x['cited_sentence_share']:5.2f}")
        if "vs_copy_nearest" in r:
            lines.append("")
            lines.extend(format_intervals(r["vs_copy_nearest"]))
    return "\n".join(lines)
