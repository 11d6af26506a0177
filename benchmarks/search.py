"""Vector search at scale: xmr.index flat / hnsw / ivfpq against a plain numpy matmul + argpartition.

Prints one JSON object. For each size (clustered 512-d unit vectors from xmr.index.synthetic, a
seeded Gaussian mixture shaped like real embeddings) and each method, measured in a fresh
subprocess so memory figures do not mix:

* build_s: creating the index and adding the vectors in chunks of 50k (as `xmr index build` does);
* peak_extra_mib / extra_mib: peak and retained resident memory above the loaded data set during
  the build (VmHWM - VmRSS; the high-water mark is reset through /proc/self/clear_refs);
* latency_ms p50/p99: single queries, k=10, one at a time;
* batch_qps: queries per second for one batch of 1000 queries, k=10;
* recall_at_10: against exact search (numpy, computed once per size) on the batch's queries;
* save_s / open_s / disk_mib: writing the index directory and opening it again.

The machine this was written on has 2 cores shared with others: FAISS and BLAS use --threads
(default: all cores). HNSW on 1M vectors takes tens of minutes there (--skip-1m-hnsw).

Usage: python benchmarks/search.py [--quick] [--sizes 100000,1000000] [--methods numpy,flat,hnsw,ivfpq]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512
K = 10
CHUNK = 50_000
METHODS = ("numpy", "flat", "hnsw", "ivfpq")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Worker: one method on one size
# ----------------------------------------------------------------------------------------------
def numpy_topk(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one matmul and an argpartition per block of queries (bounded to ~256 MiB)."""
    step = max(1, 2**26 // len(base))
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), step):
        sim = queries[s : s + step] @ base.T
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-part_scores, axis=1)
        rows[s : s + step] = np.take_along_axis(part, order, axis=1)
        scores[s : s + step] = np.take_along_axis(part_scores, order, axis=1)
    return scores, rows


def build(method: str, base: np.ndarray, params: dict) -> object:
    from xmr.index import create_index

    index = create_index(DIM, "benchmark", kind=method, params=params)
    paths = [f"{i}.jpg" for i in range(len(base))]
    started = time.perf_counter()
    for s in range(0, len(base), CHUNK):
        index.add(base[s : s + CHUNK], paths[s : s + CHUNK])
        log(f"  {method} n={len(base)}: added {min(s + CHUNK, len(base))} ({time.perf_counter() - started:.1f} s)")
    return index


def worker(spec: dict) -> dict:
    import faiss

    faiss.omp_set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    base = np.load(folder / "base.npy")
    singles, batch = np.load(folder / "singles.npy"), np.load(folder / "batch.npy")
    method = spec["method"]
    baseline, reset = _status_kib("VmRSS"), _reset_peak()
    started = time.perf_counter()
    if method == "numpy":
        def search(q: np.ndarray) -> np.ndarray:
            return numpy_topk(base, np.atleast_2d(q), K)[1]
        index = None
    else:
        index = build(method, base, spec["params"])

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K)[1]
    out: dict = {"build_s": round(time.perf_counter() - started, 2),
                 "peak_extra_mib": round((_status_kib("VmHWM") - baseline) / 1024, 1) if reset else None,
                 "extra_mib": round((_status_kib("VmRSS") - baseline) / 1024, 1)}
    for q in singles[:5]:  # warm-up: page faults, FAISS thread pool
        search(q)
    times = []
    for q in singles:
        t = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t) * 1000)
    out["latency_ms"] = {"p50": round(float(np.percentile(times, 50)), 3),
                         "p99": round(float(np.percentile(times, 99)), 3)}
    t = time.perf_counter()
    found = search(batch)
    out["batch_qps"] = round(len(batch) / (time.perf_counter() - t), 1)
    truth = np.load(folder / "truth.npy")
    from xmr.index.synthetic import recall_at_k

    out["recall_at_10"] = round(recall_at_k(found, truth, K), 4)
    if index is not None and spec["save"]:
        out.update(_save_and_open(index, folder / f"index-{method}"))
    if index is not None:
        out["params"] = index.manifest.params
    return out


def _save_and_open(index, target: Path) -> dict:
    from xmr.index import open_index

    t = time.perf_counter()
    index.save(target)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    open_index(target)
    open_s = time.perf_counter() - t
    disk = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    shutil.rmtree(target, ignore_errors=True)
    return {"save_s": round(save_s, 2), "open_s": round(open_s, 2), "disk_mib": round(disk / 2**20, 1)}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def make_data(folder: Path, n: int, singles: int, batch: int, mixture: dict) -> None:
    from xmr.index.synthetic import clustered_vectors, sample_queries

    t = time.perf_counter()
    base = clustered_vectors(n, DIM, **mixture)
    np.save(folder / "base.npy", base)
    np.save(folder / "singles.npy", sample_queries(singles, DIM, stream=1, **mixture))
    queries = sample_queries(batch, DIM, stream=2, **mixture)
    np.save(folder / "batch.npy", queries)
    np.save(folder / "truth.npy", numpy_topk(base, queries, K)[1])  # exact ground truth
    log(f"data n={n}: {time.perf_counter() - t:.1f} s")


def method_params(method: str, n: int, args: argparse.Namespace) -> dict:
    if method == "hnsw":
        return {"M": args.hnsw_m, "efConstruction": args.ef_construction, "efSearch": args.ef_search}
    if method == "ivfpq":
        nlist = args.nlist or int(2 ** round(np.log2(2 * np.sqrt(n))))  # ~2 sqrt(n), a power of two
        return {"nlist": nlist, "m": 64, "nbits": 8, "nprobe": args.nprobe, "rerank": None}
    return {}


def run_worker(spec: dict, timeout: float | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "OPENBLAS_NUM_THREADS": str(spec["threads"])}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, stdout=subprocess.PIPE,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--quick", action="store_true", help="one 20k gallery, 100 single queries: a smoke run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-1m-hnsw", action="store_true", help="skip HNSW at sizes >= 1M (a long build)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--singles", type=int, default=200, help="single queries for the latency percentiles")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the throughput batch")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=200)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~2 sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--mixture", default="{}", help='JSON overrides of xmr.index.synthetic.Mixture, e.g. '
                        '\'{"isotropic": 0.8, "clusters": 100}\' for harder data')
    parser.add_argument("--no-save", action="store_true", help="skip the save/open timings")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per method before giving up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    singles = 100 if args.quick else args.singles
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    from xmr.index.synthetic import Mixture

    mixture = json.loads(args.mixture)
    report: dict = {"data": {**Mixture(dim=DIM, **mixture).__dict__}, "dim": DIM, "k": K, "threads": args.threads, "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "single_queries": singles, "batch": args.batch, "results": {}}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="xmr-search-bench-") as tmp:
            make_data(Path(tmp), n, singles, args.batch, mixture)
            results = report["results"][str(n)] = {}
            for method in methods:
                if method == "hnsw" and n >= 1_000_000 and args.skip_1m_hnsw:
                    results[method] = {"skipped": "--skip-1m-hnsw"}
                    continue
                log(f"n={n} {method} ...")
                spec = {"method": method, "folder": tmp, "threads": args.threads, "save": not args.no_save,
                        "params": method_params(method, n, args)}
                try:
                    results[method] = run_worker(spec, args.timeout)
                except subprocess.TimeoutExpired:
                    results[method] = {"error": f"timed out after {args.timeout} s"}
                log(f"n={n} {method}: {json.dumps(results[method])}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
