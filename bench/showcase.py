"""The README's showcase: one row per model (its steps and guidance), one column per prompt, the same seed for every
cell, upscaled with nearest neighbour and labelled.

    python bench/showcase.py checkpoints/shapes-base:28:3 checkpoints/shapes-4step:4:1 \
        checkpoints/shapes-4step-0.5:4:1 -o docs/images/showcase.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = ["a red circle", "two blue squares", "three yellow triangles", "a green diamond above a purple circle",
           "a square to the left of a circle", "four orange circles"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="PATH:STEPS:GUIDANCE")
    p.add_argument("-o", "--output", default="docs/images/showcase.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4)
    args = p.parse_args()
    import textwrap

    import torch
    from PIL import Image, ImageDraw

    from pocketdit import PocketDiTPipeline
    from pocketdit.utils import make_grid

    label_w, head_h = 190, 34
    rows = []
    for spec in args.models:
        path, steps, guidance = spec.rsplit(":", 2)
        pipe = PocketDiTPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images = [pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), seed=args.seed)
                      .images[0] for prompt in PROMPTS]
        cfg = f", CFG {float(guidance):g}" if float(guidance) != 1 else ""
        name = Path(path).name
        if name.startswith("checkpoint-"):  # a training checkpoint: name it by its run and step
            name = f"{Path(path).parent.name} @ {int(name.split('-')[1])}"
        rows.append((f"{name}, {steps} steps{cfg}", make_grid(images, ncols=len(images), scale=args.scale)))
    w = label_w + rows[0][1].width
    canvas = Image.new("RGB", (w, head_h + sum(r.height for _, r in rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    cell = rows[0][1].width / len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        draw.text((label_w + i * cell + 4, 2), "\n".join(textwrap.wrap(prompt, 24)), fill=(0, 0, 0))
    y = head_h
    for label, grid in rows:
        draw.text((4, y + grid.height // 2 - 6), label, fill=(0, 0, 0))
        canvas.paste(grid, (label_w, y))
        y += grid.height
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
