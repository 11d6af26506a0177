"""Evaluation metrics at scale: bounded-memory Rank-k/mAP/mINP, in memory and streamed from disk.

Prints one JSON object (``rows`` for the results table). For each size (queries x gallery, D = 512,
clustered random features, each query with a few correct gallery items; a weak model on purpose:
about 7 % of the gallery outscores a query's worst correct item, all of which must be counted) and
precision, each measured in a fresh subprocess:

* ``bounded``: :func:`xmr.evaluation.retrieval_metrics` on in-memory tensors (time, peak extra memory);
* ``matmul_topk10`` (the reference): the bare chunked matmul + running top-10 in the same precision
  and the same chunks (1024 queries x 4096 gallery rows), no normalisation, no ranking of positives:
  the least work any exact evaluation must do. Target: ours <= 2x its time;
* ``naive``: one Q x G matmul, a full stable argsort and the metrics (as the reference code does),
  only where it fits in memory, else skipped with an estimate;
* ``stream_npy``: the gallery given as the path of a ``.npy`` file, read block by block with file
  reads (never mapped, never whole in memory);
* ``stream_mmap``: the gallery as ``np.load(path, mmap_mode="r")``: blocks copied out of the mapping,
  whose pages are then released (``madvise(MADV_DONTNEED)``);
* ``mmap_no_release`` (for contrast): the same mapping read through a plain wrapper, pages not released:
  every touched page of the file then counts in the process's resident memory.

Peak extra memory = VmHWM - VmRSS once the inputs are loaded (the high-water mark is reset through
/proc/self/clear_refs), so it counts torch's and NumPy's allocations and touched mapped pages. For the
streamed runs the gallery is not loaded, so the figure bounds everything the evaluation holds. Pages of
the file in the kernel's page cache (used by file reads) are not the process's memory.

Usage: python benchmarks/eval_metrics.py [--quick] [--precisions fp32,bf16] [--sizes ...] [--noise 2.6]
The default (full) run takes about 6-8 minutes on 2 quiet cores (estimate: 10k x 1M dominates);
--quick (6k x 3k and 10k x 20k, naive only at 6k x 3k) about 30 s quiet.
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, row

from xmr.evaluation import retrieval_metrics

SIZES = {"6k x 3k": (6156, 3074), "10k x 20k": (10_000, 20_000), "10k x 100k": (10_000, 100_000),
         "10k x 1M": (10_000, 1_000_000)}
FULL_SIZES = ["6k x 3k", "10k x 100k", "10k x 1M"]
QUICK_SIZES = ["6k x 3k", "10k x 20k"]
STREAM_SIZES = {"10k x 1M", "10k x 20k"}  # where the streamed variants run
DIM = 512
NOISE = 2.6  # noise norm relative to the identity centre: R1 ~ 70 % at 6k x 3k, ~12 % at 10k x 1M
NAIVE_LIMIT_BYTES = 16 * 2**30
GIB = 2**30
REFERENCE = "bare matmul + top-10 (same precision and chunks)"


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(folder: Path, queries: int, gallery: int, noise: float = NOISE, seed: int = 0) -> None:
    """Clustered features: ~4 gallery images per identity, queries drawn from gallery identities."""
    rng = np.random.default_rng(seed)
    num_ids = max(gallery // 4, 1)
    gallery_labels = rng.integers(0, num_ids, gallery)
    query_labels = gallery_labels[rng.integers(0, gallery, queries)]  # every query has a positive
    centres = _unit(rng.standard_normal((num_ids, DIM), dtype=np.float32))
    for name, labels in (("gallery", gallery_labels), ("query", query_labels)):
        feats = np.empty((len(labels), DIM), dtype=np.float32)
        for start in range(0, len(labels), 100_000):  # bounded temporaries
            part = labels[start : start + 100_000]
            jitter = rng.standard_normal((len(part), DIM), dtype=np.float32) * (noise / DIM**0.5)
            feats[start : start + len(part)] = _unit(centres[part] + jitter)
        np.save(folder / f"{name}.npy", feats)
        np.save(folder / f"{name}_labels.npy", labels)


# ----------------------------------------------------------------------------------------------
# Measured methods (run inside a worker subprocess)
# ----------------------------------------------------------------------------------------------
def naive_metrics(q: torch.Tensor, g: torch.Tensor, ql: torch.Tensor, gl: torch.Tensor,
                  dtype: torch.dtype) -> dict[str, float]:
    """Full-matrix reference: argsort all Q x G scores at once (int64 indices), then CMC/AP/INP."""
    sim = (q.to(dtype) @ g.to(dtype).T).float()
    order = torch.argsort(sim, dim=1, descending=True, stable=True)
    del sim
    matches = gl[order] == ql[:, None]
    del order
    hits = matches.cumsum(dim=1)
    num_pos = hits[:, -1]
    ranks = torch.arange(1, matches.shape[1] + 1)
    ap = ((hits / ranks) * matches).sum(dim=1) / num_pos
    last = matches.shape[1] - 1 - matches.flip(1).int().argmax(dim=1)
    out = {f"R{k}": float((hits[:, k - 1] > 0).float().mean() * 100) for k in (1, 5, 10)}
    out.update(mAP=float(ap.mean() * 100), mINP=float((num_pos / (last + 1)).mean() * 100))
    return out


def matmul_topk(q: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, k: int = 10,
                query_chunk: int = 1024, gallery_chunk: int = 4096) -> dict[str, float]:
    """The bare work: chunked similarities and a running top-k, no ranking of positives."""
    gd = g.to(dtype)
    for start in range(0, len(q), query_chunk):
        qc = q[start : start + query_chunk].to(dtype)
        best = None
        for offset in range(0, len(g), gallery_chunk):
            top = (qc @ gd[offset : offset + gallery_chunk].T).topk(k, dim=1).values
            best = top if best is None else torch.cat([best, top], 1).topk(k, dim=1).values
    return {}


class _PlainRows:
    """A mapped gallery behind a plain slice interface: the library cannot release its pages."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape = array, array.shape

    def __getitem__(self, index):
        return np.asarray(self.array[index])


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssFile", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(folder: Path, method: str, precision: str) -> dict:
    q, ql, gl = (torch.from_numpy(np.load(folder / f"{name}.npy")) for name in ("query", "query_labels",
                                                                                   "gallery_labels"))
    path = folder / "gallery.npy"
    g = torch.from_numpy(np.load(path)) if method in ("bounded", "naive", "matmul_topk10") else None
    if method == "stream_mmap":
        g = np.load(path, mmap_mode="r")
    elif method == "mmap_no_release":
        g = _PlainRows(np.load(path, mmap_mode="r"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark
        handle.write("5")
    base = _status()["VmRSS"]
    start = time.perf_counter()
    if method == "naive":
        result = naive_metrics(q, g, ql, gl, dtype)
    elif method == "matmul_topk10":
        result = matmul_topk(q, g, dtype)
    else:
        result = retrieval_metrics(q, path if method == "stream_npy" else g, ql, gl, compute_dtype=dtype)
    seconds = time.perf_counter() - start
    status = _status()
    metrics = {k: v for k, v in result.items() if k in ("R1", "R5", "R10", "mAP", "mINP")}
    return {"seconds": round(seconds, 3), "peak_extra_mib": round((status["VmHWM"] - base) / 2**20, 1),
            "rss_file_mib_at_end": round(status.get("RssFile", 0) / 2**20, 1), **metrics}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run_worker(folder: Path, method: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(folder), method, "--precision", precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {method:16s} {precision}: {result}", file=sys.stderr, flush=True)
    return result


def bench_case(folder: Path, name: str, precision: str, stream: bool, naive_bytes: float | None) -> dict:
    queries, gallery = SIZES[name]
    case: dict = {"queries": queries, "gallery": gallery, "dim": DIM, "precision": precision}
    methods = ["bounded", "matmul_topk10"]
    need = (naive_bytes or 22.0) * queries * gallery  # ~22 bytes per score measured at 6k x 3k
    if need > NAIVE_LIMIT_BYTES:
        case["naive"] = f"skipped: would need ~{need / GIB:.1f} GiB"
    else:
        methods.append("naive")
    if stream:
        methods += ["stream_npy", "stream_mmap"] + (["mmap_no_release"] if precision == "bf16" else [])
    for method in methods:
        case[method] = run_worker(folder, method, precision)
    ours = case["bounded"]
    for method in ("naive", "stream_npy", "stream_mmap", "mmap_no_release"):
        other = case.get(method)
        if isinstance(other, dict) and "mAP" in other and "mAP" in ours:
            case[f"{method}_max_abs_diff"] = max(abs(other[k] - ours[k]) for k in ("R1", "R5", "R10", "mAP", "mINP"))
    return case


def rows_for(name: str, precision: str, case: dict) -> list[dict]:
    out = []
    ref = case["matmul_topk10"].get("seconds")
    label = f"metrics {name} {precision}"
    for method, title in (("bounded", "in memory"), ("stream_npy", "streamed .npy (file reads)"),
                          ("stream_mmap", "streamed np.load mmap (pages released)"),
                          ("mmap_no_release", "mmap, pages not released (contrast)")):
        result = case.get(method)
        if not isinstance(result, dict) or "seconds" not in result:
            continue
        same = case.get(f"{method}_max_abs_diff", 0.0)
        if method != "mmap_no_release":
            out.append(row(f"{label}, {title}: time", result["seconds"], "s", reference=ref, reference_name=REFERENCE,
                           higher_is_better=False,
                           # the target is for 10k x 1M; small sizes are dominated by fixed costs
                           target="ours <= 2x reference (ratio >= 0.5)" if "1M" in name else None,
                           met=(bool(ref) and result["seconds"] <= 2 * ref) if "1M" in name else None,
                           note=f"R1 {result['R1']:.2f} mAP {result['mAP']:.2f} mINP {result['mINP']:.2f}; "
                                f"max |diff| vs in-memory {same:.1e}"))
        mib = result["peak_extra_mib"]
        note = "peak VmHWM - VmRSS after loading the inputs"
        if method.startswith("stream") or method == "mmap_no_release":
            note += f"; gallery not loaded; RssFile at end {result['rss_file_mib_at_end']:.0f} MiB"
        out.append(row(f"{label}, {title}: peak extra memory", mib, "MiB", higher_is_better=False,
                       target="< 4 GiB", met=mib < 4096, note=note))
    naive = case.get("naive")
    if isinstance(naive, dict) and "seconds" in naive and "seconds" in case["bounded"]:
        out.append(row(f"{label}: time vs naive full argsort", case["bounded"]["seconds"], "s",
                       reference=naive["seconds"], reference_name="one Q x G matmul + full stable argsort",
                       higher_is_better=False,
                       note=f"naive peak extra {naive['peak_extra_mib']:.0f} MiB; max |metric diff| "
                            f"{case.get('naive_max_abs_diff', float('nan')):.1e} (bf16: full sort of bf16-rounded "
                            "scores, same values)"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run, < 1 min)")
    parser.add_argument("--sizes", default=None, help=f"comma-separated subset of {list(SIZES)}")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--noise", type=float, default=NOISE,
                        help="noise/centre norm ratio: lower = easier task = fewer candidates to count")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], args.precision)))
        return
    names = args.sizes.split(",") if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    precisions = args.precisions.split(",")
    report: dict = {"benchmark": "eval_metrics", "machine": machine(), "noise": args.noise, "dim": DIM,
                    "cases": {}, "rows": []}
    naive_bytes: float | None = None  # naive bytes per score, measured at the smallest size
    global NAIVE_LIMIT_BYTES
    if args.quick:
        NAIVE_LIMIT_BYTES = GIB
    scratch = Path(tempfile.mkdtemp(prefix="xmr_eval_bench_"))
    started = time.perf_counter()
    try:
        for name in names:
            folder = scratch / name.replace(" ", "")
            folder.mkdir()
            print(f"{name}: generating data", file=sys.stderr, flush=True)
            make_data(folder, *SIZES[name], args.noise)
            for precision in precisions:
                case = bench_case(folder, name, precision, name in STREAM_SIZES, naive_bytes)
                naive = case.get("naive")
                if isinstance(naive, dict) and "peak_extra_mib" in naive and naive_bytes is None:
                    naive_bytes = naive["peak_extra_mib"] * 2**20 / (case["queries"] * case["gallery"])
                report["cases"][f"{name} {precision}"] = case
                report["rows"] += rows_for(name, precision, case)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
