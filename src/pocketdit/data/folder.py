"""``folder``: a directory of images with captions, the layout most users already have.

Two caption layouts are read (the same ones as Hugging Face's ``imagefolder``):

* a caption file next to each image with the same stem: ``cat.png`` + ``cat.txt``;
* a ``metadata.jsonl`` with one JSON object per line, ``{"file_name": "cat.png", "text": "a cat"}``,
  where ``file_name`` is relative to the directory that holds the ``metadata.jsonl`` (there may be one per
  sub-directory). Images covered by a ``metadata.jsonl`` take their caption from it, not from a ``.txt``.

Images are found recursively. An image with no caption, an empty caption, a ``metadata.jsonl`` entry whose
file is missing, or an image that cannot be decoded is a bad sample: with ``on_error="skip"`` it is logged
(``logging.warning`` with its path and reason) and counted in ``.skipped``; with ``on_error="raise"`` it
raises ``BadSampleError`` naming the path and the problem. Caption problems are found when the dataset is
built; broken images when they are loaded (or up front with ``verify_images=True``).
"""

from __future__ import annotations

import json
import logging
import os

from torch.utils.data import Dataset

from pocketdit.data.transforms import (
    BadSampleError,
    BadSampleLog,
    ReportsBadSamples,
    check_resolution,
    open_image,
    preprocess,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def _read_metadata(path: str, caption_column: str, bad: BadSampleLog) -> dict[str, str | None]:
    """metadata.jsonl -> {absolute image path: caption or None}. A malformed line is always fatal: the
    file itself is broken, not one sample."""
    directory = os.path.dirname(path)
    entries: dict[str, str | None] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or "file_name" not in record:
                raise ValueError(f"{path}, line {line_number}: needs a 'file_name' key, got {line.strip()[:80]!r}")
            image_path = os.path.normpath(os.path.join(directory, record["file_name"]))
            caption = record.get(caption_column)
            entries[image_path] = caption if isinstance(caption, str) else None
            if caption_column not in record:
                bad.report(
                    image_path,
                    f"no {caption_column!r} caption in {path} line {line_number} (keys: {sorted(record)})",
                )
    return entries


class ImageFolderDataset(Dataset, ReportsBadSamples):
    """Map-style dataset over a folder of captioned images.

    Yields ``{"image": float (3, R, R) in [-1, 1], "caption": str, "meta": {"path": str}}``. Images are
    resized so the shorter side is ``resolution`` and centre-cropped (``center_crop=False`` squashes
    instead).

    Args:
        root: the folder.
        resolution: output side in pixels.
        on_error: "skip" (log and skip bad samples) or "raise" (stop at the first, naming its path).
        center_crop: crop to a square after resizing; False = resize to a square.
        caption_column: caption key in ``metadata.jsonl`` files.
        verify_images: decode every image when the dataset is built, so broken files are found (and
            counted in ``.skipped``) before training rather than as they come up.

    A broken image found at load time under "skip" is replaced by the next good item, so every index
    still returns a sample.
    """

    def __init__(
        self,
        root: str,
        resolution: int = 64,
        on_error: str = "skip",
        center_crop: bool = True,
        caption_column: str = "text",
        verify_images: bool = False,
    ) -> None:
        check_resolution(resolution)
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist; pass root= a directory of images")
        self.root = root
        self.resolution = resolution
        self.center_crop = center_crop
        self.bad = BadSampleLog(on_error, logger)
        self.items: list[tuple[str, str]] = self._scan(caption_column)
        if verify_images:
            self._verify()
        if not self.items:
            raise ValueError(
                f"no usable captioned images in {root!r} ({self.bad.skipped} skipped); expected image files "
                f"({', '.join(IMAGE_EXTENSIONS)}) with a same-stem .txt caption or a {METADATA_FILE}"
            )

    def _scan(self, caption_column: str) -> list[tuple[str, str]]:
        images: list[str] = []
        metadata: dict[str, str | None] = {}
        for directory, subdirs, files in os.walk(self.root):
            subdirs.sort()
            for name in sorted(files):
                path = os.path.normpath(os.path.join(directory, name))
                if name == METADATA_FILE:
                    metadata.update(_read_metadata(path, caption_column, self.bad))
                elif name.lower().endswith(IMAGE_EXTENSIONS):
                    images.append(path)
        items = []
        found = set(images)
        for path in images:
            if path in metadata:
                caption = metadata[path]
            else:
                caption_path = os.path.splitext(path)[0] + ".txt"
                if not os.path.isfile(caption_path):
                    self.bad.report(path, f"missing caption (no {os.path.basename(caption_path)} and no {METADATA_FILE} entry)")
                    continue
                with open(caption_path, encoding="utf-8") as handle:
                    caption = handle.read()
            caption = caption.strip() if caption else ""
            if not caption:
                if not self.bad.seen(path):  # a missing metadata key was reported already
                    self.bad.report(path, "empty caption")
                continue
            items.append((path, caption))
        for path in sorted(set(metadata) - found):
            if os.path.isfile(path):
                self.bad.report(path, f"listed in {METADATA_FILE} but not a supported image type {IMAGE_EXTENSIONS}")
            else:
                self.bad.report(path, f"listed in {METADATA_FILE} but the image file is missing")
        return items

    def _verify(self) -> None:
        from tqdm.auto import tqdm

        good = []
        for path, caption in tqdm(self.items, desc="verifying images", unit="img", disable=len(self.items) < 1000):
            try:
                open_image(path, path)
            except BadSampleError as error:
                self.bad.report(error.path, error.reason)
                continue
            good.append((path, caption))
        self.items = good

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self.items) <= index < len(self.items):
            raise IndexError(f"index {index} out of range for ImageFolderDataset of length {len(self.items)}")
        for offset in range(len(self.items)):
            path, caption = self.items[(index + offset) % len(self.items)]
            try:
                image = open_image(path, path)
            except BadSampleError as error:
                self.bad.report(error.path, error.reason)
                continue
            return {
                "image": preprocess(image, self.resolution, self.center_crop),
                "caption": caption,
                "meta": {"path": path},
            }
        raise RuntimeError(f"every image in {self.root!r} failed to load; see the warnings above")

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, resolution={self.resolution}, items={len(self.items)}, skipped={self.skipped})"
