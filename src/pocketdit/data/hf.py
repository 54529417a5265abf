"""``hf``: local Hugging Face ``datasets`` directories.

Two kinds of directory are read, without the Hub:

* what ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` writes (has ``state.json`` or
  ``dataset_dict.json``), loaded with ``datasets.load_from_disk``;
* any other directory is read as an ``imagefolder`` (images plus a ``metadata.jsonl`` with ``file_name`` and
  ``text``; put it inside the split folder, e.g. ``train/metadata.jsonl``).

The image column may hold PIL images (the ``Image`` feature), ``{"bytes", "path"}`` dicts or file paths.
A row whose image cannot be decoded or whose caption is missing or empty is reported with its row index:
skipped and counted in ``.skipped`` (``on_error="skip"``) or raised as ``BadSampleError``
(``on_error="raise"``).
"""

from __future__ import annotations

import logging
import os

from PIL import Image
from torch.utils.data import Dataset

from pocketdit.data.transforms import (
    BadSampleError,
    BadSampleLog,
    ReportsBadSamples,
    check_resolution,
    open_image,
    preprocess,
)

__all__ = ["HFImageDataset"]

logger = logging.getLogger(__name__)


def _load(path: str, split: str):
    import datasets

    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)
    else:
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=path)
        except Exception as error:  # datasets raises several types for an unreadable folder
            raise ValueError(
                f"{path!r} is neither a save_to_disk directory (no state.json or dataset_dict.json) nor a "
                f"readable imagefolder ({type(error).__name__}: {error})"
            ) from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split={split!r} not in {path!r}; available splits: {sorted(loaded)}")
        return loaded[split]
    return loaded


class HFImageDataset(Dataset, ReportsBadSamples):
    """Map-style dataset over a local Hugging Face dataset directory.

    Yields ``{"image": float (3, R, R) in [-1, 1], "caption": str, "meta": {"row": int}}``.

    Args:
        path: a ``save_to_disk`` directory or an imagefolder directory.
        resolution: output side in pixels (shorter side resized, then centre crop).
        image_column, caption_column: column names; a wrong name is an error listing the columns.
        split: which split of a DatasetDict / imagefolder.
        on_error: "skip" or "raise" for rows with a broken image or no caption; a skipped row is replaced
            by the next good one so every index returns a sample.
        center_crop: False = resize to a square instead of cropping.
    """

    def __init__(
        self,
        path: str,
        resolution: int = 64,
        image_column: str = "image",
        caption_column: str = "text",
        split: str = "train",
        on_error: str = "skip",
        center_crop: bool = True,
    ) -> None:
        check_resolution(resolution)
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"dataset directory {path!r} does not exist; pass path= a datasets.save_to_disk directory or an "
                "imagefolder directory (Hub names are not downloaded)"
            )
        self.path = path
        self.resolution = resolution
        self.center_crop = center_crop
        self.image_column = image_column
        self.caption_column = caption_column
        self.bad = BadSampleLog(on_error, logger)
        self.dataset = _load(path, split)
        columns = list(self.dataset.column_names)
        for role, column in (("image_column", image_column), ("caption_column", caption_column)):
            if column not in columns:
                raise ValueError(f"{role}={column!r} is not a column of {path!r} (split {split!r}); columns: {columns}")
        if len(self.dataset) == 0:
            raise ValueError(f"{path!r} split {split!r} has no rows")

    def __len__(self) -> int:
        return len(self.dataset)

    def _row(self, row: int) -> dict | None:
        where = f"{self.path}[row {row}]"
        try:
            record = self.dataset[row]
        except Exception as error:  # the Image feature decodes on access; a broken file fails here
            self.bad.report(where, f"broken image ({type(error).__name__}: {error})")
            return None
        caption = record[self.caption_column]
        if not isinstance(caption, str) or not caption.strip():
            self.bad.report(where, f"missing caption (column {self.caption_column!r} is {caption!r})")
            return None
        value = record[self.image_column]
        try:
            if isinstance(value, Image.Image):
                image = value
            elif isinstance(value, dict) and value.get("bytes") is not None:
                image = open_image(value["bytes"], value.get("path") or where)
            elif isinstance(value, dict) and value.get("path"):
                image = open_image(value["path"], value["path"])
            elif isinstance(value, str):
                image = open_image(os.path.join(self.path, value) if not os.path.isabs(value) else value, value)
            else:
                self.bad.report(where, f"column {self.image_column!r} holds {type(value).__name__}, not an image")
                return None
        except BadSampleError as error:
            self.bad.report(f"{where} {error.path}", error.reason)
            return None
        return {
            "image": preprocess(image, self.resolution, self.center_crop),
            "caption": caption.strip(),
            "meta": {"row": row},
        }

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self.dataset)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for HFImageDataset of length {n}")
        for offset in range(n):
            sample = self._row((index + offset) % n)
            if sample is not None:
                return sample
        raise RuntimeError(f"no row of {self.path!r} could be used; see the warnings above")

    def __repr__(self) -> str:
        return f"HFImageDataset(path={self.path!r}, rows={len(self.dataset)}, resolution={self.resolution}, skipped={self.skipped})"
