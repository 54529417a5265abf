"""Shared image preprocessing: PIL image -> float tensor (3, R, R) in [-1, 1].

Every file-backed dataset (folder, webdataset, hf) goes through `resize_and_crop` then `to_tensor`, so the
same picture gives the same tensor whichever format it came from.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = ["check_resolution", "load_rgb", "preprocess", "resize_and_crop", "to_tensor"]

MIN_RESOLUTION = 8


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution!r} must be an int >= {MIN_RESOLUTION}")
    return resolution


def load_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white (not black, which is what a
    bare `.convert("RGB")` does to RGBA and makes icons look like silhouettes)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Resize so the shorter side is `resolution` (bicubic, with Pillow's antialiasing when shrinking), then
    crop the central `resolution` square. With `center_crop=False` the whole image is squashed to a square
    instead (no content lost, aspect ratio changed)."""
    check_resolution(resolution)
    image = load_rgb(image)
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image has empty size {image.size}")
    if not center_crop:
        return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(load_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """`resize_and_crop` then `to_tensor`: the one call the datasets use."""
    return to_tensor(resize_and_crop(image, resolution, center_crop))
