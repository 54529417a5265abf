"""Small helpers shared across modules."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional


def dir_fingerprint(model_dir: Path) -> str:
    """Short hash of config.json and the weight files (name, size, first and last MiB).

    Two models with the same config but different weights get different fingerprints, and so different
    cache keys, without reading gigabytes of weights.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:8]


def cli_error(message: str, code: int = 2) -> int:
    """Print a command's error to stderr as one `pocketdit: error:` line and return its exit code (2, as
    argparse does for usage errors)."""
    print(f"pocketdit: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def format_mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


@contextmanager
def atomic_directory(final: Path):
    """Write a directory in full or not at all: yields a hidden sibling to write into, which replaces `final`
    only when the block completes. A crash or kill -9 midway leaves `final` as it was (and the sibling,
    removed by the next call)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}") if final.exists() else None
    if old is not None:
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path) -> object:
    """A JSON file, or a ValueError that names it (json's own error does not say which file)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON text file") from None


def make_grid(images, ncols: Optional[int] = None, scale: int = 1, pad: int = 2):
    """Tile PIL images into one PIL image (nearest-neighbour upscaled by `scale`, white padding)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid
