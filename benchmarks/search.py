"""Vector search at scale (issue #4, item 5): xmr.index flat / hnsw / ivfpq against numpy brute force.

For each gallery size (clustered 512-d unit vectors from xmr.index.synthetic: a seeded Gaussian
mixture shaped like real embeddings) and each method, measured in a fresh subprocess so memory
figures do not mix:

* build_s: creating the index, adding the vectors in chunks of 50k (as `xmr index build` does) and,
  for ivfpq with its "auto" parameters, the training that save() triggers (k-means by size);
* peak_extra_mib / extra_mib: peak and retained resident memory above the loaded data set during
  the build (VmHWM - VmRSS; the high-water mark is reset through /proc/self/clear_refs);
* latency_ms p50/p99: single queries (held-out: drawn from the mixture, not gallery points), k=10;
* batch_qps: one (n, 512) batch of 1000 held-out queries, k=10, in one search call;
* recall_at_10: of that batch against exact ground truth (numpy brute force, computed once per size);
* save_s / open_s / open_mmap_s / disk_mib: writing the index and opening it again, read into memory
  and memory-mapped (mmap_rss_mib: resident memory the mapped open added; mmap_same: the mapped
  index returns the same ids and scores as the in-memory one).

Methods: numpy (matmul + argpartition: the reference), flat (xmr's exact index), hnsw and ivfpq with
the defaults of xmr.index (ivfpq: nlist/nprobe chosen by size), and hnsw-efc200 (the previous HNSW
defaults, M 32 / efConstruction 200), run at the smallest size only as the build-time reference.
The machine limit of an exact scan is one pass over the n x 512 float32 vectors at the measured
memory bandwidth (`_common.memory_bandwidth_gbs`).

Default run (sizes 100k and 1M, all methods): about 15-20 minutes on 2 idle cores, most of it the 1M
HNSW build and the 1M IVF k-means; `--quick` (20k, fewer queries, no reference build): about a
minute of CPU (several minutes of wall time when the 2 cores are shared with other work).
Usage: python benchmarks/search.py [--quick] [--sizes 100000,1000000] [--methods numpy,flat,hnsw,ivfpq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, memory_bandwidth_gbs, row

DIM = 512
K = 10
CHUNK = 50_000
METHODS = ("numpy", "flat", "hnsw", "ivfpq")
PREVIOUS_HNSW = {"M": 32, "efConstruction": 200, "efSearch": 128}  # the defaults before issue #4
TARGET_MS, TARGET_RECALL = 5.0, 0.95


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
    """The reference: one numpy matmul and an argpartition per block of queries (bounded to ~256 MiB)."""
    from xmr.index.synthetic import exact_topk

    return exact_topk(base, queries, k)


def build(kind: str, base: np.ndarray, params: dict) -> Any:
    from xmr.index import create_index

    index = create_index(DIM, "benchmark", kind=kind, params=params)
    paths = [f"{i}.jpg" for i in range(len(base))]
    started = time.perf_counter()
    for s in range(0, len(base), CHUNK):
        index.add(base[s : s + CHUNK], paths[s : s + CHUNK])
        log(f"  {kind} n={len(base)}: added {min(s + CHUNK, len(base))} ({time.perf_counter() - started:.1f} s)")
    return index


def _latencies(search: Any, singles: np.ndarray) -> dict[str, float]:
    for q in singles[:5]:  # warm-up: page faults, FAISS thread pool
        search(q)
    times = []
    for q in singles:
        t = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p99": round(float(np.percentile(times, 99)), 3)}


def worker(spec: dict) -> dict:
    import faiss

    faiss.omp_set_num_threads(spec["threads"])
    folder = Path(spec["folder"])
    base = np.load(folder / "base.npy")
    singles, batch = np.load(folder / "singles.npy"), np.load(folder / "batch.npy")
    method = spec["method"]
    kind = "hnsw" if method.startswith("hnsw") else method
    baseline, reset = _status_kib("VmRSS"), _reset_peak()
    started = time.perf_counter()
    index = None
    if method == "numpy":
        def search(q: np.ndarray) -> np.ndarray:
            return numpy_topk(base, np.atleast_2d(q), K)[1]
    else:
        index = build(kind, base, spec["params"])
        target = folder / f"index-{method}"
        t = time.perf_counter()
        index.save(target)  # for "auto" ivfpq this trains: part of the build
        save_s = time.perf_counter() - t

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, K)[1]
    out: dict = {"build_s": round(time.perf_counter() - started, 2),
                 "peak_extra_mib": round((_status_kib("VmHWM") - baseline) / 1024, 1) if reset else None,
                 "extra_mib": round((_status_kib("VmRSS") - baseline) / 1024, 1)}
    out["latency_ms"] = _latencies(search, singles)
    t = time.perf_counter()
    found = search(batch)
    out["batch_qps"] = round(len(batch) / (time.perf_counter() - t), 1)
    from xmr.index.synthetic import recall_at_k

    out["recall_at_10"] = round(recall_at_k(found, np.load(folder / "truth.npy"), K), 4)
    if index is not None:
        out["params"] = index.manifest.params
        out["save_s"] = round(save_s, 2)
        index = None  # free the built one (the search closure sees this) so the opens measure themselves
        out.update(_open_both_ways(target, batch, singles))
        shutil.rmtree(target, ignore_errors=True)
    return out


def _open_both_ways(target: Path, batch: np.ndarray, singles: np.ndarray) -> dict:
    """Open the saved index read into memory and memory-mapped; the mapped one must answer the same."""
    from xmr.index import open_index

    disk = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    t = time.perf_counter()
    loaded = open_index(target)
    open_s = time.perf_counter() - t
    ref = loaded.search(batch[:200], K)
    del loaded
    rss = _status_kib("VmRSS")
    t = time.perf_counter()
    mapped = open_index(target, mmap=True)
    open_mmap_s = time.perf_counter() - t
    mmap_rss = (_status_kib("VmRSS") - rss) / 1024
    got = mapped.search(batch[:200], K)
    same = bool(np.array_equal(got[1], ref[1]) and np.allclose(got[0], ref[0], atol=1e-5))
    lat = _latencies(lambda q: mapped.search(q, K), singles[: max(20, len(singles) // 4)])
    return {"open_s": round(open_s, 3), "open_mmap_s": round(open_mmap_s, 3), "mmap_rss_mib": round(mmap_rss, 1),
            "mmap_same": same, "mmap_latency_ms": lat, "disk_mib": round(disk / 2**20, 1)}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def make_data(folder: Path, n: int, singles: int, batch: int, mixture: dict) -> None:
    from xmr.index.synthetic import clustered_vectors, sample_queries

    t = time.perf_counter()
    base = clustered_vectors(n, DIM, **mixture)
    np.save(folder / "base.npy", base)
    np.save(folder / "singles.npy", sample_queries(singles, DIM, stream=1, **mixture))  # held out: not gallery
    queries = sample_queries(batch, DIM, stream=2, **mixture)
    np.save(folder / "batch.npy", queries)
    np.save(folder / "truth.npy", numpy_topk(base, queries, K)[1])  # exact ground truth
    log(f"data n={n}: {time.perf_counter() - t:.1f} s")


def method_params(method: str, args: argparse.Namespace) -> dict:
    if method == "hnsw-efc200":
        return dict(PREVIOUS_HNSW)
    if method == "hnsw":
        return {k: v for k, v in {"M": args.hnsw_m, "efConstruction": args.ef_construction,
                                  "efSearch": args.ef_search}.items() if v is not None}
    if method == "ivfpq":
        return {k: v for k, v in {"nlist": args.nlist, "nprobe": args.nprobe}.items() if v is not None}
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


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def make_rows(results: dict, bandwidth_gbs: float) -> list[dict]:
    """The table rows (see _common.row) from the per-size, per-method results."""
    rows: list[dict] = []
    sizes = sorted(int(n) for n in results)
    for n in sizes:
        res, label = results[str(n)], _label(n)
        ok = {m: r for m, r in res.items() if "latency_ms" in r}
        exact_name = "flat" if "flat" in ok else "numpy" if "numpy" in ok else None
        exact = ok.get(exact_name, {}) if exact_name else {}
        scan_ms = n * DIM * 4 / (bandwidth_gbs * 1e9) * 1000
        for name in ("flat", "numpy"):
            if name in ok:
                rows.append(row(f"exact search p50 latency, k=10, {name}, n={label}", ok[name]["latency_ms"]["p50"],
                                "ms", reference=ok["numpy"]["latency_ms"]["p50"] if "numpy" in ok else None,
                                reference_name="numpy matmul+argpartition", higher_is_better=False,
                                limit=scan_ms, limit_name=f"one pass over {n}x{DIM} fp32 at {bandwidth_gbs:.1f} GB/s",
                                note="the limit: streaming the vectors once from memory"))
        for m in ("hnsw", "ivfpq"):
            if m not in ok:
                if m in res:
                    rows.append(row(f"{m} p50 latency, k=10, n={label}", None, "ms", note=str(res[m])[:200]))
                continue
            r, recall = ok[m], ok[m]["recall_at_10"]
            p50 = r["latency_ms"]["p50"]
            params = ", ".join(f"{k} {v}" for k, v in r.get("params", {}).items()
                               if k in ("M", "efConstruction", "efSearch", "nlist", "m", "nprobe"))
            rows.append(row(f"{m} p50 latency, k=10, n={label}", p50, "ms",
                            reference=exact.get("latency_ms", {}).get("p50"), reference_name=f"exact {exact_name}",
                            higher_is_better=False, target=f"< {TARGET_MS:g} ms at recall@10 >= {TARGET_RECALL}",
                            met=p50 < TARGET_MS and recall >= TARGET_RECALL,
                            note=f"recall@10 {recall}, p99 {r['latency_ms']['p99']} ms; {params}"))
            rows.append(row(f"{m} recall@10 vs exact, n={label}", recall, "", target=f">= {TARGET_RECALL}",
                            met=recall >= TARGET_RECALL, note="1000 held-out queries from the same mixture"))
            rows.append(row(f"{m} batch throughput (1000 queries), n={label}", r["batch_qps"], "queries/s",
                            reference=exact.get("batch_qps"), reference_name=f"exact {exact_name}, batched"))
            build_ref = ok.get("hnsw-efc200") if m == "hnsw" else None
            rows.append(row(f"{m} build time, n={label}", r["build_s"], "s",
                            reference=build_ref["build_s"] if build_ref else None,
                            reference_name="previous HNSW defaults (efConstruction 200)" if build_ref else None,
                            higher_is_better=False,
                            note=(f"previous defaults: recall@10 {build_ref['recall_at_10']}" if build_ref else
                                  "incl. k-means training" if m == "ivfpq" else None)))
            data_mib = n * DIM * 4 / 2**20
            rows.append(row(f"{m} build peak memory above the data, n={label}", r["peak_extra_mib"], "MiB",
                            reference=data_mib, reference_name="the fp32 vectors themselves",
                            higher_is_better=False))
            if "open_mmap_s" in r:
                rows.append(row(f"{m} open memory-mapped, n={label}", r["open_mmap_s"], "s", reference=r["open_s"],
                                reference_name="open read into memory", higher_is_better=False,
                                note=f"RSS +{r['mmap_rss_mib']} MiB at open; same results: {r['mmap_same']}; "
                                     f"mapped p50 {r['mmap_latency_ms']['p50']} ms (cold pages)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated gallery sizes")
    parser.add_argument("--quick", action="store_true", help="one 20k gallery, fewer queries: a smoke run")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-reference-build", action="store_true",
                        help="skip the previous-defaults HNSW build (the build-time reference) at the smallest size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--singles", type=int, default=200, help="single queries for the latency percentiles")
    parser.add_argument("--batch", type=int, default=1000, help="queries in the throughput batch")
    parser.add_argument("--hnsw-m", type=int, default=None, help="default: xmr.index's")
    parser.add_argument("--ef-construction", type=int, default=None, help="default: xmr.index's")
    parser.add_argument("--ef-search", type=int, default=None, help="default: xmr.index's")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: auto by size)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: auto from nlist)")
    parser.add_argument("--mixture", default="{}", help='JSON overrides of xmr.index.synthetic.Mixture, e.g. '
                        '\'{"isotropic": 0.8, "clusters": 100}\' for harder data')
    parser.add_argument("--timeout", type=float, default=None, help="seconds per method before giving up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    singles = 50 if args.quick else args.singles
    batch = 200 if args.quick else args.batch
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    from xmr.index.synthetic import Mixture

    mixture = json.loads(args.mixture)
    bandwidth = memory_bandwidth_gbs()
    report: dict = {"benchmark": "search", "machine": machine(), "data": {**Mixture(dim=DIM, **mixture).__dict__},
                    "dim": DIM, "k": K, "threads": args.threads, "single_queries": singles, "batch": batch,
                    "memory_bandwidth_gbs": round(bandwidth, 2), "results": {}}
    started = time.perf_counter()
    for n in sizes:
        todo = list(methods)
        if "hnsw" in methods and n == min(sizes) and not (args.no_reference_build or args.quick):
            todo.append("hnsw-efc200")
        with tempfile.TemporaryDirectory(prefix="xmr-search-bench-") as tmp:
            make_data(Path(tmp), n, singles, batch, mixture)
            results = report["results"][str(n)] = {}
            for method in todo:
                log(f"n={n} {method} ...")
                spec = {"method": method, "folder": tmp, "threads": args.threads, "params": method_params(method, args)}
                try:
                    results[method] = run_worker(spec, args.timeout)
                except subprocess.TimeoutExpired:
                    results[method] = {"error": f"timed out after {args.timeout} s"}
                log(f"n={n} {method}: {json.dumps(results[method])}")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["rows"] = make_rows(report["results"], bandwidth)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
