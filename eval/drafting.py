"""``medrag eval draft``: leave-one-out drafting quality on a manifest with reports.

Each query study's report is held out; its analog cases are retrieved by report embedding
(MiniLM) from all *other* studies (report-only mode: no pixels needed), a draft is written from
them, and the draft is compared with the held-out report:

* entity P/R/F1: (coarse anatomy, finding, status) labels from our extractor, negation-aware
  ("no effusion" only matches "no effusion"), micro-averaged, plus F1 per finding;
* BLEU-4 (corpus, with brevity penalty, add-one smoothing for n > 1) and ROUGE-L (LCS F-measure);
* the share of draft sentences that carry a citation.

Baseline in the same run: the single nearest report copied verbatim (copy-nearest).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.manifest import read_manifest
from retrieval.entities import EntityExtractor
from retrieval.rag.context import ContextBuilder, labels_of
from retrieval.rag.extractive import ExtractiveGenerator, copy_nearest
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


def rouge_l(ref: list[str], hyp: list[str]) -> float:
    if not ref or not hyp:
        return 0.0
    prev = [0] * (len(hyp) + 1)
    for a in ref:
        cur = [0]
        for j, b in enumerate(hyp):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    beta2 = 1.2 ** 2
    return (1 + beta2) * p * r / (r + beta2 * p)


@dataclass
class _Acc:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, gold: set[str], pred: set[str]) -> None:
        self.tp += len(gold & pred)
        self.fp += len(pred - gold)
        self.fn += len(gold - pred)

    def prf(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4)}


def run(manifest: str | Path, out_dir: str | Path, k: int = 5, max_queries: int | None = None,
        seed: int = 0, device: str = "cpu") -> dict:
    from eval.retrieval import text_oracle

    t0 = time.perf_counter()
    studies = [s for s in read_manifest(manifest) if s.report]
    reports = [s.report or "" for s in studies]
    emb = text_oracle(reports, device)(None)
    rng = np.random.default_rng(seed)
    queries = np.arange(len(studies))
    if max_queries and len(queries) > max_queries:
        queries = np.sort(rng.choice(queries, max_queries, replace=False))
    same_patient: dict[str, list[int]] = {}
    for j, s in enumerate(studies):
        if s.patient_id:
            same_patient.setdefault(s.patient_id, []).append(j)
    tax = default_taxonomy()
    ex = EntityExtractor(tax)
    builder = ContextBuilder()
    gen = ExtractiveGenerator()
    methods = ("extractive", "copy-nearest")
    ent = {m: _Acc() for m in methods}
    per_finding: dict[str, dict[str, _Acc]] = {m: {} for m in methods}
    refs: list[list[str]] = []
    hyps: dict[str, list[list[str]]] = {m: [] for m in methods}
    rouge: dict[str, list[float]] = {m: [] for m in methods}
    cited: dict[str, list[float]] = {m: [] for m in methods}
    example = None
    for qi in queries:
        sims = emb @ emb[qi]
        sims[qi] = -np.inf
        patient = studies[qi].patient_id
        if patient:  # never draft from the same patient's other studies
            sims[same_patient[patient]] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        ctx = builder.build([(studies[j].study_id, float(sims[j]), reports[j]) for j in top])
        drafts = {"extractive": gen.generate(ctx), "copy-nearest": copy_nearest(ctx)}
        gold = {f"{key}|{st}" for key, st in labels_of(reports[qi], ex, tax).items()}
        refs.append(tokens(reports[qi]))
        for m, d in drafts.items():
            pred = {f"{key}|{st}" for key, st in labels_of(d.text(), ex, tax).items()}
            ent[m].add(gold, pred)
            for f in {lab.split("|")[1] for lab in gold | pred}:
                per_finding[m].setdefault(f, _Acc()).add({x for x in gold if x.split("|")[1] == f},
                                                          {x for x in pred if x.split("|")[1] == f})
            hyps[m].append(tokens(d.text()))
            rouge[m].append(rouge_l(refs[-1], hyps[m][-1]))
            cited[m].append(d.citation_share())
        if example is None and len(ctx.cases) >= 3:
            example = {"held_out": studies[qi].study_id, "report": reports[qi], "draft": drafts["extractive"].render()}
    result: dict[str, Any] = {"manifest": str(manifest), "queries": int(len(queries)), "k": k, "seconds": 0.0,
                              "methods": {}}
    for m in methods:
        result["methods"][m] = {
            "entity": ent[m].prf(), "bleu4": round(bleu4(refs, hyps[m]), 4),
            "rougeL": round(float(np.mean(rouge[m])), 4), "cited_sentence_share": round(float(np.mean(cited[m])), 4),
            "per_finding_f1": {f: acc.prf()["f1"] for f, acc in sorted(per_finding[m].items())
                               if acc.tp + acc.fn >= 10},
        }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["example"] = example
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft.json").write_text(json.dumps(result, indent=1))
    return result


def format_table(result: dict) -> str:
    lines = [f"{'method':14s} {'entP':>6s} {'entR':>6s} {'entF1':>6s} {'BLEU-4':>7s} {'ROUGE-L':>8s} {'cited':>6s}"]
    for m, r in result["methods"].items():
        e = r["entity"]
        lines.append(f"{m:14s} {e['precision']:6.3f} {e['recall']:6.3f} {e['f1']:6.3f} {r['bleu4']:7.4f} "
                     f"{r['rougeL']:8.4f} {r['cited_sentence_share']:6.3f}")
    findings = sorted(set().union(*[r["per_finding_f1"] for r in result["methods"].values()]))
    lines.append("")
    lines.append(f"{'per-finding F1':24s} " + " ".join(f"{m:>14s}" for m in result["methods"]))
    for f in findings:
        lines.append(f"{f:24s} " + " ".join(f"{result['methods'][m]['per_finding_f1'].get(f, float('nan')):14.3f}"
                                          for m in result["methods"]))
    return "\n".join(lines)
