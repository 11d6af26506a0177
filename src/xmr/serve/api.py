"""The HTTP service: `create_app(retriever, settings)` builds a FastAPI app with the JSON API and web page.

Routes (OpenAPI at /docs): GET / (search page), /static/*, GET /api/health, /api/info, /api/metrics,
POST /api/search/{text,image,composed,similar}, GET /api/images/{id}, GET /api/thumbnails/{id}.

Retriever calls are synchronous and CPU-heavy: they run on a small dedicated thread pool, never on the
event loop, so /api/health and the page stay responsive while queries are computed.
"""

from __future__ import annotations

import hmac
import logging
import mimetypes
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from xmr.errors import UnsupportedQuery, XmrError
from xmr.serve.errors import ApiError, InvalidInput, NotFound, Unauthorized, error_body
from xmr.serve.metrics import Metrics, MetricsMiddleware
from xmr.serve.models import (
    ERROR_RESPONSES,
    REFINE_HELP,
    REFINE_K_HELP,
    RERANK_DEPTH_HELP,
    Health,
    MetricsResponse,
    QueryEcho,
    Result,
    SearchResponse,
    SimilarQuery,
    TextQuery,
)
from xmr.serve.runtime import GuardMiddleware, Limiter, ThumbnailCache
from xmr.serve.settings import ServeSettings
from xmr.serve.uploads import (
    FORM_OVERHEAD_BYTES,
    BodyLimitMiddleware,
    decode_image,
    make_thumbnail,
    read_upload,
)

logger = logging.getLogger("xmr.serve")
WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_ID = 2**63 - 1
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_input",
              429: "too_many_requests", 503: "busy"}

ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="Index id of an image (as in search results).")]


class Service:
    """What the routes share: the retriever, the limits, and the bounded worker pools."""

    def __init__(self, retriever: Any, settings: ServeSettings) -> None:
        self.retriever = retriever
        self.settings = settings
        self.images_root = Path(retriever.images_root).resolve()
        self.metrics = Metrics()
        self.queries = Limiter(settings.max_concurrency, settings.max_queue, "xmr-query")
        # Thumbnails get their own pool: a page of results must not starve (or be starved by) queries.
        self.thumbnails = Limiter(settings.thumbnail_workers, 4 * settings.max_k + 64, "xmr-thumb")
        self.thumbnail_cache = ThumbnailCache(settings.thumbnail_cache_items)

    def close(self) -> None:
        self.queries.close()
        self.thumbnails.close()

    # -- validation ------------------------------------------------------------------------------
    def check_k(self, k: int | None) -> int:
        limit = self.settings.max_k
        if k is None:
            return self.settings.default_k
        if not 1 <= k <= limit:
            raise InvalidInput(f"k must be between 1 and {limit}, got {k}", code="invalid_k")
        return k

    def check_depth(self, depth: int | None) -> int | None:
        limit = self.settings.max_rerank_depth
        if depth is not None and not 0 <= depth <= limit:
            raise InvalidInput(f"rerank_depth must be between 0 and {limit}, got {depth}", code="invalid_rerank_depth")
        return depth

    def search_options(self, rerank_depth: int | None, refine: bool | None = None,
                       refine_k: int | None = None) -> dict[str, Any]:
        """The retriever's second-stage options from a request (`refine_k` is `rerank_depth` by its MMRef name)."""
        depth = self.check_depth(rerank_depth)
        if refine_k is not None:
            limit = self.settings.max_refine_k
            if not 0 <= refine_k <= limit:
                raise InvalidInput(f"refine_k must be between 0 and {limit}, got {refine_k}", code="invalid_refine_k")
            if depth is not None and depth != refine_k:
                raise InvalidInput(f"refine_k={refine_k} and rerank_depth={depth} disagree (they are the same K'); "
                                   "give one", code="invalid_refine_k")
            depth = refine_k
        return {"rerank_depth": depth, "refine": refine}

    def check_text(self, text: str | None, what: str = "query text") -> str:
        text = (text or "").strip()
        if not text:
            raise InvalidInput(f"the {what} is empty", code="empty_text")
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(f"the {what} has {len(text)} characters; the limit is "
                               f"{self.settings.max_text_chars}", code="text_too_long")
        return text

    def indexed_file(self, id: int) -> Path:
        """The file of an indexed image, only if it really lies under images_root (symlinks resolved)."""
        try:
            path = Path(self.retriever.image_path(id))
        except (KeyError, IndexError, ValueError, OverflowError, TypeError):
            raise NotFound(f"no indexed image has id {id}") from None
        if not path.is_absolute():
            path = self.images_root / path
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise NotFound(f"the file of image {id} is missing") from None
        if not resolved.is_relative_to(self.images_root) or not resolved.is_file():
            logger.warning("refusing image %s: %s resolves outside images_root %s", id, path, self.images_root)
            raise NotFound(f"image {id} is not available")
        return resolved

    def thumbnail_key(self, id: int) -> tuple[Path, tuple[Any, ...]]:
        """The file and its cache key: a changed file (mtime, size) gets a fresh thumbnail."""
        path = self.indexed_file(id)
        stat = path.stat()
        return path, (id, str(path), stat.st_mtime_ns, stat.st_size)

    def display_path(self, path: str) -> str:
        """Hit paths relative to images_root, so responses never reveal the server's directories."""
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.relative_to(self.images_root).as_posix()
        except ValueError:
            return p.name

    def results(self, request: Request, hits: list[Any], k: int) -> list[Result]:
        base = request.scope.get("root_path", "").rstrip("/")
        return [Result(id=int(h.id), score=float(h.score), first_stage_score=getattr(h, "first_stage_score", None),
                       initial_score=getattr(h, "parts", {}).get("initial_score"),
                       reference_score=getattr(h, "parts", {}).get("reference_score"),
                       score_parts=dict(getattr(h, "parts", {})), path=self.display_path(str(h.path)),
                       thumbnail_url=f"{base}/api/thumbnails/{int(h.id)}", image_url=f"{base}/api/images/{int(h.id)}")
                for h in hits[:k]]


