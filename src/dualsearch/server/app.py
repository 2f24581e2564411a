"""The HTTP API and search page (FastAPI). One `Searcher`, loaded once, shared by all requests.

Images are served only by their opaque id (the catalog's vector id); a request can never name a
file path. A catalog path that resolves outside the indexed collection (a symlink out of it) is
answered 404 too. Every id in a request goes through :func:`~.ids.parse_id` (ASCII digits within
int64, else 404).

In front of the routes (``middleware``): request bodies are capped as they stream in (413), HEAD
answers as GET without a body, and an unexpected exception is a JSON 500 with its traceback logged.
Heavy work (decoding, searching, thumbnails, the lazy torch model) runs in worker threads (sync
routes); only ``/health`` runs on the event loop, so it answers while they are busy.
"""
from __future__ import annotations

import logging
import math
import mimetypes
import os
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, StrictInt, field_validator
from swagger_ui_bundle import swagger_ui_path

from ..data.images import ImageLoadError, is_uri, load_image, stored_source
from ..data.records import ImageRef, display_name
from ..index.catalog import CatalogError, PhotoFilter
from ..index.shards import ShardError
from ..search import Page, QueryError, Result, Searcher
from .ids import parse_id
from .live import LiveSearcher
from .middleware import BodyLimit, HeadAsGet, InternalErrors
from .thumbs import THUMB_SIZE, Thumbnails, make_thumbnail

__all__ = ["THUMB_SIZE", "create_app", "make_thumbnail", "serve"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class Hit(BaseModel):
    id: int
    score: float
    name: str
    thumb: str
    image: str
    path: str = Field("", description="relative to the indexed root when under it")
    folder: str = Field("", description="the folder of path")
    weak: bool | None = Field(None, description="below the index's calibrated relevance floor (no good match)")
    z: float | None = Field(None, description="standard deviations above the query's gallery mean")
    duplicates: int = Field(1, description="near-identical images this hit stands for (collapse)")
    date: str | None = Field(None, description="date taken, ISO 8601 local time")
    date_source: str | None = Field(None, description="exif or mtime")
    date_offset: str | None = Field(None, description="UTC offset the camera recorded")
    width: int | None = None
    height: int | None = None
    format: str | None = None
    camera: str | None = None
    lat: float | None = None
    lon: float | None = None


class SearchResponse(BaseModel):
    query: str
    results: list[Hit]
    total: int = Field(0, description="results one can page through with offset")
    offset: int = 0


class Filters(BaseModel):
    """Filters and paging shared by every search route."""

    offset: int = Field(0, ge=0, le=100_000)
    sort: Literal["score", "date"] = "score"
    collapse: bool = Field(False, description="one image per group of near-duplicates")
    folders: list[Annotated[str, Field(max_length=4096)]] = Field(default_factory=list, max_length=32, alias="in")
    glob: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=32)
    after: str | None = Field(None, max_length=32, description="taken on or after (YYYY-MM-DD)")
    before: str | None = Field(None, max_length=32, description="taken before (YYYY-MM-DD)")
    camera: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=32)
    format: list[Annotated[str, Field(max_length=32)]] = Field(default_factory=list, max_length=32)
    min_width: int | None = Field(None, ge=1)
    min_height: int | None = Field(None, ge=1)

    model_config = {"populate_by_name": True}

    def where(self) -> PhotoFilter | None:
        try:
            f = PhotoFilter(folders=tuple(self.folders), globs=tuple(self.glob), after=self.after,
                            before=self.before, cameras=tuple(self.camera), formats=tuple(self.format),
                            min_width=self.min_width, min_height=self.min_height)
        except CatalogError as e:
            raise HTTPException(422, str(e)) from e
        return f or None


QBNORM_HELP = "rank a text query with the index's hubness correction (QB-Norm), when it has one; false: by cosine alone"


class CombinedQuery(Filters):
    q: str | None = Field(None, max_length=1000, description="text query")
    qbnorm: bool = Field(True, description=QBNORM_HELP)
    add: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=32,
                                                              description="texts that pull results toward them")
    subtract: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=32,
                                                                   description="texts that push results away")
    like_id: StrictInt | None = Field(None, description="an indexed image's id (more like this); a JSON integer")
    k: int = Field(9, ge=1)

    @field_validator("q", "add", "subtract")
    @classmethod
    def encodable(cls, value):
        """Texts must be valid Unicode (JSON can carry lone surrogates such as ``"\\ud800"``)."""
        for text in [value] if isinstance(value, str) else value or []:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError("text is not valid Unicode (a lone surrogate)") from e
        return value


def _relative(path: str, root: str) -> str:
    inner = path.rsplit("::", 1)[-1] if "::" in path and "://" not in path else path
    if root and path.startswith(root.rstrip("/") + "/"):
        return display_name(path[len(root.rstrip("/")) + 1:])
    return display_name(inner)


