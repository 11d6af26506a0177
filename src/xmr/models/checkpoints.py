"""Checkpoint reading, key conversion and our own checkpoint directories: the ONE place for key shims.

Supported sources (all converted to OpenAI CLIP's state-dict layout, which our `CLIP` uses):
- OpenAI: the released `ViT-B-16.pt` files (TorchScript archives) or plain state dicts;
- open_clip: the standard CLIP layout, possibly under `state_dict` and with `module.` prefixes;
- Hugging Face `CLIPModel`: a directory with `config.json` + `model.safetensors` / `pytorch_model.bin`;
- IRRA (`best.pth`): `{'model': {'base_model.*': CLIP, 'cross_attn.*': ..., 'mlm_head.*': ...}}`;
- xmr: a directory with `config.yaml` (or json) + `model.safetensors` written by `save_model_dir`.
Loading never unpickles arbitrary Python objects (see `read_state_dict` for the TorchScript exception).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xmr.atomic import fsync_file, write_durable
from xmr.errors import CheckpointError
from xmr.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

StateDict = dict[str, torch.Tensor]
FORMATS = ("openai", "open_clip", "hf", "irra", "xmr")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILES = ("config.yaml", "config.json")
# Non-weight entries of OpenAI's TorchScript state dicts and older open_clip checkpoints.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_IRRA_FUSION = ("cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.")
_IRRA_KEEP = ("mlm_head.", "classifier.")
_WEIGHT_NAMES = (WEIGHTS_FILE, "pytorch_model.bin",
                 "open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # fmt: skip
# Hugging Face CLIPModel -> OpenAI names: per encoder layer, and the tower-level LayerNorms.
_HF_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
_HF_NORMS = {"vision_model.pre_layrnorm": "visual.ln_pre", "vision_model.post_layernorm": "visual.ln_post",
             "text_model.final_layer_norm": "ln_final"}  # fmt: skip


# -- reading ---------------------------------------------------------------------------------------
def _corrupt(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: the file looks truncated or corrupt and cannot be read ({err}); download or copy it again"
    )


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _looks_like_safetensors(path: Path) -> bool:
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_file(path: Path) -> Any:
    """Raw content of one weights file (a state dict or a container of one)."""
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _corrupt(path, err) from None
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:
            raise _corrupt(path, err) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad archives
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors, which xmr refuses to "
                "unpickle; re-save only the state dict (torch.save(model.state_dict()))"
            ) from None
        raise _corrupt(path, err) from None


def _read_directory(path: Path) -> Any:
    """Weights of a Hugging Face or xmr checkpoint directory (sharded safetensors included)."""
    index = path / f"{WEIGHTS_FILE}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        merged: StateDict = {}
        for shard in shards:
            merged.update(_read_file(path / shard))
        return merged
    for name in _WEIGHT_NAMES:
        if (path / name).is_file():
            return _read_file(path / name)
    raise CheckpointError(f"{path}: directory holds no weights file ({WEIGHTS_FILE} or pytorch_model.bin)")


def _unwrap(obj: Any, path: Path) -> StateDict:
    """Descend into {'state_dict': ...} / {'model': ...} containers; strip DDP 'module.' prefixes."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file or directory into a flat {name: tensor} dict on the CPU.

    `.safetensors` files are read with safetensors; `.pt/.pth/.bin` with
    `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers. The one
    exception is a TorchScript archive (how OpenAI released `ViT-B-16.pt`), read with
    `torch.jit.load(...).state_dict()`: TorchScript deserialises serialized TorchScript code and
    tensors, not arbitrary Python pickles the way `torch.load(weights_only=False)` would.
    Directories: Hugging Face (`config.json` + weights) or xmr (`config.yaml` + `model.safetensors`).
    Containers such as `{'state_dict': ...}` or IRRA's `{'model': ...}` are unwrapped and DDP
    `module.` prefixes stripped. Raises CheckpointError naming the path when missing or corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    raw = _read_directory(path) if path.is_dir() else _read_file(path)
    return _unwrap(raw, path)


# -- formats and conversion ------------------------------------------------------------------------
def detect_format(state_dict: StateDict) -> str:
    """Which layout a state dict uses: one of FORMATS. Raises CheckpointError when none fits."""
    keys = list(state_dict)
    if any(k.startswith("base_model.") for k in keys):
        return "irra"
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if "clip.visual.conv1.weight" in state_dict:
        return "xmr"
    if "visual.conv1.weight" in state_dict:
        custom = any(
            k.startswith(("text.", "visual.trunk.", "visual.attn_pool")) or k in ("attn_mask", "logit_bias")
            for k in keys
        )
        return "open_clip" if custom else "openai"
    if "visual.trunk.stem.0.weight" in state_dict or any(k.startswith("text.") for k in keys):
        return "open_clip"
    if "visual.layer1.0.conv1.weight" in state_dict:
        raise CheckpointError("ResNet CLIP checkpoints are not supported; use a ViT CLIP (e.g. ViT-B/16)")
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {keys[:5]}); expected OpenAI, "
        "open_clip, Hugging Face CLIPModel, IRRA or xmr weights"
    )


def _hf_layer_to_openai(sd: StateDict, src: str, dst: str, out: StateDict) -> None:
    """One HF encoder layer -> one OpenAI resblock (q/k/v concatenated into in_proj)."""
    att = f"{src}.self_attn"
    out[f"{dst}.attn.in_proj_weight"] = torch.cat([sd[f"{att}.{p}_proj.weight"] for p in "qkv"])
    out[f"{dst}.attn.in_proj_bias"] = torch.cat([sd[f"{att}.{p}_proj.bias"] for p in "qkv"])
    for hf, oa in _HF_LAYER.items():
        for p in ("weight", "bias"):
            out[f"{dst}.{oa}.{p}"] = sd[f"{src}.{hf}.{p}"]


def convert_hf_to_openai(sd: StateDict) -> StateDict:
    """Hugging Face CLIPModel keys -> OpenAI CLIP keys (Linear projections become (in, out) matrices)."""
    sd = {k.removeprefix("clip."): v for k, v in sd.items()}
    try:
        out: StateDict = {
            "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
            "visual.proj": sd["visual_projection.weight"].t(),
            "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
            "text_projection": sd["text_projection.weight"].t(),
        }
        if "logit_scale" in sd:
            out["logit_scale"] = sd["logit_scale"]
        for hf, oa in _HF_NORMS.items():
            for p in ("weight", "bias"):
                out[f"{oa}.{p}"] = sd[f"{hf}.{p}"]
        layer = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.")
        for tower, idx in sorted({m.groups() for k in sd if (m := layer.match(k))}):
            dst = "visual.transformer" if tower == "vision_model" else "transformer"
            _hf_layer_to_openai(sd, f"{tower}.encoder.layers.{idx}", f"{dst}.resblocks.{idx}", out)
    except KeyError as err:
        raise CheckpointError(f"Hugging Face CLIP checkpoint lacks the key {err.args[0]!r}") from None
    return out


def split_irra_state_dict(sd: StateDict) -> tuple[StateDict, StateDict]:
    """IRRA weights -> (CLIP weights with OpenAI keys, head weights with xmr names).

    `base_model.*` is the CLIP backbone; the cross-modal encoder's `cross_attn.*`,
    `cross_modal_transformer.*`, `ln_pre_t.*`, `ln_pre_i.*`, `ln_post.*` become `fusion.<same>`;
    `mlm_head.*` and `classifier.*` keep their names. Other keys are dropped.
    """
    clip_sd: StateDict = {}
    head_sd: StateDict = {}
    for key, value in sd.items():
        if key.startswith("base_model."):
            clip_sd[key[len("base_model.") :]] = value
        elif key.startswith(_IRRA_FUSION):
            head_sd[f"fusion.{key}"] = value
        elif key.startswith(_IRRA_KEEP):
            head_sd[key] = value
    return clip_sd, head_sd


def to_openai(sd: StateDict, fmt: str | None = None) -> StateDict:
    """Any supported layout -> the CLIP part in OpenAI keys (heads and non-weight entries dropped)."""
    fmt = fmt or detect_format(sd)
    if fmt == "hf":
        return convert_hf_to_openai(sd)
    if fmt == "irra":
        sd = split_irra_state_dict(sd)[0]
    elif fmt == "xmr":
        sd = {k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.")}
    elif fmt == "open_clip":
        custom = [k for k in sd if k.startswith(("text.", "visual.trunk.", "visual.attn_pool"))]
        if custom:
            raise CheckpointError(
                f"open_clip checkpoint with a custom tower (key {custom[0]!r}) is not "
                "supported; only the standard CLIP ViT layout loads"
            )
    return {k: v for k, v in sd.items() if k not in _OPENAI_EXTRAS and k != "logit_bias"}


# -- configuration from weights --------------------------------------------------------------------
def _count_layers(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def infer_clip_config(
    openai_sd: StateDict, image_size: tuple[int, int] | None = None, stride: int | None = None
) -> CLIPConfig:
    """CLIPConfig from OpenAI-layout weights (heads = width // 64, OpenAI's convention).

    The image size is taken from the positional grid when it is square (stride = patch), e.g.
    14x14 with patch 16 -> 224x224; otherwise `image_size` must be given.
    """
    try:
        conv = openai_sd["visual.conv1.weight"]
        patch, v_width = conv.shape[-1], conv.shape[0]
        n_patches = openai_sd["visual.positional_embedding"].shape[0] - 1
        side = math.isqrt(n_patches)
        if image_size is None:
            if side * side != n_patches:
                raise CheckpointError(
                    f"cannot infer the image size from a non-square grid of {n_patches} "
                    "patches; pass image_size=(H, W)"
                )
            image_size = (side * patch, side * patch)
        t_width = openai_sd["ln_final.weight"].shape[0]
        token = openai_sd["token_embedding.weight"]
        vision = VisionConfig(
            image_size=tuple(image_size),
            patch_size=patch,
            stride=stride,
            width=v_width,
            layers=_count_layers(openai_sd, "visual.transformer.resblocks."),
            heads=v_width // 64,
        )
        text = TextConfig(
            context_length=openai_sd["positional_embedding"].shape[0],
            vocab_size=token.shape[0],
            width=t_width,
            layers=_count_layers(openai_sd, "transformer.resblocks."),
            heads=max(1, t_width // 64),
            eot_token_id=49407 if token.shape[0] >= 49408 else None,
        )
        return CLIPConfig(embed_dim=openai_sd["visual.proj"].shape[1], vision=vision, text=text)
    except KeyError as err:
        raise CheckpointError(f"cannot infer a CLIP config: weights lack {err.args[0]!r}") from None


def clip_config_from_hf(hf_config: dict[str, Any]) -> CLIPConfig:
    """CLIPConfig from a Hugging Face CLIP `config.json` (its own head counts, activation and eos id)."""
    v, t = hf_config.get("vision_config", {}), hf_config.get("text_config", {})
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"unsupported Hugging Face CLIP activation(s) {sorted(acts)}")
    for name, sub in (("vision", v), ("text", t)):
        width = sub.get("hidden_size", 768 if name == "vision" else 512)
        if sub.get("intermediate_size", 4 * width) != 4 * width:
            raise CheckpointError(f"{name}_config.intermediate_size must be 4 x hidden_size for this CLIP")
    eos = t.get("eos_token_id", 2)
    size = v.get("image_size", 224)
    return CLIPConfig(
        embed_dim=hf_config.get("projection_dim", 512),
        vision=VisionConfig(
            image_size=(size, size),
            patch_size=v.get("patch_size", 32),
            width=v.get("hidden_size", 768),
            layers=v.get("num_hidden_layers", 12),
            heads=v.get("num_attention_heads", 12),
        ),
        text=TextConfig(
            context_length=t.get("max_position_embeddings", 77),
            vocab_size=t.get("vocab_size", 49408),
            width=t.get("hidden_size", 512),
            layers=t.get("num_hidden_layers", 12),
            heads=t.get("num_attention_heads", 8),
            eot_token_id=None if eos == 2 else eos,  # HF's legacy eos id 2 means "argmax"
        ),
        act=acts.pop(),
        logit_scale_init=hf_config.get("logit_scale_init_value", math.log(1 / 0.07)),
    )


def _config_of_directory(path: Path) -> CLIPConfig | None:
    """The CLIPConfig described by a HF or xmr checkpoint directory, if any."""
    if path.is_file() or not path.exists():
        return None
    if (path / "config.json").is_file():
        data = json.loads((path / "config.json").read_text())
        if "vision_config" in data or data.get("model_type") == "clip":
            return clip_config_from_hf(data)
    if any((path / name).is_file() for name in CONFIG_FILES):
        config = load_model_dir(path, weights=False)[0]
        data = config.get("clip", config)
        if isinstance(data, dict) and "vision" in data and "text" in data:
            return CLIPConfig.from_dict(data)
    return None


# -- loading into a model --------------------------------------------------------------------------
def resize_positional_grid(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize a (1 + h*w, D) positional embedding to another patch grid by bicubic interpolation.

    The class-token row (row 0) is kept as is; the rest is read row-major as an (h, w) grid.
    """
    (oh, ow), (nh, nw) = old_grid, new_grid
    if pos.shape[0] != 1 + oh * ow:
        raise CheckpointError(f"positional embedding has {pos.shape[0] - 1} patch rows, not {oh}x{ow}")
    cls, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, oh, ow, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(nh * nw, -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=0)


def _adapt(sd: StateDict, model: CLIP, old_grid: tuple[int, int] | None, name: str) -> list[str]:
    """Fit the positional grid, token rows and text context of `sd` (in place) to `model`."""
    notes: list[str] = []
    key = "visual.positional_embedding"
    target = model.visual.positional_embedding
    if key in sd and sd[key].shape != target.shape and sd[key].shape[1:] == target.shape[1:]:
        n = sd[key].shape[0] - 1
        if old_grid is None or old_grid[0] * old_grid[1] != n:
            side = math.isqrt(n)
            if side * side != n:
                raise CheckpointError(
                    f"{name}: cannot tell the positional grid of {n} patches; "
                    "load it into a model with the same image size and stride"
                )
            old_grid = (side, side)
        new_grid = model.visual.grid_size
        sd[key] = resize_positional_grid(sd[key], old_grid, new_grid)
        notes.append(
            f"resized {key} grid {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} (bicubic)"
        )
    key, rows = "token_embedding.weight", model.token_embedding.weight
    if key in sd and sd[key].shape[0] < rows.shape[0] and sd[key].shape[1:] == rows.shape[1:]:
        # Extra rows (e.g. a [MASK] token) keep the model's own normal(0.02) initialisation.
        extra = rows.detach()[sd[key].shape[0] :].to(sd[key].dtype)
        notes.append(f"added {extra.shape[0]} token embedding row(s) ({sd[key].shape[0]} -> {rows.shape[0]})")
        sd[key] = torch.cat([sd[key], extra])
    key, ctx = "positional_embedding", model.positional_embedding
    if key in sd and sd[key].shape[0] > ctx.shape[0] and sd[key].shape[1:] == ctx.shape[1:]:
        # Causal attention: dropping the last positions leaves the earlier ones unchanged.
        notes.append(f"truncated text context {sd[key].shape[0]} -> {ctx.shape[0]}")
        sd[key] = sd[key][: ctx.shape[0]]
    return notes


def _load_openai(
    model: CLIP, sd: StateDict, name: str, *, strict: bool, old_grid: tuple[int, int] | None = None
) -> list[str]:
    sd = dict(sd)
    notes = _adapt(sd, model, old_grid, name)
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape:
            raise CheckpointError(
                f"{name}: shape mismatch at {key!r}: checkpoint {tuple(value.shape)} vs "
                f"model {tuple(own[key].shape)}"
            )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        kind, key = ("missing", missing[0]) if missing else ("unexpected", unexpected[0])
        shape = tuple(own[key].shape) if missing else tuple(sd[key].shape)
        raise CheckpointError(
            f"{name}: {kind} key {key!r} (shape {shape}); {len(missing)} missing, "
            f"{len(unexpected)} unexpected in total"
        )
    if missing:
        notes.append(f"{len(missing)} key(s) kept their initial values, first {missing[0]!r}")
    if unexpected:
        notes.append(f"{len(unexpected)} unexpected key(s) ignored, first {unexpected[0]!r}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return notes


def load_clip_weights(
    model: CLIP, source: str | os.PathLike | StateDict, *, strict: bool = True
) -> list[str]:
    """Load OpenAI / open_clip / HF / IRRA / xmr CLIP weights into `model`; return notes on what was adapted.

    The positional grid is resized bicubically when the checkpoint's differs (e.g. 14x14 -> 24x8),
    token-embedding rows are appended when the model has a larger vocabulary (e.g. +1 mask token)
    and a longer text context is truncated. A missing/unexpected key (when `strict`) or a shape
    mismatch raises CheckpointError naming the source and the first offending key with both shapes.
    """
    is_dict = isinstance(source, dict)
    name = "<state dict>" if is_dict else str(source)
    raw = source if is_dict else read_state_dict(source)
    try:
        fmt = detect_format(raw)
        sd = to_openai(raw, fmt)
    except CheckpointError as err:
        raise CheckpointError(f"{name}: {err}") from None
    source_cfg = None if is_dict else _config_of_directory(Path(source))
    hint = source_cfg.vision.grid_size if source_cfg is not None else None
    return [f"read {fmt} layout"] + _load_openai(model, sd, name, strict=strict, old_grid=hint)


def load_pretrained_clip(
    path: str | os.PathLike, image_size: tuple[int, int] | None = None, stride: int | None = None
) -> CLIP:
    """Build a CLIP shaped like the checkpoint at `path` (at `image_size`/`stride` if given) and load it."""
    raw = read_state_dict(path)
    try:
        sd = to_openai(raw)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    cfg = _config_of_directory(Path(path))
    old_grid = cfg.vision.grid_size if cfg is not None else None
    if cfg is None:
        try:
            cfg = infer_clip_config(sd)
        except CheckpointError as err:
            if image_size is None:
                raise CheckpointError(f"{path}: {err}") from None
            cfg = infer_clip_config(sd, image_size=image_size)  # non-square grid: trust the caller's size
            old_grid = cfg.vision.grid_size
    if image_size is not None:
        cfg.vision.image_size = tuple(image_size)
    if stride is not None:
        cfg.vision.stride = stride
    cfg.vision.__post_init__()  # re-validate the edited size/stride
    model = CLIP(cfg)
    _load_openai(model, sd, str(path), strict=True, old_grid=old_grid)
    return model


# -- our own checkpoint directories ----------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Config values YAML can write safely: tuples become lists, Paths strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _safetensors_ready(state_dict: StateDict) -> StateDict:
    """Contiguous CPU tensors that share no storage (safetensors refuses shared or strided ones)."""
    out: StateDict = {}
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        t = tensor.detach().cpu()
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == storage.nbytes()
        if not whole or storage.data_ptr() in seen:
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _fill_directory(
    tmp: Path, config: dict[str, Any], state_dict: StateDict, extra_files: dict[str, bytes]
) -> None:
    write_durable(tmp / "config.yaml", yaml.safe_dump(_plain(config), sort_keys=False).encode())
    save_file(_safetensors_ready(state_dict), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    fsync_file(tmp / WEIGHTS_FILE)
    for name, data in extra_files.items():
        if Path(name).name != name or name in (*CONFIG_FILES, WEIGHTS_FILE):
            raise ValueError(f"extra file {name!r}: use a plain file name other than config/weights")
        write_durable(tmp / name, data)


def save_model_dir(
    directory: str | os.PathLike,
    config: dict[str, Any],
    state_dict: StateDict,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write `config.yaml` + `model.safetensors` (+ extra files) to `directory` atomically.

    Everything is written into a temporary sibling directory first; an existing checkpoint is
    moved aside only once the new one is complete, then the new one is renamed into place and the
    old one deleted. If the final rename fails, the old checkpoint is put back.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a checkpoint is an ordinary directory
    backup: Path | None = None
    try:
        _fill_directory(tmp, config, state_dict, extra_files or {})
        if directory.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, backup)  # an empty directory can be replaced by rename
        try:
            os.replace(tmp, directory)
        except BaseException:
            if backup is not None:
                os.replace(backup, directory)
                backup = None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return directory


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint config ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: checkpoint config must be a mapping, got {type(data).__name__}")
    return data


def load_model_dir(directory: str | os.PathLike, weights: bool = True) -> tuple[dict[str, Any], StateDict]:
    """Read a directory written by `save_model_dir` -> (config, state dict); weights=False skips weights."""
    directory = Path(directory)
    if not directory.is_dir():
        leftovers = (
            sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
        )
        hint = f"; an interrupted save left the previous checkpoint in {leftovers[-1]}" if leftovers else ""
        raise CheckpointError(f"{directory}: checkpoint directory not found{hint}")
    config_path = next((directory / n for n in CONFIG_FILES if (directory / n).is_file()), None)
    if config_path is None:
        raise CheckpointError(f"{directory}: not an xmr checkpoint (no {' or '.join(CONFIG_FILES)})")
    config = _read_config(config_path)
    if not weights:
        return config, {}
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: not an xmr checkpoint (no {WEIGHTS_FILE})")
    return config, _read_file(weights_path)
