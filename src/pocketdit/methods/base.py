"""The contract of a training method and the registry of method names (see the package docstring)."""

from __future__ import annotations

from typing import Callable, Dict, Type

import torch
import torch.nn as nn

__all__ = ["TrainingMethod", "METHODS", "register_method"]


class TrainingMethod:
    """Base class. Subclasses set `self.model` (the module whose parameters are trained) and implement `step`."""

    model: nn.Module
    generator: torch.Generator

    def step(self, batch: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def to(self, device):
        """Move the frozen helpers (text encoders, autoencoder, teachers) to `device`; the trainer moves the model."""
        return self


METHODS: Dict[str, Type[TrainingMethod]] = {}


def register_method(name: str) -> Callable[[type], type]:
    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"training method {name!r} is already registered to {METHODS[name].__name__}")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return wrap