def hit(r: Result, root: str = "") -> Hit:
    """An API hit: a WebDataset member shows its own name, not its shard's; a name that is not
    valid UTF-8 (bytes ``caf\\xe9.jpg`` on Linux) is shown escaped (``caf\\udce9.jpg``)."""
    m = r.meta
    rel = _relative(r.path, root)
    camera = " ".join(x for x in (m.get("camera_make"), m.get("camera_model")) if x) or None
    return Hit(id=r.id, score=round(r.score, 6), name=display_name(Path(r.path.rsplit("::", 1)[-1]).name),
               thumb=f"/thumb/{r.id}", image=f"/image/{r.id}", path=rel, folder=str(Path(rel).parent).strip("."),
               weak=r.weak, z=r.z, duplicates=r.duplicates, date=m.get("taken"), date_source=m.get("date_source"),
               date_offset=m.get("taken_offset"), width=m.get("width"), height=m.get("height"),
               format=m.get("format"), camera=camera, lat=m.get("lat"), lon=m.get("lon"))


def hits(results: list[Result], root: str = "") -> list[Hit]:
    return [hit(r, root) for r in results]


class Sources:
    """What an id shows: a file, a WebDataset member or an http(s) URI; 404 for an unknown id,
    not an id (:func:`parse_id`), a file gone, or one outside the collection (a symlink out of it)."""

    def __init__(self, live: LiveSearcher):
        self.live = live

    def __call__(self, image_id: int) -> str | ImageRef:
        searcher = self.live()
        root = os.path.realpath(searcher.manifest.get("images_root") or "/nonexistent")
        path = searcher.path_for(parse_id(image_id))
        if path is None:
            raise HTTPException(404, "no such image")
        if is_uri(path):
            if path.split("://", 1)[0].lower() not in ("http", "https"):
                raise HTTPException(404, "this image lives in object storage the server does not read")
            return path
        try:
            src = stored_source(path)
        except ImageLoadError as e:
            raise HTTPException(404, "no such image") from e
        real = os.path.realpath(src.path if isinstance(src, ImageRef) else src)
        if os.path.commonpath([real, root]) != root or not os.path.isfile(real):
            raise HTTPException(404, "no such image")
        return ImageRef(real, src.member, src.offset, src.size) if isinstance(src, ImageRef) else real


def _answer(searcher: Searcher, query: str, run) -> SearchResponse:
    """Run ``run()`` (-> a :class:`Page`) with the search errors as HTTP errors."""
    try:
        page: Page = run()
    except QueryError as e:
        raise HTTPException(422, str(e)) from e
    except CatalogError as e:  # a filter on an index without metadata
        raise HTTPException(422, str(e)) from e
    root = searcher.manifest.get("images_root") or ""
    return SearchResponse(query=query, results=hits(page.results, root), total=page.total, offset=page.offset)


def _search_routes(app: FastAPI, live: LiveSearcher, sources: Sources, max_k: int, max_upload_bytes: int) -> None:
    def check_k(k: int) -> int:
        if k > max_k:
            raise HTTPException(422, f"k is at most {max_k}")
        return k

    @app.get("/api/search", response_model=SearchResponse)
    def search_text(f: Annotated[Filters, Query()], q: str = Query("", max_length=1000), k: int = Query(9, ge=1),
                    qbnorm: bool = Query(True, description=QBNORM_HELP)):
        if not q and f.sort != "date":
            raise HTTPException(422, "give q (text), or sort=date to list images newest first")
        s = live()
        return _answer(s, q, lambda: s.search_page(q or None, k=check_k(k), where=f.where(), offset=f.offset,
                                                   sort=f.sort, collapse=f.collapse, qbnorm=qbnorm))

    @app.post("/api/search", response_model=SearchResponse)
    def search_combined(body: CombinedQuery):
        check_k(body.k)
        s = live()
        like_id = None if body.like_id is None else parse_id(body.like_id)
        if like_id is not None and s.path_for(like_id) is None:
            raise HTTPException(404, "no such image")
        return _answer(s, body.q or "", lambda: s.search_page(
            body.q, k=body.k, add=body.add, subtract=body.subtract, like_id=like_id, where=body.where(),
            offset=body.offset, sort=body.sort, collapse=body.collapse, qbnorm=body.qbnorm))

    @app.post("/api/search/image", response_model=SearchResponse)
    def search_upload(f: Annotated[Filters, Query()], file: UploadFile = File(...), k: int = Query(9, ge=1),
                      q: str | None = None, image_weight: float = Query(1.0, ge=-10, le=10)):
        # sync: decoding, the first image query's model load and the search run in a worker thread
        check_k(k)
        s = live()
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        try:
            img = load_image(data, target_size=s.image_size)
        except ImageLoadError as e:
            raise HTTPException(400, f"{file.filename}: {e.reason}") from e
        return _answer(s, q or "", lambda: s.search_page(q, k=k, image=img, image_weight=image_weight,
                                                         where=f.where(), offset=f.offset, sort=f.sort,
                                                         collapse=f.collapse))

    @app.get("/api/similar/{image_id}", response_model=SearchResponse)
    def similar(image_id: str, f: Annotated[Filters, Query()], k: int = Query(9, ge=1)):
        vector_id = parse_id(image_id)
        sources(vector_id)
        s = live()
        try:
            return _answer(s, "", lambda: s.search_page(k=check_k(k), like_id=vector_id, where=f.where(),
                                                        offset=f.offset, sort=f.sort, collapse=f.collapse))
        except HTTPException as e:
            if "no indexed image" in str(e.detail):
                raise HTTPException(404, e.detail) from e
            raise

    _library_routes(app, live, sources)


