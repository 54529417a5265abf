"""Training configuration: dataclasses, YAML files and `--section.key value` overrides.

A config is a `TrainConfig` made of sections (model, data, text, schedule, method, optim, train). It is read from a
YAML file whose top-level keys are section names, then command-line overrides are applied:

    pocketdit train configs/shapes_nano.yaml --optim.lr 3e-4 --model.hidden_size 128 --train.steps 2000

Every key is checked: an unknown key or a value of the wrong type is a `ConfigError` naming the full key
(e.g. "optim.lr"). Three sections take open-ended keys, checked against what consumes them:
  - model: any PocketDiT config field (hidden_size, depth_down, ...) on top of the chosen preset;
  - data: keyword arguments of the dataset (e.g. length, seed, root), checked when it is built;
  - method: keyword arguments of the training method (e.g. text_cache_size), checked against its signature.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = [
    "ConfigError",
    "ModelSection",
    "DataSection",
    "TextSection",
    "ScheduleSection",
    "MethodSection",
    "OptimSection",
    "TrainSection",
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "config_to_dict",
]


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or invalid value. The message names the key."""


@dataclass
class ModelSection:
    preset: str = "nano"
    # Start from these weights (a directory in diffusers layout) instead of a fresh preset.
    pretrained: Optional[str] = None
    # PocketDiT config fields on top of the preset (e.g. hidden_size: 128).
    overrides: dict = field(default_factory=dict)


@dataclass
class DataSection:
    name: str = "shapes"
    resolution: int = 32
    batch_size: int = 32  # per process; the global batch is batch_size * world size
    num_workers: int = 0
    # Extra keyword arguments for pocketdit.data.build_dataset (e.g. length, seed, root).
    options: dict = field(default_factory=dict)


@dataclass
class TextSection:
    # "minilm" (shipped MiniLM-L6, 384-d) or a local transformers encoder directory; several = concatenated.
    encoders: list = field(default_factory=lambda: ["minilm"])
    max_length: int = 32
    # Caption dropout probability per encoder (one value for all, or one per encoder): trains the CFG branch.
    dropout: Union[float, list] = 0.1


@dataclass
class ScheduleSection:
    # The noise schedule, in one place: training draws t = shift(logit-normal) and sampling walks
    # shift(linspace(1, 0)), both with this shift (SD3 eq. 23; > 1 spends more time at high noise, where
    # layout, count and position are decided). Saved with every checkpoint and pipeline.
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class MethodSection:
    name: str = "pretrain"
    # Keyword arguments of the method class (e.g. text_cache_size for pretrain); the schedule is its own section.
    options: dict = field(default_factory=dict)


