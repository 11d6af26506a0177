"""Load a checkpoint directory for inference: method, tokenizer and settings, without any training code.

Search, serving, evaluation and export all load checkpoints through `load_checkpoint`. Checkpoints written
by earlier versions of xmr (the single-method config shape) are converted on read by `upgrade_config`,
the one place that knows those shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xmr.config import ExperimentConfig, config_from_dict, upgrade_legacy
from xmr.errors import CheckpointError
from xmr.methods import method_from_exported
from xmr.methods.base import Method, Transform
from xmr.models.checkpoints import load_model_dir
from xmr.outputs import QueryBatch
from xmr.text.tokenizer import ClipTokenizer

TOKENIZER_FILE = "tokenizer.txt.gz"


def _upgrade_irra_export(exported: dict[str, Any]) -> dict[str, Any]:
    """xmr <= 0.1.0 exported IRRA as {"irra": {losses, weights, temperature, num_classes, vocab_size, ...}}."""
    old = dict(exported["irra"])
    config = {"name": "irra", "losses": list(old.get("losses", ["sdm", "id", "mlm"])),
              "temperature": old.get("temperature", 0.02), "cmt_depth": old.get("cmt_depth", 4),
              "soft_label_weight": old.get("soft_label_weight")}
    config.update({f"{name}_weight": float(w) for name, w in (old.get("weights") or {}).items()})
    return {"method": "irra", "clip": exported["clip"], "config": config,
            "num_classes": int(old.get("num_classes", 0)), "vocab_size": int(old.get("vocab_size", 49409))}


def upgrade_config(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A checkpoint's config.yaml in the current shape; (config, whether anything was converted)."""
    out, changed = dict(config), False
    model = out.get("model")
    if isinstance(model, dict) and model.get("method") == "irra" and "irra" in model:
        out["model"], changed = _upgrade_irra_export(model), True
    if isinstance(out.get("experiment"), dict):
        out["experiment"], legacy = upgrade_legacy(out["experiment"])
        changed = changed or legacy
    return out, changed


@dataclass
class LoadedModel:
    """A checkpoint ready for inference: method (eval mode), tokenizer, image size and its config."""

    method: Method
    tokenizer: ClipTokenizer
    image_size: tuple[int, int]
    context_length: int
    config: dict[str, Any]
    path: str
    upgraded: bool = False  # the config was written by an earlier xmr and converted on read

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)

    def text_query(self, texts: list[str]) -> QueryBatch:
        return QueryBatch(ids=self.tokenize(texts))

    @property
    def query_transform(self) -> Transform:
        return self.method.query_transform()

    @property
    def gallery_transform(self) -> Transform:
        return self.method.gallery_transform()

    def experiment(self) -> ExperimentConfig | None:
        data = self.config.get("experiment")
        return config_from_dict(data, f"{self.path}/config.yaml") if data else None


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an xmr checkpoint directory (`best/` or `last/` of a run) for inference."""
    directory = Path(directory)
    config, weights = load_model_dir(directory)
    if "model" not in config:
        raise CheckpointError(f"{directory}/config.yaml has no 'model' section: not an xmr method checkpoint")
    config, upgraded = upgrade_config(config)
    method = method_from_exported(config["model"])
    missing, unexpected = method.load_state_dict(weights, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        kind = "missing from" if missing else "unexpected in"
        raise CheckpointError(f"{directory}/model.safetensors: key '{key}' is {kind} the checkpoint")
    tokenizer_path = directory / config.get("tokenizer", TOKENIZER_FILE)
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{directory}: tokenizer file {tokenizer_path.name} is missing")
    tokenizer = ClipTokenizer.from_bpe_file(tokenizer_path)
    method.to(device).eval()
    return LoadedModel(method, tokenizer, tuple(config["image_size"]), int(config["context_length"]), config,
                       str(directory), upgraded)
