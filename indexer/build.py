"""Build an index from a manifest: read -> decode -> mine entities -> encode -> write -> publish.

Bad input never stops a build: an unreadable image or corrupt DICOM is skipped with a message
naming the file, a study without a report is indexed without report vectors, and the end report
lists everything skipped. Nothing is visible to readers until the final atomic publish, so a
killed build leaves the previous version serving.

Builds are resumable: studies are encoded in segments kept under the index's state directory
(:mod:`indexer.segments`); a rerun, ``add_studies`` and ``delete_studies`` encode only what is
not encoded yet, then assemble all segments in manifest order into a new published version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from indexer.manifest import ManifestError, read_manifest, write_manifest
from indexer.phi import image_ref, is_image_ref
from indexer.segments import (
    CorruptSegment,
    Segment,
    SegmentStore,
    build_lock,
    fingerprint,
    study_key,
)
from retrieval.encoders import create_encoder, is_joint
from retrieval.entities import EntityExtractor, study_labels
from retrieval.imaging.images import ImageLoadError, load_image, pixel_key
from retrieval.imaging.paths import manifest_image
from retrieval.index import (
    IMAGE,
    REPORT,
    REPORT_JOINT,
    IndexMeta,
    anatomy_space,
    open_writer,
    parse_uri,
)
from retrieval.index.base import date_to_day
from retrieval.records import LabelKey, Mention, Payload, Study, as_labels
from retrieval.settings import env
from retrieval.storage import atomic_write_bytes
from retrieval.taxonomy import Taxonomy, default_taxonomy

log = logging.getLogger(__name__)
REPORT_SNIPPET = 4000  # characters of report kept in the payload
DECODE_WORKERS = 2  # threads decoding images while the encoder runs (0 or 1: one thread)
DECODE_AHEAD = 2  # batches decoded ahead of the encoder (bounds memory: ahead x batch images)
MAX_REPAIRS = 8  # damaged segments re-encoded in one build before it gives up (a failing disk)


@dataclass(frozen=True)
class BuildConfig:
    encoder: str = "pixels"  # image encoder family (registry name)
    checkpoint: str | None = None  # local weights for the image encoder
    text_encoder: str | None = "minilm"  # report embeddings (None: no report space)
    text_checkpoint: str | None = None
    conditioning: tuple[str, ...] | None = None  # None: the taxonomy's conditioning anatomies
    index_kind: str | None = None  # flat | hnsw | ivf; None: the backend's default
    batch_size: int = 16  # images per encoder call
    device: str = "cpu"
    allow_random_init: bool = False  # medrag-native without a checkpoint (baselines only)


@dataclass
class BuildReport:
    uri: str
    version: str = ""
    studies: int = 0
    points: int = 0
    images: int = 0
    reports: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    reused: int = 0  # studies whose vectors came from earlier (possibly killed) runs
    segments_written: int = 0
    quarantined: list[str] = field(default_factory=list)  # damaged segments moved aside and re-encoded
    removed: list[str] = field(default_factory=list)  # study ids the previous version served and this one does not


class RemovalRefused(ManifestError):
    """A build would publish without studies the served version has (an image file disappeared,
    a study left the manifest); nothing was published. ``--allow-removals`` lets it."""

    def __init__(self, removed: list[str]) -> None:
        self.removed = removed
        names = ", ".join(removed[:10]) + (f" and {len(removed) - 10} more" if len(removed) > 10 else "")
        super().__init__(f"this build would remove {len(removed)} studies the index serves now ({names}): their "
                         "images are gone or unreadable, or they left the manifest; nothing was published "
                         "(rerun with --allow-removals to remove them)")


def payload_for(study: Study, image: str | None, view: str | None, tax: Taxonomy,
                extractor: EntityExtractor, image_key: str | None = None) -> Payload:
    """The payload of one point: identity, metadata, report and its mined entities.

    Anatomy-finding pairs are listed for the anatomy and all its ancestors, so a filter on
    "lung:effusion" matches a report that says "left lower lobe effusion". ``image`` (the
    absolute path) becomes an opaque reference (:func:`indexer.phi.image_ref`): export paths
    name patients, and a payload reaches segments, the index, search output and API answers.
    """
    labels = study_labels(study, extractor)
    present = {k for k, s in labels.items() if s == "present"}
    anyp = {k for k, s in labels.items() if s in ("present", "uncertain")}

    def expand(pairs: set[LabelKey]) -> list[str]:
        return sorted({f"{a}:{f}" for anat, f in pairs for a in tax.ancestors(anat)})

    report = (study.report or "")[:REPORT_SNIPPET] or None
    # where the stored text states each label, mined once here (answers highlight from these)
    mentions = [Mention(e.span[0], e.span[1], e.anatomy, e.finding, e.status) for e in extractor.extract(report)]
    return Payload(
        study_id=study.study_id,
        patient_id=study.patient_id,
        study_date=study.study_date,
        study_day=date_to_day(study.study_date) if study.study_date else None,
        modality=study.modality,
        image=(image if is_image_ref(image) else image_ref(image)) if image else None,
        image_key=image_key,
        view=view,
        report=report,
        has_report=bool(study.report),
        findings=sorted({f for _, f in present}),
        findings_any=sorted({f for _, f in anyp}),
        findings_absent=sorted({f for (_, f), s in labels.items() if s == "absent"}),
        anatomy_findings=expand(present),
        anatomy_findings_any=expand(anyp),
        entities=as_labels(labels),
        labels=study.labels,
        mentions=mentions,
    )


def state_dir_for(uri: str) -> Path:
    """Where a build keeps its segments, lock and record of what was published."""
    loc = parse_uri(uri)
    if loc.path is not None:
        return loc.path / ".build"
    return env().state_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]


def private_dir_for(uri: str) -> Path:
    """The index's private state: what a rebuild needs that identifies patients or their files
    (the published studies with their absolute source paths, the manifest's path, pending
    merges). It lives under ``$MEDRAG_STATE/private/<hash of the index location>``, created 0700,
    never inside the index folder an admin copies to a server (docs/operations.md, "Private
    state"). The index folder keeps only what serving needs: payloads with opaque image
    references, pseudonymised patients, shifted dates, de-identified text."""
    loc = parse_uri(uri)
    ident = str(loc.path.resolve()) if loc.path is not None else uri
    folder = env().state_dir.resolve() / "private" / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if loc.path is not None and (folder == loc.path.resolve() or loc.path.resolve() in folder.parents):
        raise ManifestError(f"MEDRAG_STATE ({env().state_dir}) is inside the index folder {loc.path}: "
                            "private build state must not be copied with the index; set MEDRAG_STATE elsewhere")
    return folder


def _private(uri: str) -> Path:
    """:func:`private_dir_for`, created (and its parent) with mode 0700."""
    folder = private_dir_for(uri)
    for d in (folder.parent, folder):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.chmod(0o700)  # mkdir's mode is masked by the umask
    return folder


@contextmanager
def writer_state(uri: str, work_dir: str | Path | None = None) -> Iterator[Path]:
    """The build's state folder, locked for one writer.

    The lock that decides who may publish lives with the index (:func:`state_dir_for`), whatever
    ``--work-dir`` says: two writers with different work dirs once both published. A separate
    work dir (segments elsewhere, e.g. on scratch disk) is locked as well.
    """
    home = state_dir_for(uri)
    state = Path(work_dir) if work_dir else home
    with build_lock(home):
        if state.resolve() == home.resolve():
            yield state
        else:
            with build_lock(state):
                yield state


def build_index(manifest: str | Path, uri: str, cfg: BuildConfig, progress: bool = True,
                work_dir: str | Path | None = None, segment_size: int = 256, engine: str = "local",
                address: str | None = None, workers: int | None = None,
                allow_removals: bool = False) -> BuildReport:
    """Encode what is not encoded yet (resumable), assemble, publish atomically.

    A rerun after a crash or SIGKILL skips every finished segment; a changed manifest encodes
    only new or changed studies. One build per index at a time (lock). A build that would serve
    fewer studies than the published version (an image gone, a study out of the manifest) raises
    :class:`RemovalRefused` naming them and publishes nothing, unless ``allow_removals``; the
    report lists what was removed either way.
    """
    t0 = time.perf_counter()
    report = BuildReport(uri=uri)
    with writer_state(uri, work_dir) as state:
        errors: list[str] = []
        studies = list(read_manifest(manifest, errors=errors))
        report.skipped.extend(errors)
        _build(studies, manifest, uri, cfg, state, report, progress, segment_size,
               engine={"engine": engine, "address": address, "workers": workers}, allow_removals=allow_removals)
    report.seconds = time.perf_counter() - t0
    return report


def add_studies(manifest: str | Path, uri: str, progress: bool = True, work_dir: str | Path | None = None,
                allow_removals: bool = False) -> BuildReport:
    """Add (or replace, by study id) the studies of ``manifest`` in a published index (a replaced
    study whose images are now unreadable is a removal: see :func:`build_index`)."""
    t0 = time.perf_counter()
    report = BuildReport(uri=uri)
    with writer_state(uri, work_dir) as state:
        cfg, current = _published(state, uri)
        errors: list[str] = []
        new = [_absolute(s, manifest) for s in read_manifest(manifest, errors=errors)]
        report.skipped.extend(errors)
        ids = {s.study_id for s in new}
        merged = [s for s in current if s.study_id not in ids] + new
        pending = _private(uri) / "pending.jsonl"
        write_manifest(pending, merged)
        _build(merged, pending, uri, cfg, state, report, progress, 256, allow_removals=allow_removals)
    report.seconds = time.perf_counter() - t0
    return report


def delete_studies(uri: str, study_ids: list[str], work_dir: str | Path | None = None) -> BuildReport:
    """Publish a new version without ``study_ids`` (no re-encoding)."""
    t0 = time.perf_counter()
    report = BuildReport(uri=uri)
    with writer_state(uri, work_dir) as state:
        cfg, current = _published(state, uri)
        unknown = sorted(set(study_ids) - {s.study_id for s in current})
        if unknown:
            raise ManifestError(f"not in the index: {', '.join(unknown[:10])}")
        kept = [s for s in current if s.study_id not in set(study_ids)]
        if not kept:
            raise ManifestError("deleting every study would leave an empty index")
        pending = _private(uri) / "pending.jsonl"
        write_manifest(pending, kept)
        _build(kept, pending, uri, cfg, state, report, False, 256, allow_removals=set(study_ids))
    report.seconds = time.perf_counter() - t0
    return report


def rebuild_locked(uri: str, state: Path, progress: bool = False) -> BuildReport:
    """Publish a fresh version of what is published now, from the build's own record, encoding
    only studies whose segments are gone (quarantined). The caller holds the writer lock
    (:func:`writer_state`); ``medrag index verify --repair`` uses it."""
    t0 = time.perf_counter()
    report = BuildReport(uri=uri)
    cfg, current = _published(state, uri)
    pending = _private(uri) / "pending.jsonl"
    write_manifest(pending, current)
    _build(current, pending, uri, cfg, state, report, progress, 256, allow_removals=True)  # report.removed says
    report.seconds = time.perf_counter() - t0
    return report


def _published(state: Path, uri: str) -> tuple[BuildConfig, list[Study]]:
    rec = state / "published.json"
    if not rec.is_file():
        raise ManifestError(f"{uri}: no build record in {state} (build it with `medrag index build` first)")
    raw = json.loads(rec.read_text())
    conf = raw["config"]
    conf["conditioning"] = tuple(conf["conditioning"]) if conf.get("conditioning") is not None else None
    studies = private_dir_for(uri) / "published.jsonl"
    if not studies.is_file() and (state / "published.jsonl").is_file():
        studies = state / "published.jsonl"  # an index built before issue 23; moved out at the next publish
    return BuildConfig(**conf), list(read_manifest(studies))


def _absolute(study: Study, manifest: str | Path) -> Study:
    import msgspec

    return msgspec.structs.replace(study, images=[str(manifest_image(manifest, r)) for r in study.images])


def _encoders_fingerprint(cfg: BuildConfig, image_enc: Any, text_enc: Any, conditioning: list[str],
                          spaces: dict[str, int]) -> str:
    def weights(ckpt: str | None) -> list[tuple[str, int, int]]:
        if not ckpt or not Path(ckpt).exists():
            return []
        files = [Path(ckpt)] if Path(ckpt).is_file() else sorted(p for p in Path(ckpt).rglob("*") if p.is_file())
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]

    return fingerprint({"image": image_enc.describe(), "text": text_enc.describe() if text_enc else None,
                        "conditioning": conditioning, "spaces": spaces, "snippet": REPORT_SNIPPET,
                        "weights": weights(cfg.checkpoint) + weights(cfg.text_checkpoint), "format": 2})


def _build(studies: list[Study], manifest: str | Path, uri: str, cfg: BuildConfig, state: Path,
           report: BuildReport, progress: bool, segment_size: int, engine: dict[str, Any] | None = None,
           allow_removals: bool | set[str] = False) -> None:
    studies = [_deidentified(s) for s in studies]  # what is recorded, keyed and encoded: never raw
    served = _served_ids(uri)
    tax = default_taxonomy()
    extractor = EntityExtractor(tax)
    image_enc = create_encoder(cfg.encoder, checkpoint=cfg.checkpoint, device=cfg.device,
                               **({"allow_random": True} if cfg.allow_random_init else {}))
    text_enc = create_encoder(cfg.text_encoder, checkpoint=cfg.text_checkpoint, device=cfg.device) \
        if cfg.text_encoder else None
    wanted = cfg.conditioning if cfg.conditioning is not None else tax.conditioning_anatomies
    conditioning = [tax.anatomy(a).name for a in wanted]
    conditioning = [a for a in conditioning if image_enc.supports_anatomy(a)]
    spaces = {IMAGE: image_enc.dim, **{anatomy_space(a): image_enc.dim for a in conditioning}}
    if text_enc is not None:
        spaces[REPORT] = text_enc.dim
    if is_joint(image_enc):
        spaces[REPORT_JOINT] = image_enc.dim
    image_root = Path(manifest).resolve().parent
    meta = IndexMeta(backend="", spaces=spaces, count=0, image_encoder=image_enc.describe(),
                     text_encoder=text_enc.describe() if text_enc else None, conditioning=conditioning,
                     image_root=str(image_root))
    store = SegmentStore(state / "segments" / _encoders_fingerprint(cfg, image_enc, text_enc, conditioning, spaces))
    keys = [study_key(_absolute(s, manifest), manifest) for s in studies]
    before = set(store.files())
    done = store.encoded_keys()  # quarantines segments whose keys cannot be read
    report.quarantined.extend(f.name for f in sorted(before - set(store.files())))
    todo = [(s, k) for s, k in zip(studies, keys, strict=True) if k not in done]
    report.reused = len(studies) - len(todo)
    from indexer.engines import ENGINES

    def encode(chunk: list[tuple[Study, str]]) -> tuple[list[str], Path]:
        seg = _encode_segment(chunk, manifest, image_enc, text_enc, conditioning, spaces, tax, extractor,
                              cfg.batch_size)
        return seg.study_keys, store.write(seg)

    eng = dict(engine or {})
    name = eng.pop("engine", None) or "local"
    if name not in ENGINES:
        raise ManifestError(f"unknown build engine {name!r} ({', '.join(ENGINES)})")
    job = {"cfg": cfg, "manifest": str(manifest), "conditioning": conditioning, "spaces": spaces, "store": str(store.root)}

    def run(todo: list[tuple[Study, str]]) -> None:
        bar = _bar(len(todo), progress)
        chunks = [todo[i:i + segment_size] for i in range(0, len(todo), segment_size)]
        for seg_keys, path in ENGINES[name](chunks, encode, job=job, **eng):
            done.update({k: path for k in seg_keys})
            report.segments_written += 1
            if bar is not None:
                bar.update(len(seg_keys))
        if bar is not None:
            bar.close()

    run(todo)
    skipped_before = list(report.skipped)
    published: set[str] = set()
    for _ in range(MAX_REPAIRS + 1):
        try:
            published = _assemble(studies, keys, done, store, uri, spaces, meta, cfg, image_root, report,
                                  served, allow_removals)
            break
        except CorruptSegment as exc:  # found damaged while assembling: move it aside, encode again
            if len(report.quarantined) >= MAX_REPAIRS:
                raise ManifestError(f"{exc} (and {MAX_REPAIRS} damaged segments before it: is the disk failing?)"
                                    ) from exc
            store.quarantine(exc.path, exc.why)
            report.quarantined.append(exc.path.name)
            lost = {k for k, f in done.items() if f == exc.path}
            for k in lost:
                del done[k]
            report.studies = report.points = report.images = report.reports = 0
            report.skipped = list(skipped_before)  # _assemble adds the segments' skip messages again
            run([(s, k) for s, k in zip(studies, keys, strict=True) if k in lost])
    _record(state, manifest, studies, cfg, uri, published)
    live = {done[k] for k in keys if k in done}
    for f in store.files():  # segments holding only deleted or changed studies
        if f not in live:
            f.unlink(missing_ok=True)
            store.sidecar(f).unlink(missing_ok=True)


def _deidentified(study: Study) -> Study:
    """The study de-identified (:func:`indexer.deid.deidentify_study`) before anything reads it:
    patient id pseudonymised, study date and report dates shifted by the patient's one offset,
    report PHI replaced. The report reaches payloads, search results and other patients' drafts.
    A study a source already de-identified (marked) is left as it is."""
    if study.deidentified:
        return study
    from indexer.deid import deidentify_study
    from indexer.phi import DEFAULT_KEY, PhiPolicy

    return deidentify_study(study, PhiPolicy((env().phi_key or DEFAULT_KEY).encode()))


def _path_refs(study: Study, manifest: str | Path) -> list[tuple[str, str]]:
    """(path as a message may write it, opaque reference) for each image of ``study``, longest
    path first (an absolute path before the relative one it ends with)."""
    pairs = []
    for rel in study.images:
        absolute = str(manifest_image(manifest, rel))
        pairs += [(absolute, image_ref(absolute)), (rel, image_ref(absolute))]
    return sorted(set(pairs), key=lambda p: -len(p[0]))


def _hide_paths(message: str, study: Study, manifest: str | Path) -> str:
    """A skip message as a segment stores it: image paths (which name patients) become their
    opaque references; :func:`_show_paths` restores them for the build report."""
    for path, ref in _path_refs(study, manifest):
        message = message.replace(path, ref)
    return message


def _show_paths(message: str, study: Study, manifest: str | Path) -> str:
    for path, ref in reversed(_path_refs(study, manifest)):  # the relative form, as reported before
        message = message.replace(ref, path)
    return message


def _encode_segment(chunk: list[tuple[Study, str]], manifest: str | Path, image_enc: Any, text_enc: Any,
                    conditioning: list[str], spaces: dict[str, int], tax: Taxonomy, extractor: EntityExtractor,
                    batch_size: int) -> Segment:
    seg = Segment(study_keys=[k for _, k in chunk])
    chunk = [(_deidentified(s), k) for s, k in chunk]
    key_of = {id(s): k for s, k in chunk}
    vecs: dict[str, list[np.ndarray]] = {sp: [] for sp in spaces}
    pres: dict[str, list[np.ndarray]] = {sp: [] for sp in spaces}

    def skip(study: Study, message: str) -> None:
        seg.skipped.setdefault(key_of[id(study)], []).append(_hide_paths(message, study, manifest))

    # a volumetric encoder (ct3d) decodes each manifest entry (a series folder) itself
    for batch in _batches([s for s, _ in chunk], manifest, batch_size, skip, getattr(image_enc, "load_input", None)):
        has_img = np.array([img is not None for _, _, img, _ in batch])
        imgs = [img for _, _, img, _ in batch if img is not None]
        wanted = [(IMAGE, None)] + [(anatomy_space(a), a) for a in conditioning]
        if hasattr(image_enc, "encode_conditions"):  # one tower pass for every condition
            by_cond = image_enc.encode_conditions(imgs, [a for _, a in wanted])
        else:
            by_cond = {a: image_enc.encode_images(imgs, anatomy=a) for _, a in wanted}
        for space, anatomy in wanted:
            vecs[space].append(_scatter(by_cond[anatomy], has_img, image_enc.dim))
            pres[space].append(has_img)
        texts = [s.report or "" for s, _, _, _ in batch]
        has_rep = np.array([bool(t.strip()) for t in texts])
        if text_enc is not None:
            vecs[REPORT].append(_scatter(text_enc.encode_texts([t for t in texts if t.strip()]), has_rep, text_enc.dim))
            pres[REPORT].append(has_rep)
        if REPORT_JOINT in spaces:
            vecs[REPORT_JOINT].append(_scatter(image_enc.encode_texts([t for t in texts if t.strip()]),
                                               has_rep, image_enc.dim))
            pres[REPORT_JOINT].append(has_rep)
        for s, rel, img, view in batch:
            abs_img = str(manifest_image(manifest, rel)) if rel else None
            key = pixel_key(img) if img is not None else None
            seg.payloads.append(payload_for(s, abs_img, view, tax, extractor, image_key=key))
            seg.point_study.append(key_of[id(s)])
    for sp, dim in spaces.items():
        seg.vectors[sp] = np.concatenate(vecs[sp]) if vecs[sp] else np.zeros((0, dim), np.float32)
        seg.present[sp] = np.concatenate(pres[sp]) if pres[sp] else np.zeros(0, bool)
    return seg


def _assemble(studies: list[Study], keys: list[str], done: dict[str, Path], store: SegmentStore, uri: str,
              spaces: dict[str, int], meta: IndexMeta, cfg: BuildConfig, image_root: Path,
              report: BuildReport, served: set[str] | None = None,
              allow_removals: bool | set[str] = True) -> set[str]:
    """Write every study's points, in manifest order, into a new version; publish it. Returns
    the ids of the studies published (with at least one point).

    Before the commit, studies of ``served`` (the version readers see now) missing from the new
    one go to ``report.removed``; any not allowed by ``allow_removals`` (True: all, a set: those)
    abort the version with :class:`RemovalRefused`.

    Segments are loaded when first needed and dropped after their last study, so memory holds
    a few segments plus what the index writer keeps, not every encoded vector at once.
    """
    last_use = {done[k]: i for i, k in enumerate(keys)}
    loaded: dict[Path, tuple[Segment, dict[str, list[int]]]] = {}

    def segment(path: Path) -> tuple[Segment, dict[str, list[int]]]:
        if path not in loaded:
            seg = store.read(path)
            rows: dict[str, list[int]] = {}
            for i, k in enumerate(seg.point_study):
                rows.setdefault(k, []).append(i)
            loaded[path] = (seg, rows)
        return loaded[path]

    writer = open_writer(uri, spaces, meta, cfg.index_kind)
    try:
        buf: list[tuple[Segment, int]] = []
        next_id = 0
        seen: set[str] = set()
        published: set[str] = set()
        for pos, (study, key) in enumerate(zip(studies, keys, strict=True)):
            if key in seen:
                continue
            seen.add(key)
            seg, rows = segment(done[key])
            report.skipped.extend(_show_paths(m, study, image_root / "manifest") for m in seg.skipped.get(key, []))
            points = [(seg, i) for i in rows.get(key, [])]
            buf.extend(points)
            if points:
                report.studies += 1
                report.reports += int(bool(study.report))
                published.add(study.study_id)
            if len(buf) >= 1024:
                next_id = _flush(writer, buf, next_id, spaces, image_root, report)
                buf = []
                for path in [p for p in loaded if last_use[p] <= pos]:  # no longer needed
                    del loaded[path]
        if buf:
            next_id = _flush(writer, buf, next_id, spaces, image_root, report)
        if report.points == 0:
            raise ManifestError(f"nothing to index ({len(report.skipped)} skipped)")
        report.removed = sorted((served or set()) - published)
        refused = [s for s in report.removed if allow_removals is not True and s not in (allow_removals or ())]
        if refused:
            raise RemovalRefused(refused)
        report.version = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return published


def _flush(writer: Any, buf: list[tuple[Any, int]], next_id: int, spaces: dict[str, int], image_root: Path,
           report: BuildReport) -> int:
    ids = np.arange(next_id, next_id + len(buf), dtype=np.int64)
    vectors = {sp: np.stack([seg.vectors[sp][i] for seg, i in buf]) for sp in spaces}
    present = {sp: np.array([bool(seg.present[sp][i]) for seg, i in buf]) for sp in spaces}
    payloads = []
    for seg, i in buf:
        p = seg.payloads[i]
        if p.image:
            try:
                p = msgspec.structs.replace(p, image=str(Path(p.image).relative_to(image_root)))
            except ValueError:
                pass
        payloads.append(p.to_builtins())  # backends store JSON; readers get Payload.of(...)
    writer.add(ids, vectors, payloads, present)
    report.points += len(buf)
    report.images += int(present[IMAGE].sum())
    return next_id + len(buf)


def _served_ids(uri: str) -> set[str]:
    """Study ids of the version readers see now: the build record's list, or (an index built
    before the list was kept) its payloads; empty for a first build."""
    rec = private_dir_for(uri) / "published_ids.json"
    if rec.is_file():
        return set(json.loads(rec.read_text()))
    from retrieval.index import IndexError_, open_index, published_version

    try:
        if published_version(uri) is None:
            return set()
        ix = open_index(uri)
    except (IndexError_, OSError, ValueError):
        return set()
    try:
        n = len(ix)
        return {p.study_id for i in range(0, n, 4096) for p in ix.payloads(range(i, min(n, i + 4096)))}
    finally:
        ix.close()


def _record(state: Path, manifest: str | Path, studies: list[Study], cfg: BuildConfig, uri: str,
            published: set[str] | None = None) -> None:
    """What the published version holds, for later add/delete: the studies with their absolute
    image paths (source paths name patients) and the manifest's path go to the private state
    (:func:`private_dir_for`); the build state beside the index keeps only the configuration."""
    private = _private(uri)
    write_manifest(private / "published.jsonl", [_absolute(s, manifest) for s in studies])
    if published is not None:  # what the version serves: the next build's removal check
        atomic_write_bytes(private / "published_ids.json", json.dumps(sorted(published)).encode())
    atomic_write_bytes(private / "source.json", json.dumps(
        {"uri": uri, "manifest": str(Path(manifest).resolve())}, indent=1).encode())
    atomic_write_bytes(state / "published.json", json.dumps({"config": asdict(cfg)}, indent=1).encode())
    for legacy in ("published.jsonl", "pending.jsonl"):  # where indexes before issue 23 kept them
        (state / legacy).unlink(missing_ok=True)
    (private / "pending.jsonl").unlink(missing_ok=True)  # an add/delete merge, now published


def _scatter(rows: np.ndarray, mask: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((len(mask), dim), dtype=np.float32)
    if mask.any():
        out[mask] = rows
    return out


def _batches(studies: list[Study], manifest: str | Path, size: int, skip: Callable[[Study, str], None],
             loader: Callable[..., np.ndarray] | None = None,
             ) -> Iterator[list[tuple[Study, str | None, np.ndarray | None, str | None]]]:
    """Yield (study, image path, pixels, view) points; report-only studies give one point.

    Images are decoded by ``DECODE_WORKERS`` threads up to ``DECODE_AHEAD`` batches ahead, so
    decoding (PIL and pydicom's pixel handlers release the GIL in their C code) overlaps the
    encoder's forward on the batch before. Order, skips and their messages are those of a
    serial decode: results are consumed in manifest order, and skips reported from this thread.
    """
    batch: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []

    def decode(rel: str) -> np.ndarray | ImageLoadError:
        try:
            return (loader or load_image)(manifest_image(manifest, rel), name=rel)
        except ImageLoadError as exc:
            return exc

    workers = DECODE_WORKERS if DECODE_WORKERS > 0 else 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="medrag-decode")
    pending: deque[Future[np.ndarray | ImageLoadError]] = deque()
    jobs = ((s, i, rel) for s in studies for i, rel in enumerate(s.images))
    order: deque[tuple[Study, int, str]] = deque()

    def fill() -> None:
        while len(pending) < max(1, DECODE_AHEAD * size):
            job = next(jobs, None)
            if job is None:
                return
            order.append(job)
            pending.append(pool.submit(decode, job[2]))

    try:
        fill()
        for study in studies:
            points: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []
            for _ in study.images:
                s, i, rel = order.popleft()
                pixels = pending.popleft().result()
                fill()
                if isinstance(pixels, ImageLoadError):
                    skip(study, str(pixels))
                    continue
                view = study.view[i] if study.view and i < len(study.view) else None
                points.append((study, rel, pixels, view))
            if not points:
                if study.report and not study.images:
                    points.append((study, None, None, None))
                else:
                    skip(study, f"study {study.study_id}: no readable image")
                    continue
            batch.extend(points)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def _batches_serial(studies: list[Study], manifest: str | Path, size: int,
                    skip: Callable[[Study, str], None]) -> Iterator[list[tuple[Study, str | None, np.ndarray | None,
                                                                                   str | None]]]:
    """The serial decode (reference for tests and the overlap measurement)."""
    batch: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []
    for study in studies:
        points: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []
        for i, rel in enumerate(study.images):
            try:
                pixels = load_image(manifest_image(manifest, rel), name=rel)
            except ImageLoadError as exc:
                skip(study, str(exc))
                continue
            view = study.view[i] if study.view and i < len(study.view) else None
            points.append((study, rel, pixels, view))
        if not points:
            if study.report and not study.images:
                points.append((study, None, None, None))
            else:
                skip(study, f"study {study.study_id}: no readable image")
                continue
        batch.extend(points)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="study", desc="indexing", dynamic_ncols=True)