def service_of(request: Request) -> Service:
    return request.app.state.service


def api_key_dependency(settings: ServeSettings) -> Any:
    """Check X-API-Key in constant time when a key is configured; a no-op otherwise."""
    expected = settings.api_key.encode() if settings.api_key else None
    header = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="Required on /api routes (but /api/health) when the server has a key.")

    async def check(key: str | None = Security(header)) -> None:  # a default: `header` is local
        if expected is None:
            return
        if not key:
            raise Unauthorized("this server requires an API key: send it in the X-API-Key header",
                               code="missing_api_key")
        if not hmac.compare_digest(key.encode("utf-8", "replace"), expected):
            raise Unauthorized("the API key is wrong", code="wrong_api_key")

    return check


# ---------------------------------------------------------------------------------------------
# Error handlers: every error is {"error": {"code", "message"}}
# ---------------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers)


async def _xmr_error(request: Request, exc: XmrError) -> JSONResponse:
    # Retriever errors are written for people (e.g. UnsupportedQuery for a composed query).
    code = "unsupported_query" if isinstance(exc, UnsupportedQuery) else "query_error"
    return JSONResponse(error_body(code, str(exc)), status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}"
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Inputs are left out of the details: they can be megabytes of text.
    details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
               for e in exc.errors()]
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body") or "request"
    return JSONResponse(error_body("validation_error", f"{where}: {first['msg']}", details), status_code=422)


