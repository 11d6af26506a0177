"""Evaluation metrics at scale: bounded-memory Rank-k/mAP/mINP vs a naive full-argsort reference.

Prints JSON. For each size (queries x gallery, D = 512, clustered random features, each query with a
few correct gallery items) it reports, each measured in a fresh subprocess:

* ``bounded``: :func:`xmr.evaluation.retrieval_metrics` (time, peak extra memory, the metrics);
* ``naive``: one Q x G matmul, a full stable argsort and the metrics over the whole matrix (as the
  reference code does), only where it fits comfortably in memory, else ``skipped`` with an estimate;
* ``matmul_topk10``: the bare chunked matmul + top-10 in the same precision, for context: the
  least work any exact evaluation must do; ``bounded / matmul_topk10`` is the overhead ratio.

Peak extra memory = VmHWM - VmRSS after the data are loaded (the high-water mark is reset through
/proc/self/clear_refs), so it counts torch's allocations, unlike tracemalloc.

Usage: python benchmarks/eval_metrics.py [--sizes small|all] [--precision fp32|bf16] [--noise 2.6]
(the default run takes ~3 min with fp32 on 2 cores, ~1.5 min with bf16).
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
import torch

from xmr.evaluation import retrieval_metrics

SIZES = {"6k x 3k": (6156, 3074), "10k x 100k": (10_000, 100_000), "10k x 1M": (10_000, 1_000_000)}
DIM = 512
NOISE = 2.6  # noise norm relative to the identity centre: R1 ~ 70 % at 6k x 3k, ~12 % at 10k x 1M
NAIVE_LIMIT_BYTES = 16 * 2**30
GIB = 2**30


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


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    return out


def worker(folder: Path, method: str, precision: str) -> dict:
    q, g, ql, gl = (torch.from_numpy(np.load(folder / f"{name}.npy"))
                    for name in ("query", "gallery", "query_labels", "gallery_labels"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with open("/proc/self/clear_refs", "w") as handle:  # reset the high-water mark
        handle.write("5")
    base = _status()["VmRSS"]
    start = time.perf_counter()
    if method == "bounded":
        result = retrieval_metrics(q, g, ql, gl, compute_dtype=dtype)
    elif method == "naive":
        result = naive_metrics(q, g, ql, gl, dtype)
    else:
        result = matmul_topk(q, g, dtype)
    seconds = time.perf_counter() - start
    metrics = {k: round(v, 4) for k, v in result.items() if k in ("R1", "R5", "R10", "mAP", "mINP")}
    return {"seconds": round(seconds, 3), "peak_extra_mib": round((_status()["VmHWM"] - base) / 2**20, 1),
            **metrics}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def run_worker(folder: Path, method: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(folder), method, "--precision", precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_size(name: str, queries: int, gallery: int, precision: str, naive_bytes_per_score: float | None,
               scratch: Path, noise: float) -> tuple[dict, float | None]:
    folder = scratch / name.replace(" ", "")
    folder.mkdir()
    make_data(folder, queries, gallery, noise)
    row: dict = {"queries": queries, "gallery": gallery, "dim": DIM}
    row["bounded"] = run_worker(folder, "bounded", precision)
    need = None if naive_bytes_per_score is None else naive_bytes_per_score * queries * gallery
    if need is not None and need > NAIVE_LIMIT_BYTES:
        row["naive"] = f"skipped: would need ~{need / GIB:.1f} GiB"
    else:
        row["naive"] = run_worker(folder, "naive", precision)
        if "peak_extra_mib" in row["naive"]:
            naive_bytes_per_score = row["naive"]["peak_extra_mib"] * 2**20 / (queries * gallery)
            same = max(abs(row["naive"][k] - row["bounded"][k]) for k in ("R1", "R5", "R10", "mAP", "mINP"))
            row["naive_vs_bounded_max_abs_diff"] = same
    row["matmul_topk10"] = run_worker(folder, "matmul_topk10", precision)
    bare = row["matmul_topk10"].get("seconds")
    if bare and "seconds" in row["bounded"]:
        row["bounded_over_matmul_topk10"] = round(row["bounded"]["seconds"] / bare, 2)
    shutil.rmtree(folder)
    return row, naive_bytes_per_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=["small", "all"], default="all")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--noise", type=float, default=NOISE,
                        help="noise/centre norm ratio: lower = easier task = fewer candidates to count")
    parser.add_argument("--worker", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), args.worker[1], args.precision)))
        return
    names = ["6k x 3k"] if args.sizes == "small" else list(SIZES)
    report: dict = {"precision": args.precision, "noise": args.noise, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpu": platform.processor() or platform.machine(), "cases": {}}
    per_score = None  # naive bytes per score, measured at the smallest size
    scratch = Path(tempfile.mkdtemp(prefix="xmr_eval_bench_"))
    try:
        for name in names:
            started = time.perf_counter()
            report["cases"][name], per_score = bench_size(name, *SIZES[name], args.precision, per_score, scratch,
                                                             args.noise)
            report["cases"][name]["wall_seconds_incl_data"] = round(time.perf_counter() - started, 1)
            print(json.dumps({name: report["cases"][name]}), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
