"""Encoding throughput of the CLIP towers for each inference recipe of `xmr.methods.inference`, vs fp32 eager.

Figures (issue #4, item 2): images/s of the ViT-B/16 image tower at 384x128 and texts/s of ViT-B/16's
text tower at 77 tokens, batch 64, random weights, `torch.inference_mode()`, for each variant:
fp32 eager (the reference), bf16 autocast, bf16 weights, bf16 compiled (bf16 weights + torch.compile
with inductor freezing) and fp32 compiled. Timed batches are interleaved across variants (round-robin)
and the best batch of each variant counts, so that a burst of load from other processes on a shared
machine hits every variant alike; compile time is reported separately.

FLOPs are counted analytically (multiply-add = 2 FLOPs), per image with N = 1 + gh*gw tokens of width D,
L layers, patch P, output dimension E:
    patch embedding  2 * gh*gw * (3*P*P) * D
    per layer        2*N*(3*D^2) [qkv] + 2*N*D^2 [out proj] + 2*N*(8*D^2) [MLP, 4x]  + 4*N^2*D [QK^T, AV]
                     = 2*N*(12*D^2 + 2*N*D)
    projection       2*N*D*E   (this model projects every token, not only the class token)
and per text of T tokens the same per-layer formula with N = T (the causal mask is not discounted) plus
2*T*W*E for the projection. LayerNorm, softmax and activations are left out (< 2% for ViT-B/16).
Achieved GFLOP/s is compared with the machine's measured GEMM peak (`_common.gemm_gflops`) in the same
precision, measured in the same run (the larger of a measurement before and after the timed rounds).

Accuracy: each fast variant's L2-normalised embeddings vs fp32 eager's on the same batch:
max |difference| over all elements and max over the batch of 1 - cosine.

Usage: python benchmarks/encode.py [--quick] [--batch 64] [--rounds 3] [--threads N] [--no-compile]
Default run: about 3-6 minutes on 2 idle cores (two towers compiled twice: ~1-2 min of compile time);
13 minutes measured with 2 cores shared at load ~10.
`--quick`: the `tiny` test CLIP at batch 16, one compiled variant: a smoke run of about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import gemm_gflops, machine, peak_rss_mib, row

from xmr.methods.inference import InferenceEncoder, compile_available, set_threads
from xmr.methods.irra import IRRA, IRRAConfig
from xmr.models.clip import CLIP, CLIPConfig, get_clip_config
from xmr.outputs import QueryBatch


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def image_gflop(cfg: CLIPConfig) -> float:
    v = cfg.vision
    gh, gw = v.grid_size
    n, d = 1 + gh * gw, v.width
    patch = 2 * gh * gw * 3 * v.patch_size**2 * d
    layers = v.layers * 2 * n * (12 * d * d + 2 * n * d)
    return (patch + layers + 2 * n * d * cfg.embed_dim) / 1e9


def text_gflop(cfg: CLIPConfig, tokens: int) -> float:
    t = cfg.text
    n, d = tokens, t.width
    return (t.layers * 2 * n * (12 * d * d + 2 * n * d) + 2 * n * d * cfg.embed_dim) / 1e9


def build_method(name: str, image_size: tuple[int, int]) -> tuple[IRRA, CLIPConfig]:
    torch.manual_seed(0)
    cfg = get_clip_config(name, **{"vision.image_size": list(image_size)})
    method = IRRA(CLIP(cfg), IRRAConfig(losses=["itc"])).eval()
    return method, cfg


def make_inputs(cfg: CLIPConfig, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, *cfg.vision.image_size, generator=gen)
    vocab, eot = cfg.text.vocab_size, cfg.text.eot_token_id or cfg.text.vocab_size - 1
    ids = torch.randint(1, vocab - 2, (batch, tokens), generator=gen)
    lengths = torch.randint(8, tokens, (batch,), generator=gen)
    for i, n in enumerate(lengths.tolist()):  # captions of varied length: end-of-text, then padding
        ids[i, n] = eot
        ids[i, n + 1:] = 0
    return images, ids


VARIANTS: dict[str, dict[str, Any]] = {
    "fp32 eager": {"precision": "fp32"},
    "bf16 autocast": {"precision": "bf16"},
    "bf16 weights": {"precision": "bf16", "cast_weights": True},
    "bf16 compiled": {"precision": "bf16", "compile": True},
    "fp32 compiled": {"precision": "fp32", "compile": True},
}


def towers(enc: InferenceEncoder) -> dict[str, Any]:
    """The gallery side (image tower) and the text-query side as plain tensor -> tensor callables."""
    return {"image": lambda images: enc.encode_gallery(images).vectors,
            "text": lambda ids: enc.encode_query(QueryBatch(ids=ids)).vectors}


def run(args: argparse.Namespace) -> dict[str, Any]:
    threads = set_threads(args.threads)
    name, image_size, tokens = ("tiny", (64, 32), 32) if args.quick else ("ViT-B/16", (384, 128), 77)
    batch = args.batch or (16 if args.quick else 64)
    method, cfg = build_method(name, image_size)
    images, ids = make_inputs(cfg, batch, tokens)
    compiled_ok, why = compile_available()
    names = list(VARIANTS)
    if args.quick or args.no_compile or not compiled_ok:
        names.remove("fp32 compiled")
    if args.no_compile or not compiled_ok:
        names.remove("bf16 compiled")
    gflop = {"image": image_gflop(cfg), "text": text_gflop(cfg, tokens)}
    log(f"{name}: {gflop['image']:.2f} GFLOP/image, {gflop['text']:.2f} GFLOP/text, batch {batch}, "
        f"{threads} threads, variants {names}")

    inputs = {"image": images, "text": ids}
    encoders: dict[str, InferenceEncoder] = {}
    details: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, torch.Tensor]] = {}
    for variant in names:
        start = time.perf_counter()
        enc = InferenceEncoder(method, **VARIANTS[variant])
        encoders[variant] = enc
        details[variant] = {"recipe": enc.describe(), "compile_seconds": {}, "seconds": {"image": [], "text": []}}
        outputs[variant] = {}
        for tower, fn in towers(enc).items():
            t0 = time.perf_counter()
            outputs[variant][tower] = F.normalize(fn(inputs[tower]), dim=-1)  # first call: compiles
            details[variant]["compile_seconds"][tower] = round(time.perf_counter() - t0, 2)
        log(f"  {variant}: ready in {time.perf_counter() - start:.1f} s (first calls {details[variant]['compile_seconds']})")

    peaks = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    for r in range(args.rounds):
        for tower in ("image", "text"):
            for _ in range(1 if tower == "image" else 2):  # text batches are ~6x cheaper: time more of them
                for variant in names:
                    fn = towers(encoders[variant])[tower]
                    t0 = time.perf_counter()
                    fn(inputs[tower])
                    details[variant]["seconds"][tower].append(time.perf_counter() - t0)
        log(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {batch / min(details[v]['seconds']['image']):.1f} img/s" for v in names))
    peaks = {"fp32": max(peaks["fp32"], gemm_gflops(torch.float32)),
             "bf16": max(peaks["bf16"], gemm_gflops(torch.bfloat16))}
    log(f"  GEMM peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")

    for variant in names:
        d = details[variant]
        prec = VARIANTS[variant]["precision"]
        for tower in ("image", "text"):
            per_s = batch / min(d["seconds"][tower])
            gflops = per_s * gflop[tower]
            ref, out = outputs["fp32 eager"][tower], outputs[variant][tower]
            d[tower] = {"per_s": per_s, "gflops": gflops, "fraction_of_peak": gflops / peaks[prec],
                        "max_abs_diff": float((out - ref).abs().max()),
                        "max_one_minus_cos": float((1 - (out * ref).sum(-1)).max())}
    return {"model": name, "image_size": list(image_size), "tokens": tokens, "batch": batch, "threads": threads,
            "gflop_per_image": gflop["image"], "gflop_per_text": gflop["text"], "gemm_peak_gflops": peaks,
            "compile_available": compiled_ok, "compile_unavailable_reason": why or None, "variants": details}


def best(result: dict[str, Any], tower: str, precision: str = "bf16") -> str:
    """The fastest variant of a precision for a tower."""
    candidates = [v for v, d in result["variants"].items() if VARIANTS[v]["precision"] == precision]
    return max(candidates, key=lambda v: result["variants"][v][tower]["per_s"])


def rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    v, peaks = result["variants"], result["gemm_peak_gflops"]
    size = "x".join(map(str, result["image_size"]))
    model, batch = result["model"], result["batch"]
    out = []
    for tower, unit, label in (("image", "images/s", f"{model} image tower {size}"),
                               ("text", "texts/s", f"{model} text tower {result['tokens']} tokens")):
        fast, ref = best(result, tower), v["fp32 eager"][tower]
        per_item = result[f"gflop_per_{tower}"]
        ours = v[fast][tower]
        out.append(row(f"{label}, batch {batch}: {unit} ({fast})", ours["per_s"], unit,
                       reference=ref["per_s"], reference_name="fp32 eager",
                       limit=peaks["bf16"] / per_item, limit_name="bf16 GEMM peak / FLOPs per item",
                       target=">= 50% of bf16 GEMM peak" if tower == "image" else None,
                       met=ours["fraction_of_peak"] >= 0.5 if tower == "image" else None,
                       note=f"{per_item:.2f} GFLOP/{tower}; {ours['gflops']:.0f} GFLOP/s = "
                            f"{100 * ours['fraction_of_peak']:.0f}% of bf16 GEMM peak {peaks['bf16']:.0f} GFLOP/s"))
        fp32 = best(result, tower, "fp32")
        out.append(row(f"{label}: GFLOP/s fp32 ({fp32})", v[fp32][tower]["gflops"], "GFLOP/s",
                       reference=ref["gflops"], reference_name="fp32 eager", limit=peaks["fp32"],
                       limit_name="fp32 GEMM peak"))
        out.append(row(f"{label}: 1 - cos vs fp32 ({fast}, worst of batch)", ours["max_one_minus_cos"], "",
                       higher_is_better=False, target="<= 1e-3", met=ours["max_one_minus_cos"] <= 1e-3,
                       note=f"max |diff| of normalised embeddings {ours['max_abs_diff']:.2g}"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, smoke run (~1 min)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 64; 16 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="timed image batches per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = parser.parse_args()
    start = time.perf_counter()
    result = run(args)
    report = {"benchmark": "encode", "machine": machine(), "rows": rows(result), **result,
              "seconds": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak_rss_mib())}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
