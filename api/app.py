"""The HTTP service: ``create_app(settings)`` -> a Litestar app (``medrag serve`` runs it).

The index, the encoders and the generator are opened once in the lifespan hook and shared by
every request (opening an encoder per request would cost seconds). Model and index calls are
blocking, so handlers run them in worker threads with no global lock: concurrent searches are
micro-batched into one index call and concurrent image encodes into one forward
(:mod:`retrieval.batching`); FAISS reads run unlocked, other engines (embedded Qdrant is not documented
thread-safe), the report tokenizer and drafting keep a lock of their own.

Hot reload: a watcher polls the published version (:func:`retrieval.index.published_version`,
every ``reload_interval_s``); a newer one is opened and verified beside the served one, then
swapped in with one assignment, so each request sees one version whole; the old one is closed
after a grace period. A version that fails to open is not served (the previous keeps serving and
``/health`` says why). A deleted study is gone within the interval plus the time to open the new
version. When startup found no usable index the watcher keeps trying, and the service becomes
ready once one is published.

Security: every ``/api`` route needs ``Authorization: Bearer <key>`` (hashed keys, :mod:`api.keys`);
``/``, ``/static``, ``/health*``, ``/metrics`` and ``/schema`` do not. Request bodies are capped,
uploads are typed by content and size-checked before decoding (:mod:`api.uploads`). The access
log names route templates (``/api/cases/{study_id}``), never concrete paths, query strings,
bodies or report text, so no patient identifier, name or date reaches the logs.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import numpy as np
from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, MultipartBody, Parameter
from litestar.plugins.prometheus import PrometheusConfig
from litestar.static_files import create_static_files_router

from api.keys import KeyStore
from api.schemas import (
    K_MAX,
    CaseDetail,
    CaseOut,
    DraftForm,
    DraftOut,
    DraftSentenceOut,
    EntityOut,
    ErrorOut,
    Health,
    Highlight,
    ImageSearchForm,
    SearchOut,
    Taxonomy,
    TextSearchIn,
    VectorSearchIn,
)
from api.settings import Settings
from api.uploads import UploadError, decode
from indexer.phi import stored_image_path
from retrieval.batching import Batching
from retrieval.imaging.paths import ImagePathError
from retrieval.records import Label, Mention

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("medrag.api")


class NotFound(LookupError):
    pass


class Service:
    """Everything a request needs, opened once."""

    def __init__(self, settings: Settings, previous: Service | None = None) -> None:
        """Open the published index; with ``previous`` (a hot reload) its encoders, generator and
        drafting lock are reused when the new version was built with the same encoders."""
        from retrieval.entities import EntityExtractor
        from retrieval.index import open_index
        from retrieval.rag import create_generator
        from retrieval.search import Searcher
        from retrieval.taxonomy import default_taxonomy

        self.settings = settings
        self.searcher: Searcher
        self.generator: Any
        self.lock: threading.Lock
        self.index = open_index(settings.index)
        # concurrent requests share engine calls and forwards: wrappers the searcher is built with
        batching = Batching(max_batch=settings.batch_max, wait_s=settings.batch_wait_ms / 1000, adaptive=True)
        try:
            meta, old = self.index.meta, previous.index.meta if previous is not None else None
            if previous is not None and old is not None and (meta.image_encoder, meta.text_encoder) == \
                    (old.image_encoder, old.text_encoder):
                self.searcher = Searcher(self.index, previous.searcher.image_encoder, previous.searcher.text_encoder,
                                         batching=batching)
                self.generator = previous.generator
                self.lock = previous.lock
            else:
                self.searcher = Searcher.for_index(self.index, device=settings.device,
                                                   load_text=settings.load_text_encoder, batching=batching)
                self.generator = create_generator(settings.generator, model_dir=settings.generator_model_dir,
                                                  base_url=settings.generator_base_url, model=settings.generator_model,
                                                  api_key=settings.generator_api_key, device=settings.device)
                self.lock = threading.Lock()
        except BaseException:
            self.index.close()
            raise
        self.tax = default_taxonomy()
        self.extractor = EntityExtractor(self.tax)
        self.thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self.studies = self._count_studies()
        self.opened_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def version(self) -> str:
        return self.index.meta.version

    def _count_studies(self) -> int | None:
        try:
            from retrieval.index import SearchFilter

            limit = 200_000
            pts = self.index.find(SearchFilter(), limit=limit)
            return len({p.payload.study_id for p in pts}) if len(pts) < limit else None
        except Exception:  # counting is informative only
            return None

    def close(self) -> None:
        self.index.close()

    # ---- helpers -------------------------------------------------------------------------------
    def study_points(self, study_id: str):
        from retrieval.index import SearchFilter

        pts = sorted(self.index.find(SearchFilter(study_ids=[study_id]), limit=256), key=lambda p: p.id)
        if not pts:
            raise NotFound(f"study {study_id!r} is not in the index")
        return pts

    def highlights(self, report: str | None, matched: list[Label],
                   mentions: list[Mention] | None = None) -> list[Highlight]:
        """The report's mentions, marked where the query asked for them. ``mentions`` were mined
        when the study was indexed; an index built before they were stored is mined here."""
        if not report:
            return []
        if mentions is None:
            mentions = [Mention(e.span[0], e.span[1], e.anatomy, e.finding, e.status)
                        for e in self.extractor.extract(report)]
        want = {m.key for m in matched}
        want_findings = {m.finding for m in matched}
        out = []
        for e in mentions:
            hit = (e.anatomy, e.finding) in want or (e.finding in want_findings and e.status != "absent")
            out.append(Highlight(e.start, e.end, e.anatomy, e.finding, e.status, hit))
        return out

    def thumbnail(self, study_id: str, n: int) -> bytes:
        key = (study_id, n)
        if key in self.thumbs:
            self.thumbs.move_to_end(key)
            return self.thumbs[key]
        from PIL import Image


        arr = self.stored_image(study_id, n)  # windowed for DICOM
        im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L")
        im.thumbnail((self.settings.thumbnail_px, self.settings.thumbnail_px))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        self.thumbs[key] = buf.getvalue()
        while len(self.thumbs) > 512:
            self.thumbs.popitem(last=False)
        return self.thumbs[key]

    def stored_image(self, study_id: str, n: int) -> np.ndarray:
        """Decoded stored image ``n`` of a study, through the guarded path resolver."""
        from retrieval.imaging.images import ImageLoadError, load_image

        images = [img for p in self.study_points(study_id) if (img := p.payload.image)]
        if not 0 <= n < len(images):
            raise NotFound(f"study {study_id!r} has no image {n}")
        try:
            path = stored_image_path(images[n], self.settings.index, self.index.meta.image_root)
        except ImagePathError as exc:
            raise NotFound("stored image path leaves the image root") from exc
        try:
            return load_image(path, name=f"image {n} of the study")
        except ImageLoadError as exc:
            raise NotFound(f"stored image is unavailable ({exc})") from exc

    def attention_png(self, study_id: str, n: int, anatomy: str) -> bytes:
        from retrieval.imaging.overlay import overlay_png

        enc: Any = self.searcher.image_encoder  # attention maps: an ability of some encoders (medrag-native)
        if not hasattr(enc, "attention_maps"):
            raise NotFound("this index's image encoder has no attention to show (medrag-native has)")
        name = self.tax.anatomy(anatomy).name  # unknown names -> 400 with suggestions
        image = self.stored_image(study_id, n)
        return overlay_png(image, enc.attention_maps([image], anatomy=name)[0], max_side=self.settings.thumbnail_px)

    def search_out(self, res, took: float) -> SearchOut:
        hits = [CaseOut(h.study_id, h.score, h.modality, h.study_date, h.report, h.matched_entities,
                        self.highlights(h.report, h.matched_entities, h.mentions),
                        f"/api/cases/{h.study_id}/images/0" if h.image else None, h.images_matched)
                for h in res.hits]
        return SearchOut(res.mode, res.space, res.conditioning, res.filter, round(took * 1000, 2), hits)


# ---- auth ------------------------------------------------------------------------------------------
async def require_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    settings: Settings = connection.app.state.settings
    if settings.allow_anonymous:
        return
    keys: KeyStore = connection.app.state["key_store"]
    if keys.verify(connection.headers.get("authorization")) is None:
        raise NotAuthorizedException("missing or invalid API key (send 'Authorization: Bearer <key>')")


def _service(state: State) -> Service:
    svc = state.get("service")
    if svc is None:
        raise HTTPException(status_code=503, detail=f"not ready: {public_reason(state.get('startup_error')) or 'starting'}")
    return svc


_ABS_PATH = re.compile(r"(?<![\w.<>-])/(?:[^\s'\"/:,;()]+/)*[^\s'\",;()]*")


def public_reason(reason: str | None) -> str | None:
    """A failure reason fit for an unauthenticated client: absolute paths (where the index
    lives, a patient-named export folder) become ``<path>``; the full text goes to the log."""
    if not reason:
        return reason
    return _ABS_PATH.sub("<path>", reason)


async def _blocking(svc: Service, fn):
    """Run a model/index call in a worker thread. No global lock: the searcher's index and image
    encoder are wrapped by :mod:`retrieval.batching` (concurrent searches share one engine call,
    encoder forwards are batched), FAISS reads are thread-safe and other engines are locked there."""
    return await anyio.to_thread.run_sync(fn)


def _fit_schema(app: Litestar, svc: Service) -> None:
    """State the served index's own constraints in the OpenAPI schema, once it is open.

    The vector length, the space names, the anatomy and finding vocabulary and whether text search
    can be answered depend on the index, not on the code; a schema that leaves them open lets a
    client (or schemathesis) send schema-valid requests that must then be refused.
    """
    from litestar.openapi.spec import OpenAPIType, Schema
    from litestar.openapi.spec import Parameter as OpenAPIParameter

    from retrieval.encoders import is_joint
    from retrieval.index import REPORT

    api = app.openapi_schema
    meta = svc.index.meta
    vocab = {"anatomy": ["", *sorted(svc.tax.anatomies)], "finding": ["", *sorted(svc.tax.findings)]}

    def enum(sch: Any, values: list[str]) -> None:
        if not isinstance(sch, Schema):
            return
        if sch.type == "string" or getattr(sch.type, "value", None) == "string":
            sch.enum = list(values)
        for sub in [*(sch.one_of or []), *(sch.any_of or [])]:
            enum(sub, values)

    for name, sch in (api.components.schemas or {}).items():
        props = sch.properties or {}
        for key, values in vocab.items():
            if key in props:
                enum(props[key], values)
        if name.endswith(("VectorSearchIn", "TextSearchIn")):  # forbid_unknown_fields=True
            sch.additional_properties = False
        if name.endswith("VectorSearchIn"):
            enum(props["space"], sorted(meta.spaces))
            by_dim: dict[int, list[str]] = {}
            for space_name, dim in meta.spaces.items():
                by_dim.setdefault(dim, []).append(space_name)
            # one variant per vector length: its spaces, exactly that many numbers ("space" may be
            # left out only in the variant holding the default space, "image")
            sch.one_of = [Schema(type=OpenAPIType.OBJECT, required=["vector"] if "image" in names else ["vector", "space"],
                                 properties={"space": Schema(type=OpenAPIType.STRING, enum=sorted(names)),
                                             "vector": Schema(type=OpenAPIType.ARRAY, min_items=dim, max_items=dim)})
                          for dim, names in by_dim.items()]
        if name.endswith("TextSearchIn"):
            targets = (["images"] if is_joint(svc.searcher.image_encoder) else []) + \
                (["reports"] if svc.searcher.text_encoder is not None and REPORT in meta.spaces else [])
            if targets:
                enum(props["target"], ["auto", *targets])
            elif api.paths:  # this index answers no text query: the route is not offered
                api.paths.pop("/api/search/text", None)
    for item in (api.paths or {}).values():
        for op in (item.get, item.post):
            for prm in (op.parameters or []) if op else []:
                if isinstance(prm, OpenAPIParameter) and prm.name in vocab and prm.param_in == "query":
                    enum(prm.schema, vocab[prm.name])


def _reason(exc: BaseException) -> str:
    """Our own errors say what is wrong in words; anything else is named by its type too."""
    from retrieval.encoders import EncoderError
    from retrieval.index import IndexError_

    return str(exc) if isinstance(exc, (IndexError_, EncoderError, OSError, ValueError)) else \
        f"{type(exc).__name__}: {exc}"


def _serve(app: Litestar, svc: Service) -> None:
    """Make ``svc`` the one every new request uses (one assignment: a request sees one version)."""
    _fit_schema(app, svc)
    _concurrent(svc)
    app.state.service = svc
    app.state.startup_error = None


async def _watch(app: Litestar, settings: Settings) -> None:
    """Poll the published version; open a newer one beside the served one and swap it in."""
    from retrieval.index import published_version

    failed: str | None = None  # a version that failed to open is retried every reload_retry_s (a disk
    failed_at = 0.0  # freed, a file restored in place), not at every poll (each try verifies checksums)
    while True:
        await anyio.sleep(settings.reload_interval_s)
        try:
            latest = await anyio.to_thread.run_sync(lambda: published_version(settings.index))
        except Exception as exc:  # noqa: BLE001 - a Qdrant server away: keep serving, say why
            app.state.reload_error = f"cannot read the published version: {_reason(exc)}"
            continue
        old: Service | None = app.state.get("service")
        if latest is None or (old is not None and latest == old.version):
            continue
        if latest == failed and time.monotonic() - failed_at < settings.reload_retry_s:
            continue
        try:
            new = await anyio.to_thread.run_sync(functools.partial(Service, settings, previous=old))
        except Exception as exc:  # noqa: BLE001 - the served version keeps serving
            failed, failed_at = latest, time.monotonic()
            reason = f"version {latest} not served: {_reason(exc)}"
            if old is None:
                app.state.startup_error = reason
            else:
                app.state.reload_error = reason
            log.error("%s", reason)
            continue
        _serve(app, new)
        failed, app.state.reload_error = None, None
        log.info("serving index version %s (was %s)", new.version, old.version if old else "none")
        if old is not None:
            app.state.retiring.append(old)
            asyncio.get_running_loop().call_later(settings.reload_grace_s, _retire, app, old)


def _retire(app: Litestar, old: Service) -> None:
    """Close a replaced version once requests that started on it have had time to finish."""
    if old in app.state.retiring:
        app.state.retiring.remove(old)
        old.close()


def _one_at_a_time(svc: Service, fn):
    """Drafting drives the generator (a local VLM and its tokenizer are not safe to share between
    threads): drafts run one at a time; searches do not wait for them."""
    with svc.lock:
        return fn()


def _concurrent(svc: Service) -> None:
    """Thread budgets for the shared searcher (micro-batching is built into it: :class:`Service`)."""
    from api.batching import set_thread_budgets

    s = svc.settings
    set_thread_budgets(s.torch_threads, s.faiss_threads)


def _query(svc: Service, k: int, **kw: Any):
    from retrieval.search import Query

    if not 1 <= k <= svc.settings.max_k:
        raise ValueError(f"k must be between 1 and {svc.settings.max_k}")
    if kw.get("exclude_patient_id"):  # the index holds pseudonyms only: a typed MRN is matched, never echoed
        from indexer.deid import patient_pseudonym

        kw["exclude_patient_id"] = patient_pseudonym(kw["exclude_patient_id"])
    return Query(k=k, **kw)


def _modalities(value: str | list[str] | None) -> tuple[str, ...] | None:
    if not value:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return tuple(x.strip() for x in items if x.strip()) or None


# ---- routes ----------------------------------------------------------------------------------------
def _errors(*codes: int) -> dict[int, ResponseSpec]:
    """The error responses a route can give, declared in the OpenAPI schema (body: ErrorOut)."""
    why = {400: "invalid query (names the culprit)", 401: "missing or invalid API key",
           404: "no such study, image or route", 413: "upload or body too large",
           415: "upload is not a PNG, JPEG or DICOM file", 422: "upload cannot be decoded in time",
           502: "the generator server failed", 503: "the index is not open (reason in the body)"}
    return {c: ResponseSpec(ErrorOut, description=why[c]) for c in codes}


_API = (400, 401, 503)  # every /api data route
_UPLOAD = (*_API, 413, 415, 422)


@get("/", media_type=MediaType.HTML, include_in_schema=False)
async def page() -> Response:
    return Response((STATIC / "index.html").read_bytes(), media_type=MediaType.HTML)


@get("/health", tags=["ops"])
async def health(state: State) -> Health:
    """Status, the index version being served and, when a newer one could not be opened, why.
    Unauthenticated: reasons carry no absolute path (:func:`public_reason`)."""
    svc = state.get("service")
    reload_error = public_reason(state.get("reload_error"))
    if svc is None:
        err = public_reason(state.get("startup_error"))
        return Health("error" if err else "starting", False, None, err)
    meta = svc.index.meta
    return Health("ok", True, {"backend": meta.backend, "version": meta.version, "points": len(svc.index),
                               "studies": svc.studies, "spaces": sorted(meta.spaces),
                               "image_encoder": (meta.image_encoder or {}).get("family"),
                               "generator": getattr(svc.generator, "name", "?"),
                               "serving_since": svc.opened_at},
                  reload_error, reload_error)


@get("/health/live", tags=["ops"])
async def live() -> dict[str, str]:
    return {"status": "alive"}


@get("/health/ready", tags=["ops"])
async def ready(state: State) -> Response:
    ok = state.get("service") is not None
    return Response({"ready": ok}, status_code=200 if ok else 503)


@get("/api/taxonomy", guards=[require_key], tags=["search"], responses=_errors(401, 503))
async def taxonomy(state: State) -> Taxonomy:
    svc = _service(state)
    return Taxonomy(sorted(svc.tax.anatomies), list(svc.index.meta.conditioning), sorted(svc.tax.findings))


@post("/api/search/image", status_code=200, guards=[require_key], tags=["search"], responses=_errors(*_UPLOAD))
async def search_image(state: State, data: MultipartBody[ImageSearchForm]
                       ) -> SearchOut:
    """Search by an uploaded image (PNG, JPEG or DICOM), optionally conditioned on an anatomy."""
    svc = _service(state)
    img = await decode(await data.image.read(), "image", svc.settings)
    q = _query(svc, data.k, anatomy=data.anatomy or None, finding=data.finding or None,
               finding_by=data.finding_by or "report",
               modality=_modalities(data.modality), exclude_patient_id=data.exclude_patient or None,
               include_uncertain=data.include_uncertain)
    t0 = time.perf_counter()
    res = await _blocking(svc, lambda: (svc.searcher.reports_by_image if data.reports else svc.searcher.by_image)([img], q))
    return svc.search_out(res, time.perf_counter() - t0)


@get("/api/studies/{study_id:str}/similar", guards=[require_key], tags=["search"], responses=_errors(*_API, 404))
async def search_study(state: State, study_id: FromPath[str], anatomy: FromQuery[str | None] = None,
                       finding: FromQuery[str | None] = None,
                       k: Annotated[int, Parameter(ge=1, le=K_MAX)] = 10,
                       other_patients: FromQuery[bool] = False,
                       finding_by: FromQuery[Literal["report", "image"]] = "report") -> SearchOut:
    """Cases similar to a study already in the index (``finding_by=image``: the finding is asked of
    the images, so cases without a report count)."""
    svc = _service(state)
    q = _query(svc, k, anatomy=anatomy, finding=finding, finding_by=finding_by)
    t0 = time.perf_counter()
    await _blocking(svc, lambda: svc.study_points(study_id))  # an unknown study is a 404, not a bad query
    res = await _blocking(svc, lambda: svc.searcher.by_study(study_id, q, same_patient=not other_patients))
    return svc.search_out(res, time.perf_counter() - t0)


@post("/api/search/text", status_code=200, guards=[require_key], tags=["search"], responses=_errors(*_API))
async def search_text(state: State, data: JSONBody[TextSearchIn]) -> SearchOut:
    """Free text -> images (joint encoders) or -> reports (report embeddings)."""
    from retrieval.encoders import is_joint

    svc = _service(state)
    if not data.text.strip():
        raise ValueError("text must not be empty")
    q = _query(svc, data.k, finding=data.finding, anatomy=data.anatomy if data.finding else None,
               modality=_modalities(data.modality), exclude_patient_id=data.exclude_patient,
               include_uncertain=data.include_uncertain)
    target = data.target
    if target == "auto":
        target = "images" if is_joint(svc.searcher.image_encoder) else "reports"
    if target not in ("images", "reports"):
        raise ValueError("target must be auto, images or reports")
    t0 = time.perf_counter()
    if target == "images":  # the finding filter applies; anatomy conditioning is for image queries
        from dataclasses import replace

        q_img = replace(q, anatomy=None)
        res = await _blocking(svc, lambda: svc.searcher.by_text(data.text, q_img))
    else:
        res = await _blocking(svc, lambda: svc.searcher.reports_by_text(data.text, q))
    return svc.search_out(res, time.perf_counter() - t0)


@post("/api/search/vector", status_code=200, guards=[require_key], tags=["search"], responses=_errors(*_API))
async def search_vector(state: State, data: JSONBody[VectorSearchIn]) -> SearchOut:
    """A query vector the client computed, against one stored space."""
    svc = _service(state)
    q = _query(svc, data.k, finding=data.finding, modality=_modalities(data.modality),
               exclude_patient_id=data.exclude_patient)
    t0 = time.perf_counter()
    vec = np.asarray(data.vector, dtype=np.float64)
    top = float(np.abs(vec).max()) if vec.size and np.isfinite(vec).all() else 0.0
    if top > 0:  # cosine search ignores scale; 1e308 must not overflow float32 into inf
        vec = vec / top
    res = await _blocking(svc, lambda: svc.searcher.by_vector(vec, data.space, q))
    return svc.search_out(res, time.perf_counter() - t0)


@get("/api/cases/{study_id:str}", guards=[require_key], tags=["cases"], responses=_errors(*_API, 404))
async def case_detail(state: State, study_id: FromPath[str]) -> CaseDetail:
    svc = _service(state)
    pts = await _blocking(svc, lambda: svc.study_points(study_id))
    p0 = pts[0].payload
    report = p0.report
    marks = svc.highlights(report, [], p0.mentions)
    ents = [EntityOut(h.anatomy, h.finding, h.status, (report or "")[h.start:h.end]) for h in marks]
    n_images = sum(1 for p in pts if p.payload.image)
    return CaseDetail(study_id, p0.modality, p0.study_date, report, ents,
                      marks, [f"/api/cases/{study_id}/images/{i}" for i in range(n_images)])


@get("/api/cases/{study_id:str}/images/{n:int}", guards=[require_key], tags=["cases"], media_type="image/png",
     responses=_errors(*_API, 404))
async def case_image(state: State, study_id: FromPath[str], n: FromPath[int]) -> Response:
    """A thumbnail rendered server-side from the stored image (DICOM windowed)."""
    svc = _service(state)
    png = await _blocking(svc, lambda: svc.thumbnail(study_id, n))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@get("/api/cases/{study_id:str}/images/{n:int}/attention", guards=[require_key], tags=["cases"],
     media_type="image/png", responses=_errors(*_API, 404))
async def case_attention(state: State, study_id: FromPath[str], n: FromPath[int], anatomy: FromQuery[str]) -> Response:
    """Where the anatomy's conditioned query looks on a stored image: a heat-map overlay (PNG)."""
    svc = _service(state)
    png = await _blocking(svc, lambda: svc.attention_png(study_id, n, anatomy))
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@post("/api/draft", status_code=200, guards=[require_key], tags=["draft"], responses=_errors(*_UPLOAD, 502))
async def draft(state: State, data: MultipartBody[DraftForm]) -> DraftOut:
    """Draft a comparative report from retrieved analog cases (and a prior, when given)."""
    from retrieval.rag.draft import draft_report

    svc = _service(state)
    img = await decode(await data.image.read(), "image", svc.settings)
    prior_imgs = [await decode(await data.prior_image.read(), "prior_image", svc.settings)] if data.prior_image else []
    q = _query(svc, data.k, anatomy=data.anatomy or None, finding=data.finding or None,
               exclude_patient_id=data.exclude_patient or None)
    d = await _blocking(svc, lambda: _one_at_a_time(svc, lambda: draft_report(
        svc.searcher, [img], svc.generator, q, prior_images=prior_imgs, prior_report=data.prior_report or None,
        prior_study_id=data.prior_study_id or "prior", prior_date=data.prior_date or None)))

    def sents(items):
        return [DraftSentenceOut(s.text, list(s.citations)) for s in items]

    return DraftOut(d.generator, d.disclaimer, sents(d.findings), sents(d.interval_changes), sents(d.impression),
                    d.cases_used, d.render(), d.status, d.reason)


