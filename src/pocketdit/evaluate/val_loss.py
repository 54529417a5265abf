"""Validation loss: the flow-matching loss of a model on held-out data, with every random draw fixed.

The same scenes (a dataset seed that training does not use), noise and timesteps for every model, so two models'
losses differ only by the models; timesteps are stratified over (0, 1) (midpoints of `num_t` equal bins) rather
than drawn from the training distribution, so the number weighs every noise level alike. Reported with a 95%
interval over the per-image losses (each image's loss averaged over its timesteps).

    from pocketdit.evaluate.val_loss import validation_loss
    validation_loss(pipe, ShapesDataset(resolution=32, length=512, seed=12345, phrasing="heldout"))
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import flow

__all__ = ["ci95_half_width", "validation_loss"]


def ci95_half_width(values: torch.Tensor) -> float:
    """Half the width of the normal 95% interval of the mean of `values` (per-image losses, or their paired
    differences between two models)."""
    return 1.96 * float(values.std()) / math.sqrt(len(values))


@torch.no_grad()
def validation_loss(pipe, dataset, num_images: int = 512, num_t: int = 8, batch_size: int = 64, seed: int = 0,
                    width: Optional[float] = None) -> dict:
    """{"loss", "ci95", "per_t": [...], "num_images", "num_t", "per_image": [...]} for a PocketDiTPipeline (EMA
    weights, eval mode). "per_image" is in scene order, so two models' lists can be compared pairwise.

    `width` runs a supernet at that width (its private tables); None = as it is."""
    model = pipe.transformer.eval()
    ctx = model.at_width(width) if width is not None else _nullcontext()
    n = min(int(num_images), len(dataset))
    ts = (torch.arange(num_t, dtype=torch.float32) + 0.5) / num_t
    per_image = []
    per_t = torch.zeros(num_t, dtype=torch.float64)
    with ctx:
        for start in range(0, n, batch_size):
            items = [dataset[i] for i in range(start, min(n, start + batch_size))]
            images = torch.stack([it["image"] for it in items]).float()
            x0 = pipe.autoencoder.encode(images).float()
            states, masks = pipe._encode([it["caption"] for it in items], device="cpu")
            if len(states) == 1:
                states, masks = states[0], masks[0]
            losses = torch.zeros(len(items), num_t, dtype=torch.float64)
            # Image i's noise depends on (seed, i) only, so the batch size does not change the number.
            noises = torch.stack([
                torch.randn((num_t, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                for i in range(start, start + len(items))
            ])
            for j, tv in enumerate(ts.tolist()):
                noise = noises[:, j]
                t = torch.full((len(items),), tv)
                v = model(flow.add_noise(x0, noise, t), t, states, masks).sample.float()
                losses[:, j] = (v - flow.velocity_target(x0, noise)).square().flatten(1).mean(1).double()
            per_image.append(losses.mean(1))
            per_t += losses.sum(0)
    per_image = torch.cat(per_image)
    mean = float(per_image.mean())
    return {"loss": mean, "ci95": ci95_half_width(per_image), "per_t": (per_t / n).tolist(), "t": ts.tolist(), "num_images": n, "num_t": num_t,
            "per_image": per_image.tolist()}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
