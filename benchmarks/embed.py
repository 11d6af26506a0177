"""Embedding a gallery with `xmr embed`: one process vs several local processes (`--processes N`).

Prints JSON. A demo-sized model (configs/demo.yaml, one training step so a real checkpoint exists)
embeds the same synthetic gallery of JPEGs end to end (decode, transform, encode, write chunks):
once with one process using all cores (the reference) and once with N processes of cores/N threads
each, both bf16. The figure is images/s; the ratio shows what splitting the work across processes
buys over one process's intra-op threads on this machine.

    python benchmarks/embed.py [--images 2000] [--processes 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, row

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(work: Path) -> tuple[Path, Path]:
    """A demo-config checkpoint (one training step) and the folder of its synthetic images."""
    from xmr.config import load_config
    from xmr.data.synthetic import generate_pedes_demo
    from xmr.jobs.train import run_training

    data = generate_pedes_demo(work / "data", num_ids=500, images_per_id=4, split_ids=(20, 5, 475), seed=0)
    cfg = load_config(REPO / "configs/demo.yaml", [
        f"data.root={data}", f"train.output_dir={work / 'run'}", "optim.epochs=1", "train.max_steps_per_epoch=1",
        "train.progress=false", "train.tensorboard=false", "data.num_workers=0", "eval.num_workers=0"])
    run_training(cfg)
    return work / "run" / "last", data / "imgs"


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=max(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="400 images: a smoke run")
    args = parser.parse_args()
    images = 400 if args.quick else args.images

    import torch

    from xmr.search.embed import embed_images, list_images
    from xmr.search.embed_parallel import embed_images_parallel

    work = Path(tempfile.mkdtemp(prefix="xmr-bench-embed-"))
    try:
        checkpoint, folder = make_checkpoint(work)
        listing = list_images(folder)[1][:images]
        (work / "list.txt").write_text("\n".join(str(folder / p) for p in listing))
        source = work / "list.txt"
        torch.set_num_threads(os.cpu_count() or 1)
        one_s, one = timed(embed_images, source, checkpoint, work / "one", num_workers=1, precision="bf16",
                           progress=False)
        many_s, many = timed(embed_images_parallel, source, checkpoint, work / "many", processes=args.processes,
                             num_workers=0, precision="bf16", progress=False)
        assert one.embedded == many.embedded == len(listing), (one.embedded, many.embedded)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one_rate, many_rate = len(listing) / one_s, len(listing) / many_s
    print(json.dumps({
        "benchmark": "embed", "machine": machine(), "images": len(listing), "processes": args.processes,
        "model": "demo config (192x64)", "one_process": {"seconds": round(one_s, 2), "images_per_s": round(one_rate, 1)},
        "processes_run": {"seconds": round(many_s, 2), "images_per_s": round(many_rate, 1)},
        "rows": [row(f"xmr embed, {args.processes} processes x {max(1, (os.cpu_count() or 1) // args.processes)} "
                     f"threads (demo model, bf16, {len(listing)} JPEGs)", many_rate, "img/s", reference=one_rate,
                     reference_name=f"1 process x {os.cpu_count()} threads",
                     note="includes process start-up and model loading")],
    }, indent=2))


if __name__ == "__main__":
    main()