# ---- errors and logging ----------------------------------------------------------------------------
def _error(status: int):
    def handler(_: Request, exc: Exception) -> Response:
        code = getattr(exc, "status", status)  # UploadError carries its own (413, 415, 422)
        return Response({"status_code": code, "detail": str(exc)}, status_code=code, media_type=MediaType.JSON)

    return handler


def _http_error(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors keep their status: ``NotFoundException`` and ``ValidationException``
    are also ``ValueError`` and would otherwise fall into the 400 handler (every 404 became 400)."""
    from litestar.exceptions import ValidationException

    detail = exc.detail
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        # name the culprit in the detail itself, as every other 400 here does
        why = "; ".join(f"{e.get('key') or 'body'}: {e.get('message')}" for e in exc.extra if isinstance(e, dict))
        detail = f"{detail}: {why}" if why else detail
    body: dict[str, Any] = {"status_code": exc.status_code, "detail": detail}
    if exc.extra:
        body["extra"] = exc.extra
    # always JSON (ErrorOut), also on routes whose success body is an image
    return Response(body, status_code=exc.status_code, headers=exc.headers, media_type=MediaType.JSON)


def _too_deep(request: Request, exc: RecursionError) -> Response:
    """A JSON body nested deeper than the decoder's stack (``[[[[...`` 100k deep) is the client's
    fault: 400, not 500. Anywhere else a RecursionError is a server bug and stays a 500."""
    if "json" in (request.headers.get("content-type") or ""):
        return Response({"status_code": 400, "detail": "request body nests too deeply"}, status_code=400)
    return Response({"status_code": 500, "detail": "Internal Server Error"}, status_code=500)


@get("/metrics", media_type=MediaType.TEXT, tags=["ops"], sync_to_thread=False)
def metrics() -> Response:
    """Prometheus text exposition (``text/plain``, as the schema says)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return Response(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(settings: Settings) -> Litestar:
    from litestar.middleware import DefineMiddleware

    from retrieval.rag.http import GeneratorError
    from retrieval.search import SearchError
    from retrieval.taxonomy import UnknownTermError

    if settings.api_keys_file is None and not settings.allow_anonymous:
        raise ValueError("an API key file is required (or allow_anonymous for local development)")
    keys = KeyStore.load(settings.api_keys_file) if settings.api_keys_file else KeyStore({})

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            _serve(app, await anyio.to_thread.run_sync(lambda: Service(settings)))
        except Exception as exc:  # noqa: BLE001 - any unreadable state is a 503 with a reason, never an exit
            app.state.startup_error = _reason(exc)  # /health says why; data routes answer 503
            log.error("medrag API not ready: %s", app.state.startup_error)
        watcher = asyncio.get_running_loop().create_task(_watch(app, settings)) \
            if settings.reload_interval_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with suppress(asyncio.CancelledError):
                    await watcher
            for old in app.state.get("retiring") or []:
                old.close()
            svc = app.state.get("service")
            if svc is not None:
                svc.close()

    prometheus = PrometheusConfig(app_name="medrag", prefix="medrag", group_path=True,
                                  exclude=["^/metrics", "^/static"])
    return Litestar(
        route_handlers=[page, health, live, ready, taxonomy, search_image, search_study, search_text, search_vector,
                        case_attention,
                        case_detail, case_image, draft, metrics,
                        create_static_files_router("/static", [STATIC])],
        lifespan=[lifespan],
        state=State({"settings": settings, "key_store": keys, "service": None, "startup_error": None,
                     "reload_error": None, "retiring": []}),
        middleware=[prometheus.middleware, DefineMiddleware(AccessLog)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="medrag", version="0.1.0", path="/schema",
                                     description="Similar-case search and report drafting. Data routes need "
                                                 "'Authorization: Bearer <key>'."),
        exception_handlers={
            UploadError: _error(400), UnknownTermError: _error(400), SearchError: _error(400),
            GeneratorError: _error(502), NotFound: _error(404), ValueError: _error(400),
            HTTPException: _http_error, RecursionError: _too_deep,
        },
        logging_config=None,
    )


class AccessLog:
    """ASGI middleware: one line per request with the route template, status and duration."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info("%s %s -> %d in %.1f ms", scope.get("method"), scope.get("path_template") or "(unmatched)",
                     status["code"], (time.perf_counter() - started) * 1000)
