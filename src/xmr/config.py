"""Experiment configuration: dataclasses, YAML loading with inheritance, `key=value` overrides.

A config file is YAML whose top-level sections mirror `ExperimentConfig`: what every method shares
(`model` backbone, `data`, `optim`, `train`, `eval`) plus a `method:` section, `name` and that method's
own fields, validated by the method's `Config` dataclass (found through `xmr.registry.METHODS`):

    method: {name: irra, losses: [sdm, id, mlm], temperature: 0.02}

A file may start with `base: other.yaml` (path relative to the file) to inherit and override another
recipe. Unknown keys and wrongly typed values raise `ConfigError` naming the file and the dotted key.
Configs of the earlier single-method shape (`method: irra` with `loss:` and IRRA fields under `model`
and `data`) are converted on read by `upgrade_legacy`, so old recipes and checkpoints still load.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xmr.errors import ConfigError
from xmr.precision import PRECISIONS


@dataclass
class ModelConfig:
    """The backbone every method builds on (CLIP towers); method heads are configured under `method:`."""

    clip: str = "ViT-B/16"  # a preset of xmr.models.clip.CLIP_CONFIGS
    pretrained: str | None = None  # OpenAI / open_clip / Hugging Face / IRRA checkpoint to start from
    image_size: tuple[int, int] = (384, 128)  # (H, W)
    stride: int | None = None  # patch stride; None = patch size (no overlap)
    clip_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"vision.layers": 4}
    grad_checkpointing: bool = False


@dataclass
class DataConfig:
    format: str = "cuhk_pedes"  # cuhk_pedes | icfg_pedes | rstpreid | cub | flowers102 | folder
    root: str = "data/CUHK-PEDES"
    # formats whose pictures and captions come from separate archives (cub, flowers102) may take the two
    # trees apart; None: both under `root`
    images_root: str | None = None
    captions_root: str | None = None
    tokenizer: str | None = None  # CLIP BPE .txt.gz, a Hugging Face tokenizer dir, or None to train one
    tokenizer_merges: int = 2000  # merges learnt on the training captions when tokenizer is None
    context_length: int = 77
    batch_size: int = 64
    num_workers: int = 2
    sampler: str = "random"  # random | identity
    num_instances: int = 4  # K of the identity (P x K) sampler
    augment: bool = True
    flip_p: float = 0.5
    pad: int = 10
    erase_p: float = 0.5
    val_fraction: float = 0.1  # held-out training identities when a dataset has no val split
    on_error: str = "raise"  # raise | skip
    check_images: str = "exists"  # exists | decode | none


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | adamw
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    weight_decay: float = 4e-5
    bias_lr_factor: float = 2.0
    bias_weight_decay: float = 0.0
    new_module_lr_factor: float = 5.0  # randomly initialised modules (fusion, classifier, MLM head)
    epochs: int = 60
    warmup_epochs: float = 5
    warmup_factor: float = 0.1
    min_lr: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    step_schedule_per_iteration: bool = False  # the reference recipe steps the schedule once per epoch
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/irra"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "bf16"  # fp32 | bf16 | fp16
    grad_accum: int = 1
    eval_every: int = 1  # epochs
    log_every: int = 20  # steps
    max_steps_per_epoch: int | None = None
    select_metric: str | None = None  # validation metric for `best/`; None = the task's primary (person: R1)
    progress: bool = True
    tensorboard: bool = True
    find_unused_parameters: bool = False


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 128
    num_workers: int = 2
    query_chunk: int = 1024
    i2t: bool = False
    precision: str = "bf16"


def method_config_class(name: str) -> type:
    """The `Config` dataclass of registered method `name` (imports that method's module)."""
    from xmr.registry import METHODS

    return METHODS.get(name).Config


def default_method_config() -> Any:
    return method_config_class("irra")()


@dataclass
class ExperimentConfig:
    method: Any = field(default_factory=default_method_config)  # the method's own Config dataclass
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> None:
        from xmr.registry import FORMATS

        choices = {
            "data.format": (self.data.format, set(FORMATS.names())),
            "data.sampler": (self.data.sampler, {"random", "identity"}),
            "data.on_error": (self.data.on_error, {"raise", "skip"}),
            "data.check_images": (self.data.check_images, {"exists", "decode", "none"}),
            "optim.optimizer": (self.optim.optimizer, {"adam", "adamw"}),
            "optim.schedule": (self.optim.schedule, {"cosine", "constant"}),
            "train.precision": (self.train.precision, set(PRECISIONS)),
            "eval.precision": (self.eval.precision, set(PRECISIONS)),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")
        self.method.validate()
        positive = {"data.batch_size": self.data.batch_size, "optim.epochs": self.optim.epochs,
                    "train.grad_accum": self.train.grad_accum, "data.context_length": self.data.context_length}
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key}={value} must be positive")
        if self.data.sampler == "identity" and self.data.batch_size % self.data.num_instances:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} must be a multiple of data.num_instances="
                f"{self.data.num_instances} for the identity sampler")


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check `value` against a dataclass field annotation; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: {key} has an invalid value {value!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if origin is list:
        (arg,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.replace("+", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, arg, key, source) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string
            return annotation(value)
        except ValueError:
            pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{source}: {key} must be {annotation.__name__}, got {value!r}")
    return value


def _merge_method(cfg: ExperimentConfig, value: Any, source: str) -> None:
    """Merge a `method:` section: `name` picks the method's Config class, the other keys are its fields."""
    if isinstance(value, str):  # `method: irra`
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: 'method' must be a mapping with 'name' and the method's fields, got {value!r}")
    fields = dict(value)
    name = fields.pop("name", cfg.method.name)
    if not isinstance(name, str):
        raise ConfigError(f"{source}: method.name must be a string, got {name!r}")
    if name != cfg.method.name:
        try:
            cfg.method = method_config_class(name)()
        except ConfigError as err:
            raise ConfigError(f"{source}: method.name: {err}") from None
    _merge_into(cfg.method, fields, "method.", source)


def _merge_into(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    if isinstance(obj, ExperimentConfig) and "method" in updates:
        updates = dict(updates)
        _merge_method(obj, updates.pop("method"), source)
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key '{dotted}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping of its fields, got {value!r}")
            _merge_into(current, value, dotted + ".", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
    if _method_name(data) not in (None, _method_name(parent)):
        # another method: its fields replace the base's method section (they are a different dataclass)
        parent = {k: v for k, v in parent.items() if k != "method"}
    return _deep_merge(parent, data)


def _method_name(data: dict[str, Any]) -> str | None:
    method = data.get("method")
    return method if isinstance(method, str) else method.get("name") if isinstance(method, dict) else None


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


# The earlier single-method shape: IRRA's fields sat in `loss`, `model` and `data` (xmr <= 0.1.0).
_LEGACY_MODEL_KEYS = {"cmt_depth": "cmt_depth", "temperature": "temperature"}
_LEGACY_LOSS_KEYS = {"names": "losses", "soft_label_weight": "soft_label_weight", "id_weight": "id_weight",
                     "mlm_weight": "mlm_weight", "sdm_weight": "sdm_weight", "itc_weight": "itc_weight",
                     "cmpm_weight": "cmpm_weight"}


def upgrade_legacy(data: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Convert a config dict of the single-method shape to the `method:` shape; (new dict, was it legacy).

    `method: irra` + `loss: {names, *_weight, soft_label_weight}` + `model: {cmt_depth, temperature}` +
    `data: {mlm_probability}` become `method: {name: irra, losses, *_weight, ..., mlm_probability}`.
    """
    model, data_section = dict(data.get("model") or {}), dict(data.get("data") or {})
    legacy = ("loss" in data or isinstance(data.get("method"), str)
              or any(k in model for k in _LEGACY_MODEL_KEYS) or "mlm_probability" in data_section)
    if not legacy:
        return data, False
    out = dict(data)
    method = out.pop("method", "irra")
    method = {"name": method} if isinstance(method, str) else dict(method or {})
    for old, new in _LEGACY_MODEL_KEYS.items():
        if old in model:
            method[new] = model.pop(old)
    for old, new in _LEGACY_LOSS_KEYS.items():
        if old in (out.get("loss") or {}):
            method[new] = out["loss"][old]
    out.pop("loss", None)
    if "mlm_probability" in data_section:
        method["mlm_probability"] = data_section.pop("mlm_probability")
    if "model" in out:
        out["model"] = model
    if "data" in out:
        out["data"] = data_section
    out["method"] = method
    return out, True


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """An ExperimentConfig from a plain dict (e.g. a checkpoint's `experiment` section); legacy shapes convert."""
    data, _ = upgrade_legacy(data)
    cfg = ExperimentConfig()
    _merge_into(cfg, data, "", source)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults <- YAML file (with its `base` chain) <- `key=value` overrides; validated."""
    data = _read_yaml(Path(path)) if path else {}
    data, legacy = upgrade_legacy(data)
    if legacy:
        import logging

        logging.getLogger(__name__).warning(
            "%s uses the earlier config shape (loss:, model.temperature, ...); read as method: %s. "
            "Move those fields under `method:`", path, data["method"])
    cfg = ExperimentConfig()
    _merge_into(cfg, data, "", str(path))
    for text in overrides:
        keys, value = parse_override(text)
        nested: dict[str, Any] = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            nested = {key: nested}
        _merge_into(cfg, nested, "", f"override '{text}'")
    cfg.validate()
    return cfg


def save_config(cfg: ExperimentConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    data = cfg.to_dict()
    if extra:
        data = {**data, **extra}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
