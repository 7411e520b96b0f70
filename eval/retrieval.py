"""``medrag eval retrieval``: retrieval quality against report-mined similarity (RadIR protocol).

For each setting (unconditioned, and each anatomy ``a``) and each method, every query study ranks
all other studies. Ground truth is s / s_a from :mod:`retrieval.similarity`.

* Recall@K: share of queries with a study of s > 0.9 in the top K (the query itself excluded).
  Queries with no such study anywhere are dropped and counted (``dropped_no_positive``).
* NDCG@K with s as the gain; RateScore@K: mean s of the top K, with the oracle's (the K best
  achievable) as the upper bound.
* Per-anatomy settings only use queries whose report states something about ``a``
  (``dropped_silent``): two reports silent about the heart agree trivially.

Methods are computed in the same run on the same queries: random ranking, raw-pixel kNN,
an untrained encoder, the encoders under test, and a text-only oracle (the report's own MiniLM
embedding, restricted to the sentences about ``a`` when conditioned): the ceiling for images.
In report-only mode (no pixels) the image methods are skipped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from indexer.images import ImageLoadError, load_image
from indexer.manifest import Study, read_manifest, resolve_image
from retrieval.encoders.base import l2_normalise
from retrieval.entities import EntityExtractor
from retrieval.similarity import ReportMatrix, relevant_anatomies
from retrieval.taxonomy import default_taxonomy

Embedder = Callable[[str | None], np.ndarray]  # setting (anatomy or None) -> (n, d) unit rows


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (1, 5, 10, 50)
    ndcg_ks: tuple[int, ...] = (10, 50)
    rate_k: int = 10
    threshold: float = 0.9  # s above this counts as a hit for Recall@K
    anatomies: tuple[str, ...] = ("lung", "left lung", "right lung", "heart", "pleura")
    max_queries: int | None = None  # evaluate a seeded sample of queries (all when None)
    seed: int = 0


@dataclass
class MethodScores:
    recall: dict[str, float] = field(default_factory=dict)
    ndcg: dict[str, float] = field(default_factory=dict)
    ratescore: float = 0.0


@dataclass
class SettingResult:
    setting: str
    queries: int
    dropped_no_positive: int
    dropped_silent: int
    oracle_ratescore: float
    methods: dict[str, MethodScores] = field(default_factory=dict)


def rank_metrics(sim: np.ndarray, scores: np.ndarray, queries: np.ndarray, cfg: EvalConfig
                 ) -> tuple[MethodScores, int, float]:
    """Metrics for ``scores`` (len(queries), n) against true ``sim`` (same shape).

    Returns the scores, the number of queries dropped for having no positive, and the oracle
    RateScore. Column ``queries[r]`` of row ``r`` is the query itself and is excluded.
    """
    rows = np.arange(len(queries))
    s = sim.copy()
    sc = scores.astype(np.float64).copy()
    s[rows, queries] = -1.0
    sc[rows, queries] = -np.inf
    kmax = max(max(cfg.ks), max(cfg.ndcg_ks), cfg.rate_k)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :kmax]
    gains = np.take_along_axis(s, order, axis=1).clip(min=0)
    has_pos = np.asarray((s > cfg.threshold).any(1))
    out = MethodScores()
    for k in cfg.ks:
        hit = np.asarray((gains[:, :k] > cfg.threshold).any(1))
        out.recall[f"@{k}"] = float(hit[has_pos].mean()) if has_pos.any() else float("nan")
    ideal = -np.sort(-s.clip(min=0), axis=1)[:, :kmax]
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    for k in cfg.ndcg_ks:
        g, i = gains[:, :k], ideal[:, :k]  # fewer columns than k on a small corpus
        dcg = (g * disc[: g.shape[1]]).sum(1)
        idcg = (i * disc[: i.shape[1]]).sum(1)
        out.ndcg[f"@{k}"] = float(np.mean(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 1.0)))
    out.ratescore = float(gains[:, : cfg.rate_k].mean())
    oracle = float(ideal[:, : cfg.rate_k].mean())
    return out, int((~has_pos).sum()), oracle


def evaluate(reports: Sequence[str | None], methods: dict[str, Embedder], cfg: EvalConfig) -> list[SettingResult]:
    matrix = ReportMatrix(reports)
    n = len(reports)
    rng = np.random.default_rng(cfg.seed)
    results = []
    for setting in (None, *cfg.anatomies):
        informative = matrix.informative(setting) if setting else np.ones(n, bool)
        queries = np.flatnonzero(informative)
        if cfg.max_queries and len(queries) > cfg.max_queries:
            queries = np.sort(rng.choice(queries, cfg.max_queries, replace=False))
        sim = matrix.similarity(setting, queries)
        res = SettingResult(setting or "all", len(queries), 0, int(n - informative.sum()), 0.0)
        for name, embed in methods.items():
            if name == "random":
                scores = rng.random((len(queries), n))
            else:
                emb = embed(setting)
                scores = emb[queries] @ emb.T
            m, dropped, oracle = rank_metrics(sim, scores, queries, cfg)
            res.methods[name] = m
            res.dropped_no_positive, res.oracle_ratescore = dropped, oracle
        res.queries = len(queries) - res.dropped_no_positive
        results.append(res)
    return results


# ---- method builders ---------------------------------------------------------------------------
def _setting_texts(reports: Sequence[str | None]):
    """setting -> each report's text, restricted to its sentences about the anatomy when conditioned."""
    ex = EntityExtractor()
    tax = default_taxonomy()

    def texts(setting: str | None) -> list[str]:
        rel = relevant_anatomies(tax.anatomy(setting).name, tax) if setting else None
        out = []
        for r in reports:
            if rel is None or not r:
                out.append(r or "")
                continue
            kept = [s.text for s, ents in ex.sentence_entities(r) if any(e.anatomy in rel for e in ents)]
            out.append(" ".join(kept) if kept else "")
        return out

    return texts


