"""In-process request metrics: counts, errors, status codes and latency percentiles per route.

Latencies are kept in a bounded window per route (the most recent `window` requests), so memory is
constant however long the service runs, and percentiles describe recent behaviour.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SEARCH_PREFIX = "/api/search/"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an already sorted list; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies: deque[float] | list[float]) -> dict[str, float | None]:
    values = sorted(latencies)
    return {name: None if (v := percentile(values, q)) is None else round(v, 3)
            for name, q in (("p50", 50), ("p90", 90), ("p99", 99))}


class _RouteStats:
    __slots__ = ("count", "errors", "latencies")

    def __init__(self, window: int) -> None:
        self.count = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=window)


class Metrics:
    """Thread-safe counters; `record` is called once per finished API request."""

    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self.started = time.time()
        self._lock = threading.Lock()
        self._routes: dict[str, _RouteStats] = {}
        self._status: Counter[int] = Counter()
        self._queries = _RouteStats(window)  # all search routes together
        self.errors = 0
        self.rejected = 0  # 503: the query queue was full

    def record(self, route: str, status: int, latency_ms: float) -> None:
        failed = status >= 400
        with self._lock:
            stats = self._routes.get(route)
            if stats is None:
                stats = self._routes[route] = _RouteStats(self.window)
            for s in (stats, self._queries) if route.startswith(SEARCH_PREFIX) else (stats,):
                s.count += 1
                s.errors += failed
                s.latencies.append(latency_ms)
            self._status[status] += 1
            self.errors += failed
            self.rejected += status == 503

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "queries": self._queries.count,
                "query_errors": self._queries.errors,
                "errors": self.errors,
                "rejected": self.rejected,
                "latency_ms": summarize(self._queries.latencies),
                "by_route": {route: {"count": s.count, "errors": s.errors, "latency_ms": summarize(s.latencies)}
                             for route, s in sorted(self._routes.items())},
                "status": {str(code): n for code, n in sorted(self._status.items())},
                "uptime_s": round(time.time() - self.started, 3),
            }


class MetricsMiddleware:
    """Time every /api request and record it under its route template (e.g. /api/images/{id}).

    Templates, not raw paths, keep the number of keys bounded whatever URLs clients send.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, prefix: str = "/api/") -> None:
        self.app = app
        self.metrics = metrics
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before starting a response
        start = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "(unmatched)"
            self.metrics.record(route, status, (time.perf_counter() - start) * 1000)