@dataclass
class OptimSection:
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant", "cosine" or "wsd" (after warm-up)
    min_lr_ratio: float = 0.1  # cosine / wsd floor, as a fraction of lr
    # wsd (warm-up, stable, decay): constant, then linear decay to the floor over the last `decay_steps` of
    # train.steps; a constant run resumed with schedule wsd cools down without a jump in lr
    decay_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class TrainSection:
    steps: int = 1000
    seed: int = 0
    output_dir: str = "runs/default"
    # "auto": continue from output_dir's latest checkpoint if there is one; a path: that checkpoint; "" : fresh.
    resume: str = ""
    # a fresh run refuses an output_dir that holds a run; overwrite deletes that run's files first
    overwrite: bool = False
    # resuming with other values than the run's config.json is an error naming them, except for the keys in
    # pocketdit.checkpoint.RESUME_SAFE_KEYS; allow_config_change accepts them (and logs them in the run)
    allow_config_change: bool = False
    ema_decay: float = 0.999
    log_every: int = 10
    sample_every: int = 500  # 0 disables sample grids
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # "auto" = bf16 autocast on CUDA, fp32 elsewhere; "no"; "bf16".
    mixed_precision: str = "auto"
    # "auto" = on when training on CUDA; true/false force it.
    gradient_checkpointing: Union[bool, str] = "auto"
    compile: bool = False
    # BNA/ASSA implementation (PocketDiT.set_attention_backend): "auto" = FlexAttention on CUDA; "strided" is
    # faster there for small token counts (no compile per shape)
    attention_backend: str = "auto"
    # "auto" = DDP when launched with torchrun and more than one process; "none", "ddp", "fsdp".
    distributed: str = "auto"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # CPU threads for torch (0 = torch's default). On a shared CPU, 1 avoids OpenMP oversubscription.
    num_threads: int = 0
    sample_prompts: list = field(
        default_factory=lambda: [
            "a red circle",
            "a blue square",
            "a green triangle",
            "a yellow circle and a purple square",
        ]
    )
    sample_steps: int = 20
    sample_guidance: float = 3.0
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    text: TextSection = field(default_factory=TextSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    # "pixel" or a local autoencoder directory (see pocketdit.autoencoder.load_autoencoder).
    autoencoder: str = "pixel"
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def validate(self) -> "TrainConfig":
        _validate_values(self)
        return self


# Sections whose unknown keys are collected into an open dict field instead of being errors.
_OPEN_FIELD = {"model": "overrides", "data": "options", "method": "options"}

_CHOICES = {
    "optim.schedule": ("constant", "cosine", "wsd"),
    "train.mixed_precision": ("auto", "no", "bf16"),
    "train.distributed": ("auto", "none", "ddp", "fsdp"),
}


# ----------------------------------------------------------------------------------------------------
# Type checking and coercion
# ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting means anything at nan or inf
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if value is False and "no" in _CHOICES.get(key, ()):  # YAML reads a bare `no` as false
            return "no"
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp}")


# Keys that used to live elsewhere: naming the new place beats a generic "unknown key".
_MOVED = {
    "method.shift": "schedule.shift",
    "method.logit_mean": "schedule.logit_mean",
    "method.logit_std": "schedule.logit_std",
    "train.sample_shift": "schedule.shift",
}


