"""`xmr ablation`: train the rows of a method's ablation over several seeds and tabulate them.

A row is a name, config overrides and whether its second stage is used at test time (`refine`). Rows with
the same overrides share their training runs (MMRef's "+RGRL" and "+refinement" are one model evaluated two
ways). The refinement's k and lambda are chosen on the val split of each seed (never on test). Each run is
cached in the output folder (a finished run is not trained again; an interrupted one resumes), so the
command can be re-run to add seeds or print the table again.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xmr.atomic import atomic_write_text
from xmr.config import ExperimentConfig, load_config
from xmr.errors import ConfigError

log = logging.getLogger(__name__)

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
DEFAULT_GRID = "k=10,50,100;lam=0.05,0.1,0.2,0.3,0.5"


@dataclass(frozen=True)
class AblationRow:
    """One row: `overrides` are `section.key=value` strings applied on top of the recipe."""

    name: str
    overrides: tuple[str, ...] = ()
    refine: bool = False


@dataclass
class RowResult:
    name: str
    refine: bool
    seeds: list[int]
    per_seed: list[dict[str, float]]
    mean: dict[str, float]
    std: dict[str, float]
    settings: list[dict[str, Any]] = field(default_factory=list)  # per seed: refinement k, lambda, epoch


def read_rows(path: str | Path) -> list[AblationRow]:
    """Rows from YAML: a list of {name, set: [section.key=value, ...], refine: bool}."""
    data = yaml.safe_load(Path(path).read_text()) or []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: ablation rows must be a YAML list of {{name, set, refine}}")
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{path}: row {i + 1} must be a mapping with a 'name'")
        unknown = set(item) - {"name", "set", "refine"}
        if unknown:
            raise ConfigError(f"{path}: row {item['name']!r} has unknown keys {sorted(unknown)} (use name, set, refine)")
        rows.append(AblationRow(str(item["name"]), tuple(str(s) for s in item.get("set") or ()),
                                bool(item.get("refine", False))))
    return rows


def method_rows(cfg: ExperimentConfig) -> list[AblationRow]:
    from xmr.registry import METHODS

    # a method's default rows: a ClassVar of (name, overrides, refine) tuples (methods do not import jobs)
    rows = [AblationRow(name, tuple(sets), bool(refine))
            for name, sets, refine in getattr(METHODS.get(cfg.method.name), "ablation_rows", ())]
    if not rows:
        raise ConfigError(f"method {cfg.method.name} defines no ablation rows; pass --rows FILE")
    return rows


def _slug(overrides: tuple[str, ...]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]


def ensure_data(cfg: ExperimentConfig) -> None:
    """The embedded demo data is generated where a demo recipe expects it (under .cache/demo)."""
    root = Path(cfg.data.root)
    if root.exists() or not str(cfg.data.root).startswith(".cache/demo"):
        return
    from xmr.data.synthetic import generate_pedes_demo
    from xmr.jobs.demo import DEMO_DATA

    log.info("generating the embedded demo data under %s", root.parent)
    generated = generate_pedes_demo(root.parent, **DEMO_DATA)
    if generated.resolve() != root.resolve():
        cfg.data.root = str(generated)


def run_ablation(config: str | Path, out: str | Path, *, seeds: int = 2, rows: list[AblationRow] | None = None,
                 overrides: tuple[str, ...] = (), refine_grid: str = DEFAULT_GRID, progress: bool = True,
                 first_seed: int = 0) -> dict[str, Any]:
    """Train and evaluate every row for seeds first_seed..first_seed+seeds-1; returns the summary (also JSON)."""
    from xmr.jobs.demo import _finished
    from xmr.jobs.evaluate import evaluate_checkpoint
    from xmr.jobs.train import run_training

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    base = load_config(config, list(overrides))
    rows = rows or method_rows(base)
    ensure_data(base)
    seed_list = list(range(first_seed, first_seed + seeds))
    results: list[RowResult] = []
    for row in rows:
        per_seed, settings = [], []
        for seed in seed_list:
            run_dir = out / f"run-{_slug(row.overrides)}-seed{seed}"
            cfg = load_config(config, [*overrides, *row.overrides, f"data.root={base.data.root}",
                                       f"train.seed={seed}", f"train.output_dir={run_dir}"])
            cfg.train.progress = progress
            if not _finished(run_dir, cfg.optim.epochs):
                log.info("ablation row %r, seed %d: training into %s", row.name, seed, run_dir)
                run_training(cfg, resume="auto")
            checkpoint = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "last"
            evaluation = evaluate_checkpoint(
                checkpoint, cfg.data.root, data_format=cfg.data.format, split="test",
                out=run_dir / f"test_{'refined' if row.refine else 'initial'}.json",
                num_workers=cfg.eval.num_workers, precision=cfg.eval.precision, progress=progress,
                rerank_depth=None if row.refine else 0, refine_grid=refine_grid if row.refine else None)
            per_seed.append({m: float(evaluation.results["t2i"][m]) for m in METRICS})
            report = json.loads(evaluation.report_path.read_text()) if evaluation.report_path else {}
            chosen = report.get("protocol", {}).get("refine_grid", {}).get("chosen", {})
            epoch = (yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}).get("epochs_done")
            settings.append({"seed": seed, "checkpoint": str(checkpoint), "epoch": epoch, **chosen,
                             **({"ref_lr_factor": getattr(cfg.method, "ref_lr_factor", None)} if row.refine else {})})
        mean = {m: statistics.fmean(r[m] for r in per_seed) for m in METRICS}
        std = {m: statistics.stdev(r[m] for r in per_seed) if len(per_seed) > 1 else 0.0 for m in METRICS}
        results.append(RowResult(row.name, row.refine, seed_list, per_seed, mean, std, settings))
    summary = {"config": str(config), "overrides": list(overrides), "seeds": seed_list, "refine_grid": refine_grid,
               "selection": "best checkpoint by val R1; refinement k and lambda chosen on val per seed",
               "rows": [asdict(r) for r in results], "table": format_ablation(results)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablation.json", json.dumps(summary, indent=2))
    summary["plot"] = str(ablation_plot(results, out / "ablation.png"))
    return summary


def format_ablation(results: list[RowResult]) -> str:
    """Mean ± std over seeds per metric, ΔR1 against the first row, and the val-chosen k and lambda."""
    width = max([len(r.name) for r in results] + [8])
    header = f"{'row':<{width}}  " + "  ".join(f"{m:>13}" for m in METRICS) + f"  {'dR1':>6}  settings (val)"
    lines = [header, "-" * len(header)]
    base = results[0].mean["R1"] if results else 0.0
    for r in results:
        cells = "  ".join(f"{r.mean[m]:6.2f} ± {r.std[m]:4.2f}" for m in METRICS)
        chosen = ", ".join(f"k={s.get('k')} lam={s.get('lam')}" for s in r.settings if "k" in s) if r.refine else ""
        lines.append(f"{r.name:<{width}}  {cells}  {r.mean['R1'] - base:+6.2f}  {chosen}")
    return "\n".join(lines)


def ablation_plot(results: list[RowResult], path: Path) -> Path:
    """Grouped bars (one group per metric, one bar per row) with the seeds' std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    n = max(len(results), 1)
    width = 0.8 / n
    for i, r in enumerate(results):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(METRICS))]
        ax.bar(xs, [r.mean[m] for m in METRICS], width, yerr=[r.std[m] for m in METRICS], capsize=2, label=r.name)
    ax.set_xticks(range(len(METRICS)), METRICS)
    ax.set_ylabel("%")
    ax.set_title(f"ablation, mean ± std over {len(results[0].seeds) if results else 0} seeds (test split)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
