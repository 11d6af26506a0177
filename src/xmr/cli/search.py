"""Command line for searching your own images: `xmr embed`, `xmr index ...`, `xmr search`, `xmr serve`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from xmr.errors import XmrError

index_app = typer.Typer(no_args_is_help=True, help="Build, update and inspect search indexes.")

Precision = Annotated[str, typer.Option(help="fp32 | bf16 | fp16 autocast for encoding.")]
ComposeOpt = Annotated[str | None, typer.Option(
    "--compose", help="For models without native image+text queries: 'sum' enables the late-fusion baseline "
                      "normalise(f_image + f_text). Default: refuse such queries.")]


def _check_precision(precision: str) -> None:
    from xmr.precision import PRECISIONS

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"use {', '.join(PRECISIONS)}", param_hint="--precision")


def _parse_params(items: list[str] | None) -> dict:
    params: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise XmrError(f"--param {item!r}: expected key=value, e.g. M=32")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


MmapOpt = Annotated[bool, typer.Option("--mmap", help="Memory-map the index from disk instead of reading it: opens at once, pages are read as searches touch them.")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="Run the encoders through torch.compile (inductor, frozen weights): faster on large jobs, 30-70 s to compile a ViT-B/16 first.")]


def embed(
    images: Annotated[Path, typer.Argument(help="A folder of images (walked recursively) or a list file, one path a line.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="xmr checkpoint dir that embeds the images.")],
    out: Annotated[Path, typer.Option("--out", help="Embedding directory (created, or resumed if it exists).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="Image decoding worker processes.")] = 2,
    precision: Precision = "bf16",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    shard: Annotated[str | None, typer.Option(help="Embed only part i of n of the sorted listing ('i/n'); merge the parts with `xmr index build`. Under torchrun it defaults to RANK/WORLD_SIZE, written to OUT/shard-RANK.")] = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Images per saved chunk (what a killed run can lose).")] = 1024,
    compile: CompileOpt = False,
    processes: Annotated[int, typer.Option(min=1, help="Encoder processes on this machine, each embedding an interleaved part into OUT/shard-NNN with cores/N threads (resume with the same N).")] = 1,
) -> None:
    """Embed every image of a folder into OUT. Unreadable files are skipped and listed in OUT/failed.jsonl.
    Killed? Run the same command again: it continues where it stopped, embedding each image exactly once."""
    from xmr.search.embed import embed_images, parse_shard

    _check_precision(precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard is None and world > 1:
        rank = int(os.environ.get("RANK", "0"))
        shard = f"{rank}/{world}"
        if processes == 1:
            out = out / f"shard-{rank:03d}"
    if processes > 1:
        from xmr.search.embed_parallel import embed_images_parallel

        result: Any = embed_images_parallel(images, checkpoint, out, processes=processes, shard=parse_shard(shard),
                                            batch_size=batch_size, num_workers=workers, precision=precision,
                                            chunk_size=chunk_size, compile=compile)
    else:
        result = embed_images(images, checkpoint, out, batch_size=batch_size, num_workers=workers,
                              precision=precision, device=device, shard=parse_shard(shard), chunk_size=chunk_size,
                              compile=compile)
    rate = result.embedded / result.seconds if result.seconds else 0.0
    typer.echo(f"{result.directory}: {result.embedded} embedded ({rate:.1f} img/s), {result.already_done} "
               f"already done, {len(result.failed)} unreadable (of {result.total})")
    for failure in result.failed[:10]:
        typer.echo(f"  skipped: {failure['error']}")


@index_app.command("build")
def index_build(
    embeddings: Annotated[list[Path], typer.Argument(help="Embedding dirs (or a parent of shard-* dirs).")],
    out: Annotated[Path, typer.Option("--out", help="New index directory.")],
    backend: Annotated[str, typer.Option(help="faiss (embedded default) or milvus (Milvus Lite file, or a server via --param uri=...).")] = "faiss",
    kind: Annotated[str, typer.Option(help="faiss: flat (exact) | hnsw | ivfpq; milvus: FLAT | HNSW | IVF_FLAT.")] = "flat",
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Index parameter key=value (repeatable): hnsw M (32), efConstruction (80), efSearch (128); ivfpq nlist, nprobe, rerank (auto by gallery size when the index is saved), m (64), nbits (8); milvus uri, token, collection.")] = None,
) -> None:
    """Create an index from embedding directories (shards of one run merge into one index)."""
    from xmr.search.indexing import build_index

    update = build_index(embeddings, out, backend=backend, kind=kind, params=_parse_params(param))
    typer.echo(f"{update.index}: {update.count} items ({update.skipped} duplicates skipped)")


@index_app.command("add")
def index_add(
    index: Annotated[Path, typer.Argument(help="Existing index directory.")],
    embeddings: Annotated[list[Path], typer.Argument(help="Embedding dirs with new images.")],
) -> None:
    """Add new images to an index without rebuilding it (images already indexed are skipped)."""
    from xmr.search.indexing import add_to_index

    update = add_to_index(index, embeddings)
    typer.echo(f"{update.index}: +{update.added} ({update.skipped} already there), {update.count} items")


@index_app.command("remove")
def index_remove(
    index: Annotated[Path, typer.Argument(help="Existing index directory.")],
    items: Annotated[list[str], typer.Argument(help="Image paths (relative, as `xmr index info --list` shows) or ids.")],
) -> None:
    """Remove images from an index (saved atomically; the previous version stays valid until the switch)."""
    from xmr.search.indexing import remove_from_index

    update = remove_from_index(index, items)
    typer.echo(f"{update.index}: -{update.removed}, {update.count} items")


@index_app.command("info")
def index_info(
    index: Annotated[Path, typer.Argument(help="Index directory.")],
    list_items: Annotated[bool, typer.Option("--list", help="Also print every id and path.")] = False,
) -> None:
    """Print an index's manifest (model, backend, kind, parameters, count)."""
    from dataclasses import asdict

    from xmr.index import open_index

    opened = open_index(index)
    typer.echo(json.dumps(asdict(opened.manifest), indent=2))
    if list_items:
        for id_, path in opened.items():
            typer.echo(f"{id_}\t{path}")