def _section_from_dict(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    for key in data:
        moved = _MOVED.get(f"{prefix}.{key}")
        if moved is not None:
            raise ConfigError(
                f"config key {prefix}.{key!s} has moved to {moved}: the noise schedule is one section, used by "
                "training and sampling alike"
            )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    open_field = _OPEN_FIELD.get(prefix)
    kwargs: dict = {}
    extra: dict = {}
    for key, value in data.items():
        full = f"{prefix}.{key}"
        if key in names and key != open_field:
            kwargs[key] = _coerce(value, hints[key], full)
        elif key == open_field:
            extra.update(_coerce(value, dict, full))
        elif open_field is not None:
            extra[key] = value
        else:
            raise ConfigError(f"unknown config key {full!r}; valid keys in {prefix!r}: {sorted(names)}")
    if open_field is not None:
        kwargs[open_field] = extra
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config section {key!r}; valid sections: {sorted(hints)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _section_from_dict(tp, value, key)
        else:
            kwargs[key] = _coerce(value, tp, key)
    return TrainConfig(**kwargs).validate()


def config_to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (YAML/JSON-serialisable) with open fields flattened back into their sections."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            section = dataclasses.asdict(value)
            open_field = _OPEN_FIELD.get(f.name)
            if open_field is not None:
                section.update(section.pop(open_field))
            out[f.name] = section
        else:
            out[f.name] = value
    return out


def _validate_values(cfg: TrainConfig) -> None:
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {list(choices)}, got {value!r}")
    positive = {
        "data.resolution": cfg.data.resolution,
        "data.batch_size": cfg.data.batch_size,
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.sample_steps": cfg.train.sample_steps,
        "text.max_length": cfg.text.max_length,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    non_negative = {
        "data.num_workers": cfg.data.num_workers,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "train.sample_every": cfg.train.sample_every,
        "train.num_threads": cfg.train.num_threads,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: must be two numbers in [0, 1), got {cfg.optim.betas!r}")
    if not cfg.schedule.shift > 0:
        raise ConfigError(f"schedule.shift: must be > 0, got {cfg.schedule.shift}")
    if not cfg.schedule.logit_std > 0:
        raise ConfigError(f"schedule.logit_std: must be > 0, got {cfg.schedule.logit_std}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.optim.schedule == "wsd" and not 0 < cfg.optim.decay_steps <= cfg.train.steps:
        raise ConfigError(f"optim.decay_steps: schedule wsd needs 0 < decay_steps <= train.steps "
                          f"({cfg.train.steps}), got {cfg.optim.decay_steps}")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    if not cfg.text.encoders:
        raise ConfigError("text.encoders: need at least one text encoder")
    drops = cfg.text.dropout if isinstance(cfg.text.dropout, list) else [cfg.text.dropout]
    if isinstance(cfg.text.dropout, list) and len(drops) != len(cfg.text.encoders):
        raise ConfigError(
            f"text.dropout: got {len(drops)} values for {len(cfg.text.encoders)} encoder(s); give one per encoder"
        )
    for p in drops:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise ConfigError(f"text.dropout: probabilities must be in [0, 1], got {cfg.text.dropout!r}")
    from .attention.backends import backend_choices

    if cfg.train.attention_backend not in backend_choices():
        raise ConfigError(
            f"train.attention_backend: must be one of {backend_choices()}, got {cfg.train.attention_backend!r}"
        )
    if not isinstance(cfg.train.gradient_checkpointing, bool) and cfg.train.gradient_checkpointing != "auto":
        raise ConfigError(
            f"train.gradient_checkpointing: must be true, false or 'auto', got {cfg.train.gradient_checkpointing!r}"
        )
    if cfg.model.overrides:
        from .model import PocketDiT

        valid = set(PocketDiT._init_signature())
        bad = sorted(set(cfg.model.overrides) - valid)
        if bad:
            raise ConfigError(
                f"unknown config key(s) {['model.' + k for k in bad]}; model keys are 'preset', 'pretrained' or a "
                f"PocketDiT field: {sorted(valid)}"
            )


# ----------------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    import yaml

    if text.strip() == "":
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(argv: Sequence[str]) -> dict:
    """["--optim.lr", "1e-4", "--train.steps=10"] -> {"optim": {"lr": 1e-4}, "train": {"steps": 10}}.

    Values are parsed as YAML (so lists like "[a, b]" and null work); keys need a section
    ("--lr" alone is an error naming it), except the top-level "autoencoder" and "--method NAME", short for
    "--method.name NAME".
    """
    out: dict = {}
    items = list(argv)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--") or len(token) <= 2:
            raise ConfigError(f"expected an override like --section.key value, got {token!r}")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ConfigError(f"override --{key} has no value")
            raw = items[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key == "method":  # `--method kd` is short for `--method.name kd`
            key = "method.name"
        parts = key.split(".")
        hints = typing.get_type_hints(TrainConfig)
        if parts[0] not in hints:
            raise ConfigError(f"unknown config key {key!r}; keys look like section.name with section in {sorted(hints)}")
        if dataclasses.is_dataclass(hints[parts[0]]) and len(parts) != 2:
            raise ConfigError(f"override key {key!r} must be section.name (e.g. {parts[0]}.<name>)")
        if not dataclasses.is_dataclass(hints[parts[0]]) and len(parts) != 1:
            raise ConfigError(f"unknown config key {key!r}: {parts[0]!r} has no sub-keys")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_value(raw)
    return out


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def apply_overrides(cfg: Union[TrainConfig, dict], overrides: Union[Sequence[str], dict]) -> TrainConfig:
    base = config_to_dict(cfg) if isinstance(cfg, TrainConfig) else dict(cfg)
    update = parse_overrides(overrides) if not isinstance(overrides, dict) else overrides
    return config_from_dict(_merge(base, update))


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when path is None) and apply overrides."""
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            shipped = sorted(str(c) for c in Path("configs").glob("*.yaml"))
            hint = f"e.g. {', '.join(shipped[:3])}" if shipped else "see docs/training.md for the keys"
            what = "is a directory, not a config file" if p.is_dir() else "config file not found"
            raise FileNotFoundError(f"{p}: {what} (pass a YAML file: {hint})")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    base = config_to_dict(config_from_dict(data))
    return apply_overrides(base, list(overrides))