def text_oracle(reports: Sequence[str | None], device: str = "cpu") -> Embedder:
    """MiniLM embedding of each report (of its sentences about the anatomy, when conditioned)."""
    from retrieval.encoders import create_encoder

    enc = create_encoder("minilm", device=device)
    texts_for = _setting_texts(reports)
    cache: dict[str | None, np.ndarray] = {}

    def embed(setting: str | None) -> np.ndarray:
        if setting not in cache:
            texts = texts_for(setting)
            out = np.zeros((len(texts), enc.dim), np.float32)
            for i in range(0, len(texts), 64):
                out[i:i + 64] = enc.encode_texts(texts[i:i + 64])
            cache[setting] = out
        return cache[setting]

    return embed


def tfidf_baseline(reports: Sequence[str | None], max_terms: int = 4096) -> Embedder:
    """Bag-of-words TF-IDF (unigrams + bigrams, L2-normalised) of the same texts as the oracle:
    the lexical baseline a report embedding has to beat."""
    import re
    from collections import Counter

    texts_for = _setting_texts(reports)
    token = re.compile(r"[a-z]+")

    def grams(text: str) -> list[str]:
        words = [w for w in token.findall(text.lower()) if w != "xxxx"]
        return words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]

    def embed(setting: str | None) -> np.ndarray:
        docs = [Counter(grams(t)) for t in texts_for(setting)]
        df = Counter(g for d in docs for g in d)
        vocab = {g: i for i, (g, _) in enumerate(df.most_common(max_terms))}
        idf = np.log((1 + len(docs)) / (1 + np.array([df[g] for g in vocab], np.float32))) + 1
        out = np.zeros((len(docs), len(vocab)), np.float32)
        for r, d in enumerate(docs):
            for g, c in d.items():
                if g in vocab:
                    out[r, vocab[g]] = (1 + np.log(c)) * idf[vocab[g]]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)

    return embed


