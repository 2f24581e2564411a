"""The HTTP API and search page (FastAPI). One `Searcher`, loaded once, shared by all requests.

Images are served only by their opaque id (the catalog's vector id); a request can never name a
file path. A catalog path that resolves outside the indexed collection (a symlink out of it) is
answered 404 too.
"""
from __future__ import annotations

import io
import logging
import mimetypes
import os
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..data.images import ImageLoadError, fetch_uri, is_uri, load_image, stored_source
from ..data.records import ImageRef
from ..search import QueryError, Result, Searcher

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
THUMB_SIZE = 256


class Hit(BaseModel):
    id: int
    score: float
    name: str
    thumb: str
    image: str


class SearchResponse(BaseModel):
    query: str
    results: list[Hit]


class CombinedQuery(BaseModel):
    q: str | None = Field(None, description="text query")
    add: list[str] = Field(default_factory=list, description="texts that pull results toward them")
    subtract: list[str] = Field(default_factory=list, description="texts that push results away")
    like_id: int | None = Field(None, description="an indexed image's id (more like this)")
    k: int = Field(9, ge=1)


def hits(results: list[Result]) -> list[Hit]:
    """API hits: a WebDataset member shows its own name, not its shard's."""
    return [Hit(id=r.id, score=round(r.score, 6), name=Path(r.path.rsplit("::", 1)[-1]).name,
                thumb=f"/thumb/{r.id}", image=f"/image/{r.id}") for r in results]


class Sources:
    """What an id shows: a file, a WebDataset member or an http(s) URI; 404 for an unknown id,
    not a number, a file gone, or one outside the collection (a symlink out of it)."""

    def __init__(self, searcher: Searcher):
        self.searcher = searcher
        self.root = os.path.realpath(searcher.manifest.get("images_root") or "/nonexistent")

    def __call__(self, image_id: str) -> str | ImageRef:
        if not image_id.isdigit():
            raise HTTPException(404, "no such image")
        path = self.searcher.path_for(int(image_id))
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
        if os.path.commonpath([real, self.root]) != self.root or not os.path.isfile(real):
            raise HTTPException(404, "no such image")
        return ImageRef(real, src.member, src.offset, src.size) if isinstance(src, ImageRef) else real


def _search_routes(app: FastAPI, searcher: Searcher, sources: Sources, max_k: int, max_upload_bytes: int) -> None:
    def check_k(k: int) -> int:
        if k > max_k:
            raise HTTPException(422, f"k is at most {max_k}")
        return k

    @app.get("/api/search", response_model=SearchResponse)
    def search_text(q: str = Query(..., min_length=1, max_length=1000), k: int = Query(9, ge=1)):
        return SearchResponse(query=q, results=hits(searcher.search(q, k=check_k(k))))

    @app.post("/api/search", response_model=SearchResponse)
    def search_combined(body: CombinedQuery):
        check_k(body.k)
        if body.like_id is not None and searcher.path_for(body.like_id) is None:
            raise HTTPException(404, "no such image")
        try:
            res = searcher.search(body.q, k=body.k, add=body.add, subtract=body.subtract, like_id=body.like_id)
        except QueryError as e:
            raise HTTPException(422, str(e)) from e
        return SearchResponse(query=body.q or "", results=hits(res))

    @app.post("/api/search/image", response_model=SearchResponse)
    async def search_upload(file: UploadFile = File(...), k: int = Query(9, ge=1), q: str | None = None):
        check_k(k)
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
        try:
            img = load_image(data, target_size=searcher.image_size)
        except ImageLoadError as e:
            raise HTTPException(400, f"{file.filename}: {e.reason}") from e
        return SearchResponse(query=q or "", results=hits(searcher.search(q, k=k, image=img)))

    @app.get("/api/similar/{image_id}", response_model=SearchResponse)
    def similar(image_id: str, k: int = Query(9, ge=1)):
        sources(image_id)
        return SearchResponse(query="", results=hits(searcher.search(k=check_k(k), like_id=int(image_id))))


def _image_routes(app: FastAPI, sources: Sources, thumbs: Path) -> None:
    @app.get("/image/{image_id}")
    def image(image_id: str):
        src = sources(image_id)
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
        src = sources(image_id)
        out = thumbs / f"{int(image_id)}.jpg"
        if not out.is_file():
            make_thumbnail(src, out)
        return FileResponse(out, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.exception_handler(ImageLoadError)
    def bad_image(_, exc: ImageLoadError):
        return JSONResponse({"detail": str(exc)}, status_code=404)


def create_app(searcher: Searcher, max_k: int = 100, max_upload_bytes: int = 10 * 2**20,
               cors_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app over one open :class:`Searcher`: search API, image/thumbnail serving by
    id, the search page. ``max_k`` caps results per request; uploads over ``max_upload_bytes``
    get 413."""
    app = FastAPI(title="dualsearch", description="Natural-language image search over one index.", version="1")
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"])
    sources = Sources(searcher)

    @app.get("/health")
    async def health() -> dict:  # on the event loop: answers while worker threads are busy searching
        return {"status": "ok", "images": len(searcher)}

    _search_routes(app, searcher, sources, max_k, max_upload_bytes)
    _image_routes(app, sources, searcher.folder / "thumbs")

    @app.get("/")
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def make_thumbnail(src: str | ImageRef, out: Path, size: int = THUMB_SIZE) -> None:
    """A JPEG thumbnail, made once (written to a temp name and renamed into place)."""
    img = load_image(fetch_uri(src) if isinstance(src, str) and is_uri(src) else src, target_size=size)
    img.thumbnail((size, size))
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)


def serve(index: str, host: str = "127.0.0.1", port: int = 8765, cors_origins: list[str] | None = None,
          max_k: int = 100) -> None:
    import uvicorn

    searcher = Searcher.open(index)
    app = create_app(searcher, max_k=max_k, cors_origins=cors_origins)
    print(f"serving {index} ({len(searcher)} images) on http://{host}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
