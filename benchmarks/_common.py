"""Shared pieces of the benchmark scripts: the machine's description and limits, and result rows.

Not a benchmark itself (`make bench` runs every `benchmarks/*.py` not starting with "_").

Every benchmark prints one JSON object; besides its own details it carries `"rows"`: a list of
`row(...)` dicts that `benchmarks/_run_all.py` turns into the table of `benchmarks/README.md`:
figure, our value, the reference measured in the same run, their ratio (higher is better: the ratio is
oriented by `higher_is_better`), the machine's limit where one applies, and the target.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any

import torch


def row(figure: str, value: float, unit: str, *, reference: float | None = None, reference_name: str | None = None,
        higher_is_better: bool = True, limit: float | None = None, limit_name: str | None = None,
        target: str | None = None, met: bool | None = None, note: str | None = None) -> dict[str, Any]:
    """One line of the results table; `ratio` is ours / reference (or reference / ours when lower is better)."""
    ratio = None
    if reference is not None and value is not None and reference > 0 and value > 0:
        ratio = value / reference if higher_is_better else reference / value
    fraction = None
    if limit is not None and value is not None and limit > 0:
        fraction = value / limit if higher_is_better else limit / value
    return {"figure": figure, "value": _round(value), "unit": unit, "reference": _round(reference),
            "reference_name": reference_name, "ratio": _round(ratio), "higher_is_better": higher_is_better,
            "limit": _round(limit), "limit_name": limit_name, "fraction_of_limit": _round(fraction),
            "target": target, "met": met, "note": note}


def _round(x: float | None) -> float | None:
    if x is None:
        return None
    return float(f"{x:.4g}")


def cpu_flags() -> list[str]:
    """The CPU flags that matter for these kernels (AVX-512, AMX, VNNI, bf16)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
                            "amx_tile", "amx_int8", "avx512_fp16")
                    return [f for f in keep if f in flags]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": cpu_flags(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                               os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def gemm_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.5) -> float:
    """Measured GFLOP/s of a large square matrix product in `dtype` (the machine's practical peak)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def memory_bandwidth_gbs(mib: int = 512, seconds: float = 1.0) -> float:
    """Measured read bandwidth (GB/s) of summing a large float32 array: the limit of a scan."""
    x = torch.ones(mib * 2**20 // 4)
    with torch.inference_mode():
        x.sum()
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            x.sum()
            best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
