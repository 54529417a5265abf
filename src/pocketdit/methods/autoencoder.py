"""Autoencoder training as a method of the shared Trainer (what `pocketdit train-ae` runs).

    recon, z = model(image)      (a TinyAutoencoder's raw reconstruction and raw latents)
    loss = L1 + edge_weight * edge L1 + latent_l2_weight * mean(z^2)      (pocketdit.autoencoder.autoencoder_loss)

Batches are {"image": (B, 3, R, R) in [-1, 1]}; `ImageCollate` builds them from any dataset's samples. In
place of the trainer's text-to-image grid, `save_samples` writes inputs over reconstructions of a fixed
preview batch. The latent normalisation is fitted after training (pocketdit.train_ae), not here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..autoencoder import autoencoder_loss
from .base import TrainingMethod, register_method

__all__ = ["AutoencoderReconstruction", "ImageCollate", "save_reconstruction_png"]


@register_method("autoencoder")
class AutoencoderReconstruction(TrainingMethod):
    """Reconstruction loss for a TinyAutoencoder (`model`); the text conditioner and autoencoder are unused.

    Args:
        edge_weight, latent_l2_weight: weights of the edge and latent-L2 terms of `autoencoder_loss`.
        preview: images (N, 3, R, R) in [-1, 1] that `save_samples` reconstructs (None: no previews).
    """

    def __init__(self, model, text_conditioner=None, autoencoder=None, edge_weight: float = 0.5,
                 latent_l2_weight: float = 1e-4, preview: Optional[torch.Tensor] = None):
        if not hasattr(model, "encode_raw"):
            raise TypeError(
                f"training method 'autoencoder' trains a TinyAutoencoder, got a {type(model).__name__}; "
                "use `pocketdit train-ae` (pocketdit.train_ae.train_autoencoder)"
            )
        self.model = model
        self.edge_weight = float(edge_weight)
        self.latent_l2_weight = float(latent_l2_weight)
        self.preview = preview

    def step(self, batch: dict) -> dict:
        images = batch["image"].to(next(self.model.parameters()).device, torch.float32)
        recon, z = self.model(images)
        return autoencoder_loss(recon.float(), images, z, self.edge_weight, self.latent_l2_weight)

    @torch.no_grad()
    def reconstruct(self, model) -> torch.Tensor:
        """`model`'s reconstruction of the preview batch, on the CPU."""
        return model.decode(model.encode(self.preview)).cpu()

    def save_samples(self, model, path: Path) -> Optional[Path]:
        """The trainer's sample hook: inputs over `model`'s (the EMA weights') reconstructions."""
        if self.preview is None:
            return None
        save_reconstruction_png(self.preview, self.reconstruct(model), path)
        return path


def _to_square(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """Center-crop to a square and resize to resolution x resolution (antialiased)."""
    _, h, w = image.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = image[:, top: top + s, left: left + s]
    if s != resolution:
        image = F.interpolate(image[None].float(), size=(resolution, resolution), mode="bilinear",
                              antialias=True, align_corners=False)[0]
    return image


class ImageCollate:
    """Samples ({"image": ...} dicts, (image, ...) tuples or bare (3, H, W) tensors) -> {"image": (B, 3, R, R)}."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, samples) -> dict:
        images = []
        for i, s in enumerate(samples):
            img = s["image"] if isinstance(s, dict) else (s[0] if isinstance(s, (tuple, list)) else s)
            if not torch.is_tensor(img) or img.dim() != 3 or img.shape[0] != 3:
                got = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
                raise ValueError(f"dataset sample {i} has image {got}; expected a (3, H, W) tensor in [-1, 1]")
            images.append(_to_square(img.float(), self.resolution))
        return {"image": torch.stack(images)}


def save_reconstruction_png(images: torch.Tensor, recon: torch.Tensor, path: Path):
    """Two rows: inputs on top, reconstructions below (written atomically)."""
    from PIL import Image

    grid = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)
