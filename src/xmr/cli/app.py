"""Command line: `xmr train`, `xmr evaluate`, `xmr demo`; `xmr embed/index/search/serve` live in cli/search.py.

Errors caused by input (a missing file, a malformed annotation, a wrong checkpoint, a bad config
key) print one readable line and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from xmr.cli.search import _check_precision
from xmr.cli.search import register as register_search_commands
from xmr.errors import XmrError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="xmr: cross-modal retrieval. Train and evaluate text-to-image retrieval models; embed, index, "
                       "search and serve your own images.")
_state = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False) -> None:
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # FAISS logs each CPU-variant probe at INFO
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Experiment YAML, e.g. configs/irra/cuhk_pedes.yaml.")],
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config field: section.key=value (repeatable), e.g. --set optim.lr=3e-4 --set data.root=/data/CUHK-PEDES.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue from a `last/` checkpoint dir, or 'auto' for this run's own.")] = None,
) -> None:
    """Train a method. Writes `last/` (every epoch, resumable) and `best/` (by validation Rank-1),
    metrics.jsonl, TensorBoard logs and the resolved config.yaml into train.output_dir.

    Multi-process: `torchrun --nproc_per_node N -m xmr.cli train --config ...` (DDP; gloo on CPU)."""
    from xmr.config import load_config
    from xmr.evaluation.evaluator import format_table
    from xmr.jobs.train import run_training
    from xmr.viz import training_curves

    cfg = load_config(config, set_ or [])
    result = run_training(cfg, resume=resume)
    evals = [r for r in result.history if r.get("kind") == "eval"]
    if evals:
        rows = {f"epoch {r['epoch']}": r for r in evals}
        typer.echo(format_table(rows, title=f"validation (t2i) - {cfg.train.output_dir}"))
        training_curves(result.history, Path(cfg.train.output_dir) / "curves.png", cfg.train.select_metric)
    if result.best_epoch is not None:
        typer.echo(f"best {cfg.train.select_metric} {result.best_metric:.2f} at epoch {result.best_epoch}: "
                   f"{cfg.train.output_dir}/best")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="An xmr checkpoint dir (a run's best/ or last/).")],
    data: Annotated[Path, typer.Option("--data", help="Data set root (CUHK-PEDES, ICFG-PEDES, RSTPReid, CUB or Flowers with Reed's captions, or a folder data set).")],
    data_format: Annotated[str | None, typer.Option("--format", help="cuhk_pedes | icfg_pedes | rstpreid | cub | flowers102 | folder (default: detected).")] = None,
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
    i2t: Annotated[bool, typer.Option("--i2t", help="Also report image-to-text retrieval.")] = False,
    out: Annotated[Path | None, typer.Option(help="JSON report path (default: <checkpoint>/eval_<split>.json).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Encoding batch size.")] = 128,
    workers: Annotated[int, typer.Option(min=0, help="Image loading worker processes.")] = 2,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 autocast for encoding.")] = "bf16",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    task: Annotated[str, typer.Option(help="Task kind: person (identity matching: R1/5/10, mAP, mINP), image_text "
                                      "(R@K both ways, RSUM) or composed (R@K, Recall_subset, mAP@K).")] = "person",
    rerank_depth: Annotated[int | None, typer.Option("--rerank-depth", "--refine-k", min=0, help="K' re-scored by a reranking method (MMRef: the refined top-k; default: its own; recorded in the report).")] = None,
    refine_lambda: Annotated[float | None, typer.Option("--refine-lambda", min=0.0, max=1.0, help="MMRef: weight of the reference similarity (default: the checkpoint's).")] = None,
    refine_scope: Annotated[str, typer.Option("--refine-scope", help="shortlist: re-score the top K' (what search does); full: also the exact second-stage ranking of the whole gallery, to see what the shortlist loses.")] = "shortlist",
    refine_grid: Annotated[str | None, typer.Option("--refine-grid", help="Tune the second stage on the val split first, e.g. \"k=10,50,100;lam=0.1,0.3,0.5\"; the grid and the choice go into the report.")] = None,
    images_root: Annotated[Path | None, typer.Option("--images-root", help="cub/flowers102: the pictures tree when it is not under --data (CUB_200_2011/ or the folder holding jpg/).")] = None,
    captions_root: Annotated[Path | None, typer.Option("--captions-root", help="cub/flowers102: Reed's captions tree (cvpr2016_cub/ or cvpr2016_flowers/) when it is not under --data.")] = None,
) -> None:
    """Evaluate a checkpoint under a task kind (person: Rank-1/5/10, mAP, mINP for t2i; --i2t adds image-to-text),
    printed and saved as JSON with its protocol. Scores go through the same two stages as `xmr search`;
    reranking methods (MMRef) print an `initial` row (stage 1 only) beside the refined one. CUB and Flowers
    also print Reed et al.'s class-level protocol (i2t top-1, t2i AP@50)."""
    from xmr.evaluation.evaluator import format_table
    from xmr.jobs.evaluate import evaluate_checkpoint

    _check_precision(precision)
    out = out or checkpoint / f"eval_{split}.json"
    result = evaluate_checkpoint(checkpoint, data, data_format=data_format, split=split, i2t=i2t, out=out,
                                 batch_size=batch_size, num_workers=workers, precision=precision, device=device,
                                 task=task, rerank_depth=rerank_depth, refine_lambda=refine_lambda,
                                 refine_scope=refine_scope, refine_grid=refine_grid,
                                 images_root=images_root, captions_root=captions_root)
    refined = {d for d in result.results if f"{d}_initial" in result.results}
    tables: dict[tuple[str, ...], dict[str, dict[str, float]]] = {}  # one table per column set
    for d, m in result.results.items():
        label = f"{row_label(d)}{' refined' if d in refined else ''} ({split})"
        tables.setdefault(result.task.columns_of(d.partition("_")[0]), {})[label] = m
    for i, (columns, rows) in enumerate(tables.items()):
        typer.echo(format_table(rows, title=str(checkpoint) if i == 0 else "", columns=columns))
    typer.echo(f"report: {result.report_path}")


