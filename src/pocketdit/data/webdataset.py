"""``webdataset``: image-caption samples streamed from local WebDataset tar shards.

The WebDataset convention: files in a tar that share a key (the member name up to the first dot of its
base name) form one sample, e.g. ``000123.jpg`` + ``000123.txt``. The image is the ``jpg``/``jpeg``/
``png``/``webp`` member; the caption the ``txt`` member, or else the ``caption`` or ``text`` field of the
``json`` member. Shards are read with the standard library's ``tarfile`` (streaming, so shards of any size
work), given as a brace pattern (``"data/shard-{000000..000099}.tar"``) or a list of paths.

A sample with no image, no caption, or an image that cannot be decoded is reported with its shard and key:
``on_error="skip"`` logs and counts it in ``.skipped``, ``on_error="raise"`` raises ``BadSampleError``. A
shard that is missing or not a tar file is always an error.

With DataLoader workers, each worker reads a disjoint subset of shards (shard i goes to worker
i % num_workers), so use at least as many shards as workers.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from typing import Iterator, Sequence

import torch
from torch.utils.data import IterableDataset

from pocketdit.data.transforms import (
    BadSampleError,
    BadSampleLog,
    ReportsBadSamples,
    check_resolution,
    open_image,
    preprocess,
)

__all__ = ["WebDatasetShards", "expand_urls"]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("txt",)
JSON_CAPTION_FIELDS = ("caption", "text")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand a pattern (or each of a list of patterns) into shard paths."""
    if isinstance(urls, (str, os.PathLike)):
        urls = [os.fspath(urls)]
    from braceexpand import braceexpand  # a dependency of webdataset

    paths = [path for pattern in urls for path in braceexpand(os.fspath(pattern))]
    if not paths:
        raise ValueError("urls is empty; pass a brace pattern like 'shards/data-{000..009}.tar' or a list of tar paths")
    for path in paths:
        if "://" in path and not path.startswith("file://"):
            raise ValueError(f"{path}: only local shards are supported; download them first")
    return [path[len("file://"):] if path.startswith("file://") else path for path in paths]


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/000123.seg.jpg"`` -> (``"dir/000123"``, ``"seg.jpg"``), as webdataset groups members."""
    directory, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, suffix = base.split(".", 1)
    return os.path.join(directory, stem), suffix.lower()


def _iter_groups(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    if not os.path.isfile(shard):
        raise FileNotFoundError(f"shard {shard!r} does not exist")
    try:
        archive = tarfile.open(shard, mode="r|*")
    except tarfile.TarError as error:
        raise ValueError(f"shard {shard!r} is not a readable tar file ({error})") from None
    key, group = None, {}
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, suffix = _split_name(member.name)
                if os.path.basename(member_key).startswith("__"):  # e.g. __index__ files
                    continue
                if member_key != key:
                    if key is not None:
                        yield key, group
                    key, group = member_key, {}
                group[suffix] = archive.extractfile(member).read()
        except tarfile.TarError as error:
            raise ValueError(f"shard {shard!r} is corrupt after key {key!r} ({error})") from None
    if key is not None:
        yield key, group


def _caption(group: dict[str, bytes]) -> str | None:
    for suffix in CAPTION_KEYS:
        if suffix in group:
            return group[suffix].decode("utf-8", errors="replace").strip() or None
    if "json" in group:
        try:
            record = json.loads(group["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(record, dict):
            for field in JSON_CAPTION_FIELDS:
                if isinstance(record.get(field), str) and record[field].strip():
                    return record[field].strip()
    return None


class WebDatasetShards(IterableDataset, ReportsBadSamples):
    """Iterable dataset over local WebDataset tar shards.

    Yields ``{"image": float (3, R, R) in [-1, 1], "caption": str, "meta": {"shard", "key"}}`` in shard
    order (shuffle with a buffer, or pass shards in a shuffled order, if you need it).

    Args:
        urls: brace pattern or list of local tar paths.
        resolution: output side in pixels.
        on_error: "skip" or "raise" for bad samples (see the module docstring).
        center_crop: crop to a square after resizing the shorter side; False = resize to a square.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        resolution: int = 64,
        on_error: str = "skip",
        center_crop: bool = True,
    ) -> None:
        check_resolution(resolution)
        self.shards = expand_urls(urls)
        missing = [path for path in self.shards if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.shards)} shards not found, e.g. {missing[0]!r}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.bad = BadSampleLog(on_error, logger)

    def _worker_shards(self) -> list[str]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.shards
        return self.shards[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[dict]:
        for shard in self._worker_shards():
            for key, group in _iter_groups(shard):
                where = f"{shard}:{key}"
                image_suffix = next((s for s in IMAGE_KEYS if s in group), None)
                if image_suffix is None:
                    self.bad.report(where, f"no image member (expected one of {IMAGE_KEYS}; found {sorted(group)})")
                    continue
                caption = _caption(group)
                if caption is None:
                    self.bad.report(where, f"missing caption (no non-empty .txt, or json with {JSON_CAPTION_FIELDS})")
                    continue
                try:
                    image = open_image(group[image_suffix], f"{where}.{image_suffix}")
                except BadSampleError as error:
                    self.bad.report(error.path, error.reason)
                    continue
                yield {
                    "image": preprocess(image, self.resolution, self.center_crop),
                    "caption": caption,
                    "meta": {"shard": shard, "key": key},
                }

    def __repr__(self) -> str:
        return f"WebDatasetShards(shards={len(self.shards)}, resolution={self.resolution}, skipped={self.skipped})"
