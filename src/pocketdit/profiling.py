"""Parameter and FLOP accounting for PocketDiT (and any denoiser with the same call signature).

FLOPs are counted by running the model under `torch.utils.flop_counter.FlopCounterMode`, usually on the
meta device (no memory, no time), so tables come from the code rather than from hand arithmetic.
Batched matmuls (`bmm`) are attention scores and weighted sums; `mm`/`addmm`/convolutions are the linear
layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product", "flex_attention")


@dataclass
class FlopCount:
    linear: int
    attention: int

    @property
    def total(self) -> int:
        return self.linear + self.attention


def classify_flops(counts: dict) -> FlopCount:
    linear = attention = 0
    for op, n in counts.items():
        if any(tag in str(op) for tag in ATTENTION_OPS):
            attention += n
        else:
            linear += n
    return FlopCount(linear=linear, attention=attention)


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """FLOPs of one call `fn(*args, **kwargs)`, split into linear layers and attention."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return classify_flops(counter.get_flop_counts().get("Global", {}))


def pocketdit_step_flops(model, latent_height: int, latent_width: int, text_lengths=None, batch: int = 1) -> FlopCount:
    """FLOPs of one PocketDiT denoising step (one forward) at a latent size, inputs on the model's device."""
    cfg = model.config
    device = next(model.parameters()).device
    text_lengths = text_lengths or [77] * len(cfg.text_embed_dims)
    x = torch.zeros(batch, cfg.in_channels, latent_height, latent_width, device=device)
    t = torch.zeros(batch, device=device)
    text = [torch.zeros(batch, n, d, device=device) for n, d in zip(text_lengths, cfg.text_embed_dims)]
    return count_flops(model, x, t, text)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
