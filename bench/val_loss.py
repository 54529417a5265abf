"""Validation loss of several models on the same held-out shapes scenes, noise and timesteps.

    python bench/val_loss.py runs/a runs/b/checkpoint-0001500 checkpoints/shapes-base [--width 0.5] [--images 512]

Scenes come from ShapesDataset(seed=12345, phrasing="heldout"), a seed no training config uses; each image's loss
is averaged over 8 stratified timesteps. Prints a markdown table with 95% intervals, and each model's difference
from the first one, paired over the same scenes, noise and timesteps (far narrower than the two intervals).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_threads  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="runs, checkpoints or pipelines; NAME@WIDTH runs a supernet at a width")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--num-t", type=int, default=8)
    p.add_argument("--seed", type=int, default=12345, help="dataset seed (not a training seed)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    import torch

    from pocketdit import PocketDiTPipeline
    from pocketdit.data.shapes import ShapesDataset
    from pocketdit.evaluate.val_loss import ci95_half_width, validation_loss

    print("| model | width | validation loss [95% CI] | minus the first model, paired [95% CI] |")
    print("|---|---|---|---|")
    first = None
    for spec in args.models:
        path, _, width = spec.partition("@")
        pipe = PocketDiTPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        size = pipe.default_size or 32
        data = ShapesDataset(resolution=size, length=args.images, seed=args.seed, phrasing="heldout")
        r = validation_loss(pipe, data, num_images=args.images, num_t=args.num_t, width=float(width) if width else None)
        per_image = torch.tensor(r["per_image"])
        first = per_image if first is None else first
        diff = per_image - first
        d, half = float(diff.mean()), ci95_half_width(diff)
        print(f"| {path} | {width or 'full'} | {r['loss']:.5f} [{r['loss'] - r['ci95']:.5f}, {r['loss'] + r['ci95']:.5f}] | "
              f"{d:+.5f} [{d - half:+.5f}, {d + half:+.5f}] |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