def _install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(XmrError, _xmr_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
def _public_routes(router: APIRouter) -> None:
    @router.get("/health", response_model=Health, summary="Liveness and what is served (no API key needed)")
    async def health(request: Request) -> Health:
        svc = service_of(request)
        return Health(status="ok", count=len(svc.retriever), model_id=str(svc.retriever.model_id),
                      supports_composed=bool(svc.retriever.supports_composed),
                      rerank_depth=int(getattr(svc.retriever, "rerank_depth", 0) or 0),
                      auth_required=svc.settings.api_key is not None, version=_version(),
                      limits=svc.settings.public_limits())


def _info_routes(router: APIRouter) -> None:
    @router.get("/info", summary="The retriever's description: model, backend, index kind, dimension...",
                responses=ERROR_RESPONSES)
    async def info(request: Request) -> dict[str, Any]:
        return jsonable_encoder(service_of(request).retriever.info())

    @router.get("/metrics", response_model=MetricsResponse, responses=ERROR_RESPONSES,
                summary="Query counts, errors and latency percentiles (recent window) per route")
    async def metrics(request: Request) -> MetricsResponse:
        svc = service_of(request)
        return MetricsResponse(**svc.metrics.snapshot(), in_flight=svc.queries.pending,
                               capacity=svc.queries.capacity)


def _search_routes(router: APIRouter) -> None:
    @router.post("/search/text", response_model=SearchResponse, responses=ERROR_RESPONSES,
                 summary="Images best matching a description")
    async def search_text(request: Request, query: TextQuery) -> SearchResponse:
        svc, start = service_of(request), time.perf_counter()
        k, text = svc.check_k(query.k), svc.check_text(query.text)
        options = svc.search_options(query.rerank_depth, query.refine, query.refine_k)
        hits = await svc.queries.run(partial(svc.retriever.search_text, **options), text, k)
        return _response(request, svc, hits, k, start, QueryEcho(kind="text", text=text, k=k))

    @router.post("/search/image", response_model=SearchResponse, responses=ERROR_RESPONSES,
                 summary="Images most similar to an uploaded image")
    async def search_image(request: Request, file: Annotated[UploadFile, File(description="JPEG, PNG, WebP...")],
                           k: Annotated[int | None, Form()] = None,
                           rerank_depth: Annotated[int | None, Form(description=RERANK_DEPTH_HELP)] = None,
                           refine: Annotated[bool | None, Form(description=REFINE_HELP)] = None,
                           refine_k: Annotated[int | None, Form(description=REFINE_K_HELP)] = None,
                           ) -> SearchResponse:
        svc, start = service_of(request), time.perf_counter()
        k, options = svc.check_k(k), svc.search_options(rerank_depth, refine, refine_k)
        data = await read_upload(file, svc.settings.max_upload_bytes)

        def job() -> tuple[list[Any], tuple[int, int]]:
            image = decode_image(data, svc.settings.max_image_pixels)
            return svc.retriever.search_image(image, k, **options), image.size

        hits, (w, h) = await svc.queries.run(job)
        return _response(request, svc, hits, k, start, QueryEcho(kind="image", k=k, width=w, height=h))

    @router.post("/search/composed", response_model=SearchResponse, responses=ERROR_RESPONSES,
                 summary="Images like the uploaded one, modified as the text says (composed retrieval)")
    async def search_composed(request: Request, file: Annotated[UploadFile, File(description="Reference image")],
                              text: Annotated[str, Form(description="The modification")] = "",
                              k: Annotated[int | None, Form()] = None,
                              rerank_depth: Annotated[int | None, Form(description=RERANK_DEPTH_HELP)] = None,
                              refine: Annotated[bool | None, Form(description=REFINE_HELP)] = None,
                              refine_k: Annotated[int | None, Form(description=REFINE_K_HELP)] = None,
                              ) -> SearchResponse:
        svc, start = service_of(request), time.perf_counter()
        k, text = svc.check_k(k), svc.check_text(text, "modification text")
        options = svc.search_options(rerank_depth, refine, refine_k)
        data = await read_upload(file, svc.settings.max_upload_bytes)

        def job() -> tuple[list[Any], tuple[int, int]]:
            image = decode_image(data, svc.settings.max_image_pixels)
            return svc.retriever.search_composed(image, text, k, **options), image.size

        hits, (w, h) = await svc.queries.run(job)
        return _response(request, svc, hits, k, start, QueryEcho(kind="composed", text=text, k=k, width=w, height=h))

    @router.post("/search/similar", response_model=SearchResponse, responses=ERROR_RESPONSES,
                 summary="Images most similar to an indexed image (the image itself left out)")
    async def search_similar(request: Request, query: SimilarQuery) -> SearchResponse:
        svc, start = service_of(request), time.perf_counter()
        k, options = svc.check_k(query.k), svc.search_options(query.rerank_depth, query.refine, query.refine_k)
        await run_in_threadpool(svc.indexed_file, query.id)  # 404 for an id that is not indexed
        # The stored vector is the query: the image is not decoded or encoded again.
        hits = await svc.queries.run(partial(svc.retriever.search_similar, **options), query.id, k)
        return _response(request, svc, hits, k, start, QueryEcho(kind="similar", id=query.id, k=k))


def _response(request: Request, svc: Service, hits: list[Any], k: int, start: float,
              echo: QueryEcho) -> SearchResponse:
    took = round((time.perf_counter() - start) * 1000, 3)
    return SearchResponse(results=svc.results(request, hits, k), took_ms=took, query=echo)


def _image_routes(router: APIRouter) -> None:
    @router.get("/images/{id}", response_class=FileResponse, responses=ERROR_RESPONSES,
                summary="The original indexed image")
    async def image(request: Request, id: ImageId) -> FileResponse:
        path = await run_in_threadpool(service_of(request).indexed_file, id)
        # Never let an indexed file be served as HTML or script, whatever its extension says.
        media = mimetypes.guess_type(path.name)[0] or ""
        return FileResponse(path, media_type=media if media.startswith("image/") else "application/octet-stream",
                            headers={"Cache-Control": "private, max-age=3600"})

    @router.get("/thumbnails/{id}", response_class=Response, responses=ERROR_RESPONSES,
                summary="A JPEG thumbnail of an indexed image (longest side: settings.thumbnail_size)")
    async def thumbnail(request: Request, id: ImageId) -> Response:
        svc = service_of(request)
        path, key = await run_in_threadpool(svc.thumbnail_key, id)
        data = svc.thumbnail_cache.get(key)
        if data is None:
            data = await svc.thumbnails.run(make_thumbnail, path, svc.settings.thumbnail_size,
                                            svc.settings.max_image_pixels)
            svc.thumbnail_cache.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _web_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------
def create_app(retriever: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The service over `retriever` (an `xmr.search.retriever.Retriever` or anything with its interface)."""
    settings = settings or ServeSettings()
    service = Service(retriever, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # queued queries are dropped; running ones finish on their threads

    app = FastAPI(title="xmr search", version=_version(), lifespan=lifespan,
                  description="Cross-modal retrieval over an image index. Errors are "
                              '`{"error": {"code": ..., "message": ...}}`.')
    app.state.service = service
    _install_error_handlers(app)
    public, protected = APIRouter(prefix="/api"), APIRouter(
        prefix="/api", dependencies=[Depends(api_key_dependency(settings))])
    _public_routes(public)
    _info_routes(protected)
    _search_routes(protected)
    _image_routes(protected)
    app.include_router(public)
    app.include_router(protected)
    _web_routes(app)
    # Added innermost first: Metrics wraps Guard, so it also counts the 500s that Guard produces.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES)
    app.add_middleware(GuardMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Content-Type"])
    return app


def _version() -> str:
    from xmr import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def run(retriever: Any, settings: ServeSettings | None = None) -> None:
    """Serve `retriever` with uvicorn until interrupted (settings default to `ServeSettings.from_env()`)."""
    import uvicorn

    settings = settings or ServeSettings.from_env()
    if settings.api_key is None and not _is_loopback(settings.host):
        logger.warning("serving on %s without an API key: anyone who can reach it can search and read "
                       "the indexed images (set XMR_API_KEY)", settings.host)
    app = create_app(retriever, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, server_header=False)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                    log_level: str = "warning", timeout: float = 20.0) -> Iterator[str]:
    """Run `app` with uvicorn on a background thread; yields its base URL (port 0 picks a free one).

    For tests, benchmarks and notebooks; the server stops when the block exits.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="xmr-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise XmrError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        bound = sock.getsockname()[1]
        yield f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
