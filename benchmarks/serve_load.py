"""Load test of the HTTP service: bounded concurrent text queries against a loopback server.

    python benchmarks/serve_load.py                        # fake retriever, 20 ms synthetic encoder
    python benchmarks/serve_load.py --latency-ms 5 --concurrency 16 --requests 2000
    python benchmarks/serve_load.py --index runs/x/gallery.index --checkpoint runs/x/last

Prints one JSON object: throughput, client-side latency percentiles, errors and status codes, and the
server's own /api/metrics view. The fake retriever sleeps `--latency-ms` per query (standing in for a
text encoder, which releases the GIL like torch does) and then runs a real exact top-k over a random
gallery of `--gallery-size` x `--dim` float32 vectors with numpy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Parallelism comes from the server's worker threads; multithreaded OpenBLAS under them oversubscribes
# the cores (a 0.2 ms top-k took ~9 ms on 2 busy cores). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, row

QUERIES = ["a woman in a red jacket and white trousers", "a man with a black backpack and blue jeans",
           "a person wearing a yellow shirt", "a girl in a pink dress carrying a bag",
           "a man in a grey coat and dark shoes", "someone in a green hoodie riding a bike"]


@dataclass
class FakeHit:
    id: int
    path: str
    score: float


class SyntheticRetriever:
    """The xmr Retriever interface with a configurable encoding delay and a real numpy top-k."""

    model_id = "synthetic"
    supports_composed = False

    def __init__(self, latency_ms: float, gallery_size: int, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((gallery_size, dim), dtype=np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.latency_s = latency_ms / 1000
        self.dim = dim
        self.images_root = Path(tempfile.gettempdir())

    def __len__(self) -> int:
        return len(self.vectors)

    def _encode(self, text: str) -> np.ndarray:
        time.sleep(self.latency_s)
        v = np.random.default_rng(zlib.crc32(text.encode())).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    def search_text(self, text: str, k: int = 10, rerank_depth: int | None = None) -> list[FakeHit]:
        scores = self.vectors @ self._encode(text)
        top = np.argpartition(-scores, k)[:k]
        top = top[np.argsort(-scores[top])]
        return [FakeHit(int(i), f"gallery/{i:06d}.jpg", float(scores[i])) for i in top]

    def search_image(self, image: Any, k: int = 10, rerank_depth: int | None = None) -> list[FakeHit]:
        return self.search_text("image", k)

    def search_composed(self, image: Any, text: str, k: int = 10, rerank_depth: int | None = None) -> list[FakeHit]:
        from xmr.search.retriever import UnsupportedQuery

        raise UnsupportedQuery("the synthetic retriever has no composed queries")

    def image_path(self, id: int) -> Path:
        raise KeyError(id)

    def info(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "count": len(self), "backend": "numpy", "kind": "flat", "dim": self.dim}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p90": round(float(np.percentile(arr, 90)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2), "max": round(float(arr.max()), 2),
            "mean": round(float(arr.mean()), 2)}


async def load(url: str, requests: int, concurrency: int, k: int, api_key: str | None) -> dict[str, Any]:
    """`concurrency` workers share `requests` POST /api/search/text calls; returns client-side stats."""
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    latencies: list[float] = []
    status: Counter[str] = Counter()
    next_index = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in next_index:
            body = {"text": QUERIES[i % len(QUERIES)], "k": k}
            start = time.perf_counter()
            try:
                r = await client.post(f"{url}/api/search/text", json=body, headers=headers)
                status[str(r.status_code)] += 1
            except httpx.HTTPError as err:
                status[type(err).__name__] += 1
            latencies.append((time.perf_counter() - start) * 1000)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        for _ in range(min(5, requests)):  # warm-up: connections, first-call costs
            await client.post(f"{url}/api/search/text", json={"text": QUERIES[0], "k": k}, headers=headers)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ok = status.get("200", 0)
    return {"requests": requests, "concurrency": concurrency, "duration_s": round(elapsed, 3),
            "throughput_rps": round(requests / elapsed, 1), "ok": ok, "errors": requests - ok,
            "status": dict(sorted(status.items())), "latency_ms": percentiles(latencies)}


def direct_throughput(retriever: Any, requests: int, threads: int, k: int) -> float:
    """Queries/s of calling the retriever itself from `threads` threads: the ceiling the service can reach."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: retriever.search_text(QUERIES[i % len(QUERIES)], k), range(requests)))
    return requests / (time.perf_counter() - start)


def build_retriever(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    if args.index:
        from xmr.search.retriever import load as load_retriever

        retriever = load_retriever(args.index, args.checkpoint, device=args.device, precision=args.precision)
        return retriever, {"retriever": "real", "index": str(args.index), "count": len(retriever)}
    retriever = SyntheticRetriever(args.latency_ms, args.gallery_size, args.dim)
    return retriever, {"retriever": "synthetic", "synthetic_latency_ms": args.latency_ms, "gallery_size": args.gallery_size,
                       "dim": args.dim}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, help="Serve a real index instead of the synthetic retriever.")
    p.add_argument("--checkpoint", type=Path, help="Checkpoint for --index (default: the one it records).")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--latency-ms", type=float, default=20.0, help="Synthetic encoding time per query.")
    p.add_argument("--gallery-size", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=8, help="Client requests in flight.")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-concurrency", type=int, default=2, help="Server: queries computed at once.")
    p.add_argument("--max-queue", type=int, default=16, help="Server: queries waiting; more get 503.")
    p.add_argument("--api-key", default=None, help="Run with this key required (checks the auth path too).")
    p.add_argument("--out", type=Path, help="Also write the JSON here.")
    p.add_argument("--quick", action="store_true", help="100 requests: a smoke run.")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 100)

    from xmr.serve import ServeSettings, create_app, serve_in_thread

    retriever, described = build_retriever(args)
    ceiling = direct_throughput(retriever, args.requests, args.max_concurrency, args.k)
    settings = ServeSettings(max_concurrency=args.max_concurrency, max_queue=args.max_queue, api_key=args.api_key,
                             access_log=False)
    with serve_in_thread(create_app(retriever, settings), log_level="error") as url:
        report = asyncio.run(load(url, args.requests, args.concurrency, args.k, args.api_key))
        import httpx

        server = httpx.get(f"{url}/api/metrics", headers={"X-API-Key": args.api_key} if args.api_key else {}).json()
    report["server"] = {**described, "max_concurrency": args.max_concurrency, "max_queue": args.max_queue,
                        "queries": server["queries"], "rejected": server["rejected"],
                        "latency_ms": server["latency_ms"]}
    report["direct_qps"] = round(ceiling, 1)
    report["benchmark"], report["machine"] = "serve_load", machine()
    lat = report["latency_ms"]
    report["rows"] = [
        row(f"HTTP text queries, {args.concurrency} clients, server concurrency {args.max_concurrency}",
            report["throughput_rps"], "req/s", reference=ceiling,
            reference_name=f"retriever called directly from {args.max_concurrency} threads",
            note=f"{described['retriever']} retriever"),
        row("latency p50 (client side)", lat.get("p50", 0.0), "ms", higher_is_better=False),
        row("latency p99 (client side)", lat.get("p99", 0.0), "ms", higher_is_better=False),
        row("errors", report["errors"], "requests", target="0", met=report["errors"] == 0),
    ]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["errors"] == 0 else 1)
