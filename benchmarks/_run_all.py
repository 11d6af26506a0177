"""`make bench`: run every benchmark script, then write `benchmarks/results.json` and `benchmarks/README.md`.

Each `benchmarks/*.py` not starting with "_" runs in its own process with the arguments given after
`--` (e.g. `--quick`), one after the other so they do not share the cores. Its single JSON object is
kept whole in results.json; its `rows` (see `_common.row`) become the Markdown table. A script that
fails or prints no JSON is recorded with its error and the others still run; the exit status is then 1.

    python benchmarks/_run_all.py [--only encode,search] [--timeout 3600] [-- --quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch
from _common import gemm_gflops, machine, memory_bandwidth_gbs


def scripts(only: list[str] | None) -> list[Path]:
    found = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_"))
    if only:
        missing = set(only) - {p.stem for p in found}
        if missing:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(missing))}; have: "
                             f"{', '.join(p.stem for p in found)}")
        found = [p for p in found if p.stem in only]
    return found


def last_json_object(text: str) -> dict[str, Any]:
    """The JSON object a script printed (the whole stdout, or else its last line that parses)."""
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON object on stdout")


def run_script(path: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    print(f"== {path.name} {' '.join(extra)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *extra], stdout=subprocess.PIPE, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"benchmark": path.stem, "error": f"timed out after {timeout:.0f} s", "rows": []}
    took = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"benchmark": path.stem, "error": f"exit code {proc.returncode}", "wall_s": took, "rows": []}
    try:
        result = last_json_object(proc.stdout)
    except ValueError as exc:
        return {"benchmark": path.stem, "error": str(exc), "wall_s": took, "rows": []}
    result.setdefault("benchmark", path.stem)
    result["wall_s"] = took
    result["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return result


KEEP_MARKER = "<!-- written by hand below this line: make bench keeps it -->"


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e5 else f"{x:,.0f}"
    return str(x)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python benchmarks/_run_all.py`); every script also runs alone and prints",
        "JSON (`python benchmarks/<name>.py --help`). The reference of each row is measured in the same run,",
        "so read the ratios: these machines are shared and absolute figures move from run to run.",
        "Ratio: ours / reference for throughputs, reference / ours for times and memory (above 1 = ours better).",
        "Targets are issue #4's; the main README's 'Performance at scale' explains each one missed.",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, flags {', '.join(m['flags']) or '—'};"
        f" torch {m['torch']}, Python {m['python']}. Run: {results['started']}, {results['mode']}."),
        (f"Measured limits: GEMM {results['limits']['gemm_fp32_gflops']:.0f} GFLOP/s fp32, "
        f"{results['limits']['gemm_bf16_gflops']:.0f} GFLOP/s bf16 (2048² matmul); "
        f"memory read bandwidth {results['limits']['memory_bandwidth_gbs']:.1f} GB/s."),
        "",
    ]
    for name, result in results["benchmarks"].items():
        lines += [f"## {name}", ""]
        own = result.get("machine") or {}
        if own.get("cpu") and own.get("cpu") != m["cpu"]:  # kept from an earlier (partial) run elsewhere
            lines += [(f"Measured on another machine: {own['cpu']}, {own.get('cores')} cores, flags "
                      f"{', '.join(own.get('flags') or []) or '—'}; run {result.get('started', '?')}. Compare "
                      "its ratios, not its absolute figures, with the sections above."), ""]
        if result.get("error"):
            lines += [f"Failed: {result['error']}.", ""]
            continue
        lines += ["| figure | ours | reference | ratio | machine limit | target | met |",
                  "|---|---|---|---|---|---|---|"]
        for r in result.get("rows", []):
            ref = f"{_fmt(r.get('reference'))} ({r['reference_name']})" if r.get("reference_name") else \
                _fmt(r.get("reference"))
            limit = "—"
            if r.get("limit") is not None:
                frac = r.get("fraction_of_limit")
                limit = f"{_fmt(r['limit'])} {r.get('limit_name') or ''}".strip()
                if frac is not None:
                    limit += f" ({frac:.0%})"
            figure = r["figure"] + (f" — {r['note']}" if r.get("note") else "")
            lines.append(f"| {figure} | {_fmt(r['value'])} {r['unit']} | {ref} | {_fmt(r.get('ratio'))} | "
                         f"{limit} | {r.get('target') or '—'} | {_fmt(r.get('met'))} |")
        lines += ["", f"Wall time of the script: {result.get('wall_s', '?')} s.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    parser.add_argument("--readme", type=Path, default=HERE / "README.md")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    selected = scripts([s for s in args.only.split(",") if s] or None)
    limits = {"gemm_fp32_gflops": round(gemm_gflops(torch.float32), 1),
              "gemm_bf16_gflops": round(gemm_gflops(torch.bfloat16), 1),
              "memory_bandwidth_gbs": round(memory_bandwidth_gbs(), 2)}
    results: dict[str, Any] = {"machine": machine(), "limits": limits,
                               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "mode": "arguments: " + (" ".join(extra) or "defaults (full)"), "benchmarks": {}}
    if args.only and args.out.is_file():  # a partial run updates the previous results
        results["benchmarks"] = json.loads(args.out.read_text()).get("benchmarks", {})
    for path in selected:
        results["benchmarks"][path.stem] = run_script(path, extra, args.timeout)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out)
    kept = ""
    if args.readme.is_file():  # hand-written notes after the marker survive a re-run
        text = args.readme.read_text()
        if KEEP_MARKER in text:
            kept = text[text.index(KEEP_MARKER):]
    args.readme.write_text(markdown(results) + ("\n" + kept if kept else ""))
    failed = [n for n, r in results["benchmarks"].items() if r.get("error")]
    print(f"wrote {args.out} and {args.readme}" + (f"; failed: {', '.join(failed)}" if failed else ""),
          file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