def _library_routes(app: FastAPI, live: LiveSearcher, sources: Sources) -> None:
    @app.get("/api/info")
    def info() -> dict:
        """What the index holds: image count, model, date range, folders, cameras, formats, and
        example queries."""
        return live().info()

    @app.get("/api/image/{image_id}/info", response_model=Hit)
    def image_info(image_id: str):
        vector_id = parse_id(image_id)
        sources(vector_id)
        s = live()
        meta = s.catalog.metadata_for([vector_id]).get(vector_id)
        if meta is None:
            raise HTTPException(404, "no such image")
        path = meta.pop("path")
        return hit(Result(path, 0.0, vector_id, meta=meta), s.manifest.get("images_root") or "")


def _image_routes(app: FastAPI, sources: Sources, thumbs: Thumbnails) -> None:
    @app.get("/image/{image_id}")
    def image(image_id: str):
        src = sources(parse_id(image_id))
        if isinstance(src, ImageRef):
            try:
                data = src.read_bytes()
            except OSError as e:
                raise HTTPException(404, "no such image") from e
            return Response(data, media_type=mimetypes.guess_type(src.member)[0] or "application/octet-stream")
        if is_uri(src):
            return RedirectResponse(src)
        return FileResponse(src, media_type=mimetypes.guess_type(src)[0] or "application/octet-stream")

    @app.get("/thumb/{image_id}")
    def thumb(image_id: str):
        vector_id = parse_id(image_id)
        data = thumbs.get(vector_id, sources(vector_id))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.exception_handler(ImageLoadError)
    def bad_image(_, exc: ImageLoadError):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ShardError)
    def unreadable_store(_, exc: ShardError):  # the index's own files (e.g. a lost Parquet shard): say which
        log.error("%s", exc)
        return JSONResponse({"detail": str(exc)}, status_code=503)


def json_safe(value):
    """``value`` with every non-finite float (``1e309`` in a request parses to inf) as its text and
    every lone surrogate (``"\\ud800"``) as ``?``, so a validation error that echoes the input can
    always be rendered as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def invalid_request(_, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's usual error list, renderable whatever the input held."""
    return JSONResponse({"detail": json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def create_app(searcher: Searcher, max_k: int = 100, max_upload_bytes: int = 10 * 2**20,
               cors_origins: list[str] | None = None, reload: bool = False) -> FastAPI:
    """The FastAPI app over one open :class:`Searcher`: search API, image/thumbnail serving by
    id, the search page. ``max_k`` caps results per request; uploads over ``max_upload_bytes``
    get 413 (checked as the body streams in); the thumbnail cache is ``searcher.folder/thumbs``
    (thumbnails are made in memory when it cannot be written). ``reload``: swap to a newer build
    of the index between requests (:mod:`.live`)."""
    app = FastAPI(title="dualsearch", description="Natural-language image search over one index.", version="1",
                  docs_url=None, redoc_url=None)  # /docs is served by _page_routes, without a CDN
    # the last added is outermost: HEAD -> CORS -> JSON 500s -> body limit -> routes
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)
    app.add_middleware(InternalErrors)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "HEAD", "POST"])
    app.add_middleware(HeadAsGet)
    app.add_exception_handler(RequestValidationError, invalid_request)
    live = LiveSearcher(searcher, reload=reload)
    sources = Sources(live)
    app.state.live = live

    @app.get("/health")
    async def health() -> dict:  # on the event loop: answers while worker threads are busy searching
        return {"status": "ok", "images": len(live.searcher)}

    _search_routes(app, live, sources, max_k, max_upload_bytes)
    _image_routes(app, sources, Thumbnails(lambda: searcher.folder / "thumbs"))

    _page_routes(app)
    return app


def _page_routes(app: FastAPI) -> None:
    """The search page (``/``, its files under ``/static``) and the API docs (``/docs``): Swagger UI
    with its assets from the installed ``swagger-ui-bundle-v2`` package under ``/docs-assets``, so
    both work with no internet (no CDN)."""
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")


def serve(index: str, host: str = "127.0.0.1", port: int = 8765, cors_origins: list[str] | None = None,
          max_k: int = 100) -> None:
    """Serve one index with uvicorn (127.0.0.1 unless ``host`` says otherwise)."""
    import uvicorn

    searcher = Searcher.open(index)
    app = create_app(searcher, max_k=max_k, cors_origins=cors_origins, reload=True)
    print(f"serving {index} ({len(searcher)} images) on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
