"""Does a shapes model use each part of its prompt? The flow-matching loss on rendered scenes with the true
caption against a caption with one thing changed, at several noise levels.

    python bench/caption_sensitivity.py checkpoints/shapes-base [--scenes 96]

For each category a scene is rendered; its GenEval-style caption is compared with a corrupted one: another
colour (colors), the two objects' colours swapped (color_attr: the same words, bound the other way), the
relation reversed (position: "left of" <-> "right of", "above" <-> "below"), another count (counting). Same
image, noise and timestep for both captions, so the gap is what the model takes from that part of the text:
near zero means the model ignores it. Prints a markdown table (mean loss ratio wrong/true - 1, in %).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_threads  # noqa: E402

CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def corrupt(scene: dict, rng: np.random.Generator, colours) -> dict:
    s = copy.deepcopy(scene)
    objects, cat = s["objects"], s["category"]
    if cat == "colors":
        objects[0]["colour"] = rng.choice([c for c in colours if c != objects[0]["colour"]])
    elif cat == "color_attr":
        objects[0]["colour"], objects[1]["colour"] = objects[1]["colour"], objects[0]["colour"]
    elif cat == "position":
        s["relation"]["relation"] = CONVERSE[s["relation"]["relation"]]
    elif cat == "counting":
        n = sum(int(o.get("count", 1)) for o in objects)
        objects[:] = [dict(objects[0], count=2 if n != 2 else 3)]
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("--scenes", type=int, default=96)
    p.add_argument("--t", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    setup_threads(args.threads)
    from pocketdit import PocketDiTPipeline
    from pocketdit.data.phrasing import canonical_caption
    from pocketdit.data.shapes import COLOURS, pil_to_tensor, render_scene, sample_scene

    pipe = PocketDiTPipeline.from_pretrained(args.model)
    model, text = pipe.transformer.eval(), pipe.text_conditioner
    size = pipe.default_size or 32
    rows = []
    for category in ("colors", "color_attr", "position", "counting"):
        rng = np.random.default_rng(0)
        scenes = [sample_scene(rng, category) for _ in range(args.scenes)]
        wrong = [corrupt(s, rng, list(COLOURS)) for s in scenes]
        x0 = torch.stack([pil_to_tensor(render_scene(s, size)) for s in scenes])
        true_states = text.encode([canonical_caption(s) for s in scenes])
        wrong_states = text.encode([canonical_caption(s) for s in wrong])
        gaps = []
        for t_value in args.t:
            g = torch.Generator().manual_seed(1)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((len(scenes),), t_value)
            x_t = (1 - t_value) * x0 + t_value * noise
            target = noise - x0
            losses = []
            with torch.no_grad():
                for states, masks in (true_states, wrong_states):
                    s, m = (states[0], masks[0]) if len(states) == 1 else (states, masks)
                    v = model(x_t, t, s, m).sample
                    losses.append((v - target).pow(2).mean().item())
            gaps.append(100 * (losses[1] / losses[0] - 1))
        rows.append((category, gaps))
    print("| category (what is changed) | " + " | ".join(f"t = {t:g}" for t in args.t) + " |")
    print("|---|" + "---|" * len(args.t))
    what = {"colors": "colour", "color_attr": "colours swapped between the objects", "position": "relation reversed",
            "counting": "count"}
    for category, gaps in rows:
        print(f"| {category} ({what[category]}) | " + " | ".join(f"{g:+.1f}%" for g in gaps) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
