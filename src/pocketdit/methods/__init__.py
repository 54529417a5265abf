"""Training methods: each turns a batch into a dict of losses; the trainer owns everything else.

A method is a class registered under a name:

    @register_method("pretrain")
    class FlowMatchingPretrain(TrainingMethod):
        def __init__(self, model, text_conditioner, autoencoder, **options): ...
        def step(self, batch) -> dict[str, torch.Tensor]:   # must contain "loss"

The trainer builds it with `build_method(name, model=..., text_conditioner=..., autoencoder=..., **options)`,
may replace `method.model` with a DDP/FSDP-wrapped module, and sets `method.generator` (a torch.Generator
whose state is checkpointed) before the first step. Methods draw all their randomness (noise, timesteps,
caption dropout) from that generator so that a resumed run repeats the uninterrupted one exactly.

A method may define `save_samples(model, path)`: the trainer then calls it with the EMA model every
`train.sample_every` steps instead of sampling text-to-image grids (autoencoder training writes reconstructions).
"""

from __future__ import annotations

import inspect
from typing import Type

# the contract and the registry live in base.py, so method modules import them without importing this package
from .base import METHODS, TrainingMethod, register_method

__all__ = ["TrainingMethod", "METHODS", "register_method", "get_method", "build_method", "method_options"]


def _load_builtin():
    from . import autoencoder, pretrain  # noqa: F401  (register "autoencoder", "pretrain")

    for optional in ("elastic", "kd", "kdmd"):  # later methods register themselves when their module exists
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{optional}":
                raise


def get_method(name: str) -> Type[TrainingMethod]:
    _load_builtin()
    if name not in METHODS:
        raise ValueError(f"unknown training method {name!r}; available: {sorted(METHODS)} (config key method.name)")
    return METHODS[name]


def method_options(name: str) -> list[str]:
    """Keyword options a method accepts beyond the components the trainer passes."""
    cls = get_method(name)
    names = []
    for klass in cls.__mro__:  # a method whose __init__ forwards **options to its base accepts the base's too
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names += [k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return [k for k in names if k not in ("self", "model", "text_conditioner", "autoencoder")]


def build_method(name: str, **kwargs) -> TrainingMethod:
    cls = get_method(name)
    bad = sorted(set(kwargs) - set(method_options(name)) - {"model", "text_conditioner", "autoencoder"})
    if bad:
        raise ValueError(
            f"unknown option(s) {['method.' + k for k in bad]} for training method {name!r}; "
            f"valid options: {['method.' + k for k in method_options(name)]}"
        )
    return cls(**kwargs)