@app.command()
def ablation(
    config: Annotated[Path, typer.Argument(help="The recipe whose method's ablation to run, e.g. configs/mmref/demo.yaml.")],
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per row (mean ± std over them).")] = 2,
    out: Annotated[Path | None, typer.Option(help="Where runs, ablation.json and ablation.png go (default: .cache/ablation-<recipe>).")] = None,
    rows: Annotated[Path | None, typer.Option(help="YAML list of rows {name, set: [key=value...], refine: bool} (default: the method's own).")] = None,
    refine_grid: Annotated[str, typer.Option("--refine-grid", help="Grid searched on val for rows with refinement.")] = "k=10,50,100;lam=0.05,0.1,0.2,0.3,0.5",
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config field for every row.")] = None,
) -> None:
    """Train each ablation row for every seed (runs cached: re-running only adds what is missing), evaluate on
    test (refinement settings chosen on val), print mean ± std of R1/R5/R10/mAP/mINP and ΔR1, and write
    ablation.json and a PNG bar chart. MMRef's rows: baseline (sdm), +MMRC, +RGRL, +refinement."""
    from xmr.jobs.ablation import read_rows, run_ablation

    target = out or Path(".cache") / f"ablation-{config.parent.name}-{config.stem}"
    summary = run_ablation(config, target, seeds=seeds, rows=read_rows(rows) if rows else None,
                           overrides=tuple(set_ or []), refine_grid=refine_grid)
    typer.echo(summary["table"])
    typer.echo(f"results: {target / 'ablation.json'}")
    typer.echo(f"plot:    {summary['plot']}")


def row_label(key: str) -> str:
    """Result keys as table rows: t2i_initial -> 't2i initial', t2i_full -> 't2i full re-score'."""
    direction, _, variant = key.partition("_")
    if direction == "class":
        return "class-level (Reed)"
    return {"": direction, "initial": f"{direction} initial", "full": f"{direction} full re-score"}.get(
        variant, key)


@app.command()
def demo(
    method: Annotated[str | None, typer.Option("--method", "-m", help="Run a method's own demo (irra, mmref, ...): its recipe configs/<method>/demo.yaml and cache .cache/demo-<method>.")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Demo recipe (default: configs/demo.yaml, IRRA).")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Where the demo data, model and outputs go (default: .cache/demo).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config field (section.key=value).")] = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train again even if a cached model exists.")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="End by serving the search page over the demo gallery.")] = True,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the search page (loopback only).")] = 8000,
) -> None:
    """End to end on embedded data: generate synthetic pedestrians (CUHK-PEDES layout), train a small IRRA
    model on CPU (cached after the first run), evaluate it on the test split, draw a top-5 grid, index the
    demo gallery and serve the search page on http://127.0.0.1:PORT/ (Ctrl-C stops it).
    `--method mmref` trains MMRef on the same data and serves refined results."""
    from xmr.jobs.demo import method_demo, run_demo

    default_config, default_work = method_demo(method or "irra")
    summary = run_demo(config or default_config, work_dir or default_work, tuple(set_ or []), retrain=retrain)
    typer.echo("")
    typer.echo(summary["table"])
    typer.echo(f"chance Rank-1: {summary['chance_R1']:.2f}%  |  "
               f"demo Rank-1: {summary['results']['t2i']['R1']:.2f}%")
    typer.echo(f"checkpoint: {summary['checkpoint']}")
    typer.echo(f"metrics:    {summary['report']}")
    typer.echo(f"top-5 grid: {summary['grid']}")
    typer.echo(f"index:      {summary['index']}")
    Path(summary["run_dir"], "demo_summary.json").write_text(json.dumps(
        {k: v for k, v in summary.items() if k != "table"}, indent=2))
    if serve:
        from xmr.cli.search import limit_threads_per_query
        from xmr.search.retriever import load
        from xmr.serve import ServeSettings, run

        settings = ServeSettings(host="127.0.0.1", port=port)
        limit_threads_per_query(settings.max_concurrency)
        retriever = load(summary["index"], summary["checkpoint"])
        typer.echo(f"search page: http://127.0.0.1:{port}/   (try: 'a woman in a pink jacket and white trousers'; "
                   "Ctrl-C stops)")
        run(retriever, settings)


register_search_commands(app)


def main() -> None:
    try:
        app()
    except XmrError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)

