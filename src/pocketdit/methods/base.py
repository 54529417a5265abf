"""The contract of a training method and the registry of method names (see the package docstring)."""

from __future__ import annotations

from typing import Callable, Dict, Type

import torch
import torch.nn as nn

__all__ = ["TrainingMethod", "METHODS", "register_method"]


class TrainingMethod:
    """Base class. Subclasses set `self.model` (the module whose parameters are trained) and implement `step`.

    The trainer sets `global_step` (optimizer steps done so far, the same on every rank) before each `step`.
    By default the trainer back-propagates the returned "loss"; a method with `backward_in_step = True` runs
    its own backward passes inside `step` (one per sub-network, say) and returns the loss for logging only.
    A method with state that must survive a resume (running means, say) defines `state_dict()` returning
    JSON-serialisable data and `load_state_dict(state)`; the trainer stores it in trainer_state.json.
    """

    model: nn.Module
    generator: torch.Generator
    global_step: int = 0
    backward_in_step: bool = False

    def step(self, batch: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def extra_modules(self) -> Dict[str, nn.Module]:
        """Trainable modules of the method's own, outside the model (KD projectors, a critic). The trainer
        optimises them with their own AdamW (same lr schedule), averages their gradients across ranks, and saves
        them in each checkpoint (method_modules.safetensors) for an exact resume."""
        return {}

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