def image_method(encoder, studies: Sequence[Study], images: list[list[np.ndarray]], batch: int = 64) -> Embedder:
    """Mean image embedding per study, per setting (conditioned when the encoder supports it)."""
    cache: dict[str | None, np.ndarray] = {}
    flat = [img for imgs in images for img in imgs]
    owner = np.repeat(np.arange(len(images)), [len(x) for x in images])

    def embed(setting: str | None) -> np.ndarray:
        anatomy = setting if setting and encoder.supports_anatomy(setting) else None
        if anatomy not in cache:
            rows = np.concatenate([encoder.encode_images(flat[i:i + batch], anatomy=anatomy)
                                   for i in range(0, len(flat), batch)])
            out = np.zeros((len(images), rows.shape[1]), np.float32)
            np.add.at(out, owner, rows)
            cache[anatomy] = l2_normalise(out)
        return cache[anatomy]

    return embed


def load_study_images(manifest: str | Path, studies: Sequence[Study], max_side: int = 256) -> list[list[np.ndarray]]:
    """Decode each study's images once (downsampled to ``max_side``) for all image methods."""
    from retrieval.encoders.preprocess import resize

    out = []
    for s in studies:
        imgs = []
        for rel in s.images:
            try:
                arr = load_image(resolve_image(manifest, rel))
            except ImageLoadError:
                continue
            imgs.append(resize(arr, max_side) if max(arr.shape) > max_side else arr)
        out.append(imgs)
    return out


def run(manifest: str | Path, out_dir: str | Path, encoders: dict[str, tuple[str, str | None]],
        cfg: EvalConfig, reports_only: bool = False, device: str = "cpu") -> dict:
    """Evaluate every method on one manifest; write ``retrieval.json`` and ``recall_at_k.png``."""
    from retrieval.encoders import create_encoder

    t0 = time.perf_counter()
    studies = [s for s in read_manifest(manifest) if s.report]
    methods: dict[str, Embedder] = {"random": lambda _s: np.zeros((0, 0))}
    if not reports_only:
        images = load_study_images(manifest, studies)
        keep = [i for i, imgs in enumerate(images) if imgs]
        studies, images = [studies[i] for i in keep], [images[i] for i in keep]
        methods["raw-pixel kNN"] = image_method(create_encoder("pixels", size=32), studies, images)
        methods["untrained medrag-native"] = image_method(
            create_encoder("medrag-native", allow_random=True, seed=cfg.seed, device=device), studies, images)
        for name, (family, ckpt) in encoders.items():
            methods[name] = image_method(create_encoder(family, checkpoint=ckpt, device=device), studies, images)
    reports = [s.report for s in studies]
    methods["report TF-IDF"] = tfidf_baseline(reports)
    methods["text oracle (report MiniLM)" if not reports_only else "report MiniLM"] = text_oracle(reports, device)
    results = evaluate(reports, methods, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"manifest": str(manifest), "studies": len(studies), "reports_only": reports_only,
               "config": asdict(cfg), "seconds": round(time.perf_counter() - t0, 1),
               "settings": [asdict(r) for r in results]}
    (out / "retrieval.json").write_text(json.dumps(payload, indent=1))
    plot_recall(results, cfg, out / "recall_at_k.png")
    return payload


def plot_recall(results: list[SettingResult], cfg: EvalConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results, strict=False):
        for name, m in res.methods.items():
            ax.plot(list(cfg.ks), [m.recall[f"@{k}"] for k in cfg.ks], marker="o", label=name)
        ax.set_title(f"{res.setting} (n={res.queries})")
        ax.set_xscale("log")
        ax.set_xticks(list(cfg.ks), [str(k) for k in cfg.ks])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(payload: dict) -> str:
    """A plain-text table: one row per (setting, method)."""
    lines = [f"{'setting':12s} {'method':30s} {'n':>5s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s} {'R@50':>6s} "
             f"{'NDCG@10':>8s} {'NDCG@50':>8s} {'Rate@10':>8s} {'oracle':>7s}"]
    for st in payload["settings"]:
        for name, m in st["methods"].items():
            r = m["recall"]
            lines.append(f"{st['setting']:12s} {name:30s} {st['queries']:5d} {r['@1']:6.3f} {r['@5']:6.3f} "
                         f"{r['@10']:6.3f} {r['@50']:6.3f} {m['ndcg']['@10']:8.3f} {m['ndcg']['@50']:8.3f} "
                         f"{m['ratescore']:8.3f} {st['oracle_ratescore']:7.3f}")
    return "\n".join(lines)
