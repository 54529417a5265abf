"""Image-caption datasets for PocketDiT.

Every dataset yields dicts `{"image": float tensor (3, H, W) in [-1, 1], "caption": str, "meta": dict}`;
`collate` batches them. `build_dataset(name, **options)` builds one by name.
"""

from __future__ import annotations

import importlib

import torch

# name -> (module, class); imported lazily so optional dependencies are only needed when used.
DATASETS: dict[str, tuple[str, str]] = {
    "shapes": ("pocketdit.data.shapes", "ShapesDataset"),
    "emoji": ("pocketdit.data.emoji", "EmojiDataset"),
    "folder": ("pocketdit.data.folder", "ImageFolderDataset"),
    "webdataset": ("pocketdit.data.webdataset", "WebDatasetShards"),
    "hf": ("pocketdit.data.hf", "HFImageDataset"),
}


def build_dataset(name: str, **options):
    """Build the dataset registered as `name` with keyword `options` (e.g. resolution, length, seed)."""
    try:
        module, cls = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}") from None
    return getattr(importlib.import_module(module), cls)(**options)


def collate(samples: list[dict]) -> dict:
    """Stack images; keep captions and metadata as lists."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    out = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "meta": [s.get("meta", {}) for s in samples],
    }
    if all("negative_caption" in s for s in samples):
        out["negative_caption"] = [s["negative_caption"] for s in samples]
    if all("pair_image" in s for s in samples):
        out["pair_image"] = torch.stack([s["pair_image"] for s in samples])
        out["pair_caption"] = [s["pair_caption"] for s in samples]
    return out


__all__ = ["DATASETS", "build_dataset", "collate"]
