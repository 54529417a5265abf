"""Shared image preprocessing: PIL image -> float tensor (3, R, R) in [-1, 1].

Every file-backed dataset (folder, webdataset, hf) goes through `resize_and_crop` then `to_tensor`, so the
same picture gives the same tensor whichever format it came from.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BadSampleError",
    "BadSampleLog",
    "check_resolution",
    "load_rgb",
    "open_image",
    "preprocess",
    "resize_and_crop",
    "to_tensor",
]

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


# ---------------------------------------------------------------------------------------------------------
# Bad samples (broken image, missing caption): reported with the path, then skipped or fatal.

ON_ERROR = ("skip", "raise")


class BadSampleError(ValueError):
    """A sample that cannot be used; the message names its path and what is wrong."""

    def __init__(self, path: str, reason: str, hint: str = "") -> None:
        super().__init__(f"{path}: {reason}{hint}")
        self.path = path
        self.reason = reason


class BadSampleLog:
    """What the `on_error` flag does with a bad sample.

    "raise" raises `BadSampleError(f"{path}: {reason}")`. "skip" logs a warning with the path and reason
    (once per path) and counts it: `.skipped` is the number of distinct bad samples seen in this process,
    `.skipped_items` the (path, reason) pairs. (DataLoader workers keep their own counts; their warnings
    still reach the log.)
    """

    def __init__(self, on_error: str, logger) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        self.on_error = on_error
        self.logger = logger
        self.skipped_items: list[tuple[str, str]] = []
        self._seen: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.skipped_items)

    def seen(self, path: str) -> bool:
        """Whether `path` was already reported (and skipped)."""
        return path in self._seen

    def report(self, path: str, reason: str) -> None:
        if self.on_error == "raise":
            raise BadSampleError(path, reason, " (pass on_error='skip' to skip such samples)")
        if path not in self._seen:
            self._seen.add(path)
            self.skipped_items.append((path, reason))
            self.logger.warning("skipping %s: %s", path, reason)


class ReportsBadSamples:
    """Mixin for datasets holding a `BadSampleLog` as `self.bad`: exposes its counts."""

    bad: BadSampleLog

    @property
    def skipped(self) -> int:
        return self.bad.skipped

    @property
    def skipped_items(self) -> list[tuple[str, str]]:
        return self.bad.skipped_items


def open_image(source, path: str) -> Image.Image:
    """Open and fully decode an image from a path, file object or bytes; a broken or truncated file raises
    BadSampleError naming `path`."""
    import io

    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            image.load()  # decode now so truncated files fail here, not later in a worker
            return image.copy()
    except FileNotFoundError:
        raise BadSampleError(path, "image file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadSampleError(path, f"broken image ({type(error).__name__}: {error})") from None
