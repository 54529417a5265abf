"""EMA: an exponential moving average of the trained parameters, kept in fp32 beside the model.

    ema = EMA(model, decay=0.999)
    ...; optimizer.step(); ema.update(model)
    model_with_ema_weights.load_state_dict(ema.full_state(model))

Under FSDP2 the shadow copies are sharded like the parameters they follow (DTensors); `full_state` gathers them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import CheckpointError
from .distributed import full_tensor

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of the trained parameters (sharded the same way under FSDP2).

    The decay warms up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the init.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        params = dict(model.named_parameters())
        for n, s in zip(self.names, self.shadow):
            s.lerp_(params[n].detach().float(), 1.0 - d)

    def full_state(self, model: nn.Module) -> dict:
        """Model state dict with the EMA values in place of trained parameters (collective under FSDP2)."""
        ema = {n: full_tensor(s) for n, s in zip(self.names, self.shadow)}
        out = {}
        for n, t in model.state_dict().items():
            out[n] = ema[n] if n in ema else full_tensor(t)
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict):
        for n, s in zip(self.names, self.shadow):
            if n not in state:
                raise CheckpointError(f"EMA weights have no entry for parameter {n!r}")
            full = state[n].to(torch.float32)
            if hasattr(s, "device_mesh"):  # DTensor under FSDP2: take this rank's shard
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(s.device_mesh.device_type), s.device_mesh, s.placements)
                s.to_local().copy_(full.to_local())
            else:
                if full.shape != s.shape:
                    raise CheckpointError(f"EMA weight {n!r} has shape {tuple(full.shape)}, model has {tuple(s.shape)}")
                s.copy_(full)
