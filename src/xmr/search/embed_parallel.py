"""Embed a large gallery with several local processes (`xmr embed --processes N`).

Each process embeds one interleaved part of the sorted listing (`--shard` semantics) into its own
resumable store `OUT/shard-NNN`, with `cores // N` torch threads, so the parts never contend for a
file and a killed run resumes per part. `xmr index build OUT` merges the parts into one index (an
image embedded twice, e.g. after changing N between runs, is indexed once).

Combined with `--shard i/n` (one machine's share of a cluster run), process j of this machine takes
part i + n*j of n*N: the machines' parts and their processes' parts still tile the listing exactly.
Each part is an ordinary embedding store, side arrays included (`xmr.search.embed`), so the merge
carries every image's side arrays into the index with its vector.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.errors import XmrError
from xmr.search.embed import EmbedResult, embed_images


@dataclass
class ParallelEmbedResult:
    """What the processes did together; `parts` holds each process's own result."""

    directory: Path
    parts: list[EmbedResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(p.total for p in self.parts)

    @property
    def embedded(self) -> int:
        return sum(p.embedded for p in self.parts)

    @property
    def already_done(self) -> int:
        return sum(p.already_done for p in self.parts)

    @property
    def failed(self) -> list[dict[str, str]]:
        return [f for p in self.parts for f in p.failed]


def sub_shards(shard: tuple[int, int], processes: int) -> list[tuple[int, int]]:
    """The parts of `shard` (i, n) for `processes` local processes: (i + n*j, n*processes) for each j."""
    index, count = shard
    return [(index + count * j, count * processes) for j in range(processes)]


def _child(args: dict[str, Any], progress_queue: Any, results: Any) -> None:
    import torch

    torch.set_num_threads(args.pop("threads"))
    part = args["shard"][0]
    try:
        result = embed_images(**args, progress=False, on_progress=progress_queue.put)
        results.put((part, result, None))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, which names the part
        results.put((part, None, f"{type(exc).__name__}: {exc}"))


def embed_images_parallel(source: str | Path, checkpoint: str | Path, out: str | Path, *, processes: int,
                          shard: tuple[int, int] = (0, 1), batch_size: int = 64, num_workers: int = 0,
                          precision: str = "bf16", chunk_size: int = 1024, progress: bool = True,
                          threads: int | None = None, compile: bool = False) -> ParallelEmbedResult:
    """Embed `source` into `out/shard-NNN` with `processes` CPU processes (resumable, like `embed_images`).

    `threads` per process defaults to the machine's cores divided among the processes; `num_workers`
    decoding workers are started by each process.
    """
    from tqdm.auto import tqdm

    from xmr.search.embed import list_images

    if processes < 1:
        raise XmrError(f"--processes must be >= 1, got {processes}")
    start = time.perf_counter()
    out = Path(out)
    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    parts = sub_shards(shard, processes)
    total = len(list_images(source)[1][shard[0]::shard[1]])
    ctx = mp.get_context("spawn")  # torch and fork do not mix (OpenMP thread pools)
    progress_queue, results = ctx.Queue(), ctx.Queue()
    children = []
    for part in parts:
        args = {"source": str(source), "checkpoint": str(checkpoint), "out": out / f"shard-{part[0]:03d}",
                "batch_size": batch_size, "num_workers": num_workers, "precision": precision, "device": "cpu",
                "shard": part, "chunk_size": chunk_size, "threads": threads, "compile": compile}
        child = ctx.Process(target=_child, args=(args, progress_queue, results), daemon=True)
        child.start()
        children.append(child)
    bar = tqdm(total=total, desc=f"embedding ({processes} processes)", unit="img", disable=not progress,
               dynamic_ncols=True)
    try:
        outcome, errors = _collect(children, results, progress_queue, bar, len(parts) * shard[1])
    finally:
        bar.close()
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.terminate()
    if errors:
        raise XmrError("embedding failed in " + "; ".join(errors))
    return ParallelEmbedResult(out, [outcome[p[0]] for p in parts], time.perf_counter() - start)


def _collect(children: list[Any], results: Any, progress_queue: Any, bar: Any, parts: int
             ) -> tuple[dict[int, EmbedResult], list[str]]:
    """Wait for every child's result (driving the progress bar); a child that dies without one raises."""
    outcome: dict[int, EmbedResult] = {}
    errors: list[str] = []
    while len(outcome) + len(errors) < len(children):
        _drain(progress_queue, bar)
        try:
            part, result, error = results.get(timeout=0.2)
        except queue.Empty:
            dead = [c for c in children if not c.is_alive() and c.exitcode not in (0, None)]
            if dead and results.empty():
                time.sleep(0.5)  # a result may still be in flight from a process that just ended
                if results.empty():
                    raise XmrError(f"an embedding process died (exit code {dead[0].exitcode}); "
                                   "run the same command again to resume") from None
            continue
        if error:
            errors.append(f"part {part}/{parts}: {error}")
        else:
            outcome[part] = result
    _drain(progress_queue, bar)
    return outcome, errors


def _drain(progress_queue: Any, bar: Any) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return
