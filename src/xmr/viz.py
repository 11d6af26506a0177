"""Pictures people would rather look at: top-k result grids and training curves (PNG)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CORRECT, WRONG, UNKNOWN = (30, 170, 60), (210, 40, 40), (120, 120, 120)


def result_grid(queries: Sequence[str], results: Sequence[Sequence[str]], correct: Sequence[Sequence[bool | None]] | None,
                out_path: str | Path, *, scores: Sequence[Sequence[float]] | None = None,
                thumb: tuple[int, int] = (192, 64), text_width: int = 300) -> Path:
    """One row per query: its text, then the ranked images outlined green (correct), red (wrong) or grey
    (not known, e.g. a search of unlabelled images: pass correct=None)."""
    th, tw = thumb
    k = max((len(r) for r in results), default=0)
    pad, border, label_h = 8, 4, 16
    row_h = th + 2 * border + label_h + pad
    width = text_width + k * (tw + 2 * border + pad) + pad
    canvas = Image.new("RGB", (width, pad + row_h * len(queries)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, query in enumerate(queries):
        y = pad + row * row_h
        wrapped = textwrap.fill(query, width=max(text_width // 7, 10))
        draw.multiline_text((pad, y), wrapped, fill="black", font=font, spacing=2)
        for col, path in enumerate(results[row]):
            x = text_width + col * (tw + 2 * border + pad)
            flag = None if correct is None else correct[row][col]
            colour = UNKNOWN if flag is None else CORRECT if flag else WRONG
            draw.rectangle([x, y, x + tw + 2 * border - 1, y + th + 2 * border - 1], fill=colour)
            with Image.open(path) as image:
                canvas.paste(image.convert("RGB").resize((tw, th), Image.BICUBIC), (x + border, y + border))
            label = f"#{col + 1}" + (f"  {scores[row][col]:.3f}" if scores is not None else "")
            draw.text((x, y + th + 2 * border + 1), label, fill=colour, font=font)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def training_curves(history: Sequence[dict], out_path: str | Path, metric: str = "R1") -> Path | None:
    """Training loss per step and the validation metric per epoch, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval" and metric in r]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="total")
    for name in ("sdm", "id", "mlm", "itc", "cmpm"):
        if name in train[0]:
            axes[0].plot([r["step"] for r in train], [r[name] for r in train], label=name, alpha=0.7)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("loss"), axes[0].legend()
    axes[1].plot([r["epoch"] for r in evals], [r[metric] for r in evals], marker="o")
    axes[1].set_xlabel("epoch"), axes[1].set_ylabel(f"val {metric} (%)")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