RerankDepthOpt = Annotated[int | None, typer.Option(
    "--rerank-depth", min=0, max=100_000,
    help="K' of the second stage: how many index results a reranking method re-scores (default: the method's "
         "own; 0 = index order only). Single-stage methods (IRRA) ignore it.")]


def search(
    index: Annotated[Path, typer.Argument(help="Index directory (from `xmr index build`).")],
    text: Annotated[str | None, typer.Argument(help="Query sentence (or the modification text with --image).")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query image; with TEXT it is a composed query.")] = None,
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="Results to return.")] = 10,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: the one that built the index).")] = None,
    grid: Annotated[Path | None, typer.Option(help="Also write a PNG grid of the results here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    compose: ComposeOpt = None,
    precision: Precision = "bf16",
    mmap: MmapOpt = False,
    rerank_depth: RerankDepthOpt = None,
    refine: Annotated[bool | None, typer.Option(
        "--refine/--no-refine", help="Second stage on/off (MMRef's reference-based refinement); default: on "
                                     "for methods that have one.")] = None,
    refine_k: Annotated[int | None, typer.Option(
        "--refine-k", min=0, max=100_000, help="How many index results are refined (= --rerank-depth).")] = None,
    refine_lambda: Annotated[float | None, typer.Option(
        "--refine-lambda", min=0.0, max=1.0,
        help="MMRef: weight of the reference similarity, S = (1-lambda) S_init + lambda S_ref "
             "(default: the checkpoint's).")] = None,
) -> None:
    """Search an index by a sentence, by an example image, or by an image plus a sentence that changes it.

    Results come from the same two stages as `xmr evaluate`: the index's top K', then the method's own
    re-scoring when it has one (--rerank-depth / --refine-k set K'; the printed `stage1` column is the
    index's cosine; MMRef adds S_init and S_ref columns)."""
    from xmr.data.images import load_image
    from xmr.search.retriever import load

    _check_precision(precision)
    if k < 1:
        raise typer.BadParameter("must be >= 1", param_hint="-k")
    if text is None and image is None:
        raise typer.BadParameter("give a query TEXT, --image, or both")
    if refine_k is not None and rerank_depth is not None and refine_k != rerank_depth:
        raise typer.BadParameter("--refine-k and --rerank-depth are the same K': give one", param_hint="--refine-k")
    retriever = load(index, checkpoint, precision=precision, compose=compose, mmap=mmap,
                     rerank_depth=refine_k if refine_k is not None else rerank_depth)
    if refine_lambda is not None:
        retriever.set_refinement(lam=refine_lambda)
    if image is not None:
        query_image = load_image(image)
        hits = (retriever.search_composed(query_image, text, k, refine=refine) if text
                else retriever.search_image(query_image, k, refine=refine))
    else:
        hits = retriever.search_text(text, k, refine=refine)
    query = " + ".join(str(q) for q in (image, text) if q)
    if as_json:
        typer.echo(json.dumps({"query": query, "results": [h.__dict__ for h in hits]}, indent=2))
    else:
        typer.echo(f"query: {query}")
        names = sorted({name for hit in hits for name in hit.parts})
        short = {"initial_score": "S_init", "reference_score": "S_ref"}
        heads = "".join(f"  {short.get(n, n):>8}" for n in names)
        typer.echo(f"{'rank':>4}  {'score':>7}  {'stage1':>7}{heads}  {'id':>7}  path")
        for rank, hit in enumerate(hits, 1):
            cells = "".join(f"  {hit.parts[n]:>8.4f}" if n in hit.parts else f"  {'-':>8}" for n in names)
            typer.echo(f"{rank:>4}  {hit.score:>7.4f}  {hit.first_stage_score:>7.4f}{cells}  {hit.id:>7}  {hit.path}")
    if grid is not None:
        from xmr.viz import result_grid

        paths = [str(retriever.image_path(h.id)) for h in hits]
        result_grid([query], [paths], None, grid,
                    scores=[[h.score for h in hits]])
        typer.echo(f"grid: {grid}")


def serve(
    index: Annotated[Path, typer.Argument(help="Index directory to serve.")],
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint (default: the one that built the index).")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless behind a proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="XMR_API_KEY", help="Require this key in the X-API-Key header (or set XMR_API_KEY).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload.")] = 10.0,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Queries encoded at once; more wait in a bounded queue.")] = 2,
    compose: ComposeOpt = None,
    precision: Precision = "bf16",
    compile: CompileOpt = False,
    mmap: MmapOpt = False,
) -> None:
    """Serve the search page and JSON API (OpenAPI docs at /docs) over an index.

    Further limits are read from XMR_SERVE_<FIELD> variables, e.g. XMR_SERVE_MAX_K=50.
    """
    from xmr.search.retriever import load
    from xmr.serve import ServeSettings, run

    _check_precision(precision)
    limit_threads_per_query(max_concurrency)
    retriever = load(index, checkpoint, precision=precision, compose=compose, compile=compile, mmap=mmap)
    # Other limits (max_k, max_text_chars, max_image_pixels, ...) come from XMR_SERVE_<FIELD> variables.
    settings = ServeSettings.from_env(host=host, port=port, api_key=api_key,
                                      max_upload_bytes=int(max_upload_mb * 2**20), max_concurrency=max_concurrency)
    typer.echo(f"serving {len(retriever)} images on http://{host}:{port}/  (API docs: /docs)")
    run(retriever, settings)


def limit_threads_per_query(max_concurrency: int) -> None:
    """Give each concurrent query its share of the cores: oversubscribed torch threads slow every query."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, max_concurrency)))


def register(app: typer.Typer) -> None:
    app.command()(embed)
    app.command()(search)
    app.command()(serve)
    app.add_typer(index_app, name="index")
