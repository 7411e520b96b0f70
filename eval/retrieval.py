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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from indexer.manifest import read_manifest
from retrieval.encoders.base import l2_normalise
from retrieval.imaging.images import ImageLoadError, load_image
from retrieval.imaging.paths import manifest_image
from retrieval.metrics import Embedder, MethodScores, RankConfig, rank_metrics
from retrieval.records import Study
from retrieval.report_text import setting_texts, text_oracle
from retrieval.similarity import ReportMatrix


@dataclass(frozen=True)
class EvalConfig(RankConfig):
    anatomies: tuple[str, ...] = ("lung", "left lung", "right lung", "heart", "pleura")
    max_queries: int | None = None  # evaluate a seeded sample of queries (all when None)
    seed: int = 0


@dataclass
class SettingResult:
    setting: str
    queries: int
    dropped_no_positive: int
    dropped_silent: int
    oracle_ratescore: float
    methods: dict[str, MethodScores] = field(default_factory=dict)


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
def tfidf_baseline(reports: Sequence[str | None], max_terms: int = 4096) -> Embedder:
    """Bag-of-words TF-IDF (unigrams + bigrams, L2-normalised) of the same texts as the oracle:
    the lexical baseline a report embedding has to beat.

    scikit-learn's ``TfidfVectorizer``: lower-cased ``[a-z]+`` tokens without the IU X-ray
    anonymisation token ``xxxx`` (removed before bigrams are formed), sublinear tf ``1 + ln c``,
    smoothed idf ``ln((1 + n) / (1 + df)) + 1``. The vocabulary is the ``max_terms`` terms found
    in the most documents (sklearn's own ``max_features`` would rank by total count instead; ties
    here go alphabetically), and rows are L2-normalised over it. Returns dense float32 rows; a
    text with no kept term is a zero row.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    texts_for = setting_texts(reports)

    def embed(setting: str | None) -> np.ndarray:
        texts = texts_for(setting)
        vec = TfidfVectorizer(lowercase=True, token_pattern=r"[a-z]+", stop_words=["xxxx"], ngram_range=(1, 2),
                              sublinear_tf=True, smooth_idf=True, norm=None, dtype=np.float32)
        if not any(vec.build_analyzer()(t) for t in texts):  # sklearn refuses an empty vocabulary
            return np.zeros((len(texts), 0), np.float32)
        x = vec.fit_transform(texts).tocsr()  # columns in alphabetical order of the terms
        if x.shape[1] > max_terms:
            df = np.bincount(x.indices, minlength=x.shape[1])  # one stored entry per (document, term)
            x = x[:, np.sort(np.argsort(-df, kind="stable")[:max_terms])]
        return np.asarray(normalize(x, norm="l2").toarray(), dtype=np.float32)

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
                arr = load_image(manifest_image(manifest, rel))
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
