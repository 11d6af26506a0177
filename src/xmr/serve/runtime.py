"""Machinery that keeps the service alive under load and bad luck: bounded worker pools, the
thumbnail cache, and the outermost guard that turns any unexpected exception into a JSON 500."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from xmr.serve.errors import Busy, error_body

logger = logging.getLogger("xmr.serve")
T = TypeVar("T")

# The page and its assets only ever load from this server (the docs pages at /docs load Swagger UI
# from FastAPI's CDN, so they are left without this policy).
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
NO_CSP_PREFIXES = ("/docs", "/redoc")


class Limiter:
    """Run blocking calls on `concurrency` dedicated threads with at most `queue` more waiting.

    Admission is decided at once: when `concurrency + queue` calls are already pending the caller gets
    Busy (503) immediately instead of piling up. A slot is released when the call *finishes*, not when
    the client gives up, so the bound holds for the CPU work actually in progress.
    """

    def __init__(self, concurrency: int, queue: int, name: str) -> None:
        self.concurrency = concurrency
        self.capacity = concurrency + queue
        self.name = name
        self.pending = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:  # (re)created lazily, so an app can be started again after shutdown
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=self.name)
        return self._pool

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self.pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            if self.pending >= self.capacity:
                raise Busy(f"the server is busy ({self.pending} requests in progress or waiting); retry shortly",
                           headers={"Retry-After": "1"})
            self.pending += 1
            try:
                future = self._executor().submit(fn, *args)
            except RuntimeError:  # the pool is shutting down
                self.pending -= 1
                raise Busy("the server is shutting down") from None
        future.add_done_callback(self._release)
        # Cancelling the awaiting task cancels the future too while it is still queued.
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class ThumbnailCache:
    """A thread-safe LRU of encoded thumbnails; keys include the file's mtime and size."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: Hashable, data: bytes) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class GuardMiddleware:
    """Answer unexpected exceptions with a JSON 500 (logged with its traceback, never sent), and add
    security headers: nosniff and no referrer everywhere, a same-origin-only CSP on the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        csp = not scope["path"].startswith(NO_CSP_PREFIXES)

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if csp:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # too late for a JSON body; the server closes the connection
            body = error_body("internal_error", "internal server error (logged on the server)")
            await JSONResponse(body, status_code=500)(scope, receive, send_with_headers)
