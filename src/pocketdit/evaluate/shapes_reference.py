"""Reference "models" for ShapesEval: what the score and its intervals say about generators whose behaviour is
known, with no model trained. Each ``*_fn`` is a ``generate_fn(prompts, seeds)`` for ``evaluate_generator``.

    python -m pocketdit.evaluate.shapes_reference            # the table in docs/evaluation.md

- ground truth (``shapes_eval.ground_truth_fn``), and ground truth blurred and noised like a small
  generator's samples: the detector's accuracy, both rules should be ~1.0;
- ground truth plus ``extra`` shapes that the prompt does not name: GenEval's rule passes it (outside
  counting), the strict rule does not;
- text-blind: a random shapes scene drawn from the image's seed alone, whatever the prompt;
- a coin: ground truth or a blank image, per image (independent) or per prompt (all images of a prompt
  agree): the widest intervals a model of that accuracy gets, and how much clustering widens them.
"""

from __future__ import annotations

import argparse
import zlib
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from pocketdit.data.shapes import (
    _SIZE_RANGES,
    CATEGORIES,
    COLOURS,
    SHAPES,
    _boxes_apart,
    _random_box,
    layout_scene,
    render_scene,
    sample_scene,
)

from . import shapes_eval

__all__ = ["blank_fn", "cluttered_fn", "coin_fn", "degraded_fn", "text_blind_fn", "main"]

GenerateFn = Callable[[list[str], list[int]], list]


def _lookup(prompts: Sequence[dict] | None) -> dict[str, dict]:
    by_text = dict(shapes_eval._shipped_prompts_by_text())
    by_text.update({p["prompt"]: p for p in prompts or []})
    return by_text


def cluttered_fn(resolution: int, extra: int = 1, prompts: Sequence[dict] | None = None) -> GenerateFn:
    """Ground truth plus ``extra`` objects of shapes the prompt does not name (random colours, apart from the
    other objects, at the sizes of ``counting`` objects, the smallest the dataset draws, so that they fit next
    to a large single object). ``prompts`` adds prompt dicts to the shipped ones to look texts up in."""
    by_text = _lookup(prompts)

    def cluttered(prompt: dict, seed: int) -> Image.Image:
        rng = np.random.default_rng([seed, zlib.crc32(prompt["prompt"].encode("utf-8"))])
        others = [s for s in SHAPES if s not in {o["shape"] for o in prompt["objects"]}]
        lo, hi = _SIZE_RANGES["counting"]
        for _ in range(100):  # a new layout when the extra objects do not fit
            scene = layout_scene(rng, prompt)
            boxes = [(*o["centre"], o["size"]) for o in scene["objects"]]
            for _ in range(extra):
                size = float(rng.uniform(lo, hi))
                box = next((b for b in (_random_box(rng, size) for _ in range(200))
                            if all(_boxes_apart(b, other) for other in boxes)), None)
                if box is None:
                    break
                boxes.append(box)
                scene["objects"].append({"shape": others[int(rng.integers(len(others)))],
                                         "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                                         "centre": [box[0], box[1]], "size": size})
            else:
                return render_scene(scene, resolution)
        # crowded (four counted objects): lay everything out together, all at counting's sizes
        crowded = {"category": "counting", "relation": None, "objects": prompt["objects"] + [
            {"shape": others[int(rng.integers(len(others)))], "colour": None, "count": 1} for _ in range(extra)]}
        return render_scene(layout_scene(rng, crowded), resolution)

    return lambda texts, seeds: [cluttered(shapes_eval._as_prompt(t, by_text), s) for t, s in zip(texts, seeds)]


def degraded_fn(resolution: int, blur: float = 0.8, noise: float = 0.05, tint: float = 20.0,
                prompts: Sequence[dict] | None = None) -> GenerateFn:
    """Ground truth blurred (Gaussian, ``blur`` px), with pixel noise (``noise`` of the range) and a cream
    background (``tint``): roughly what a small generator's samples look like."""
    truth = shapes_eval.ground_truth_fn(resolution, prompts)

    def generate(texts: list[str], seeds: list[int]) -> list[np.ndarray]:
        out = []
        for image, seed in zip(truth(texts, seeds), seeds):
            array = ndimage.gaussian_filter(np.asarray(image).astype(np.float32), sigma=(blur, blur, 0))
            array += np.random.default_rng(seed).normal(0.0, noise * 127.5, array.shape)
            array -= np.array([0.0, tint / 2, tint])
            out.append(np.clip(array.round(), 0, 255).astype(np.uint8))
        return out

    return generate


def text_blind_fn(resolution: int) -> GenerateFn:
    """A random scene (random category) drawn from the image's seed alone: a model that ignores the text."""

    def scene(seed: int) -> Image.Image:
        rng = np.random.default_rng(seed)
        return render_scene(sample_scene(rng, CATEGORIES[int(rng.integers(len(CATEGORIES)))]), resolution)

    return lambda texts, seeds: [scene(s) for s in seeds]


def blank_fn(resolution: int) -> GenerateFn:
    """White images."""
    return lambda texts, seeds: [np.full((resolution, resolution, 3), 255, np.uint8) for _ in texts]


def coin_fn(resolution: int, rate: float = 0.5, per_prompt: bool = False,
            prompts: Sequence[dict] | None = None) -> GenerateFn:
    """Ground truth with probability ``rate``, else a blank image: decided per image from its seed, or
    (``per_prompt``) once per prompt from its text, so that all images of a prompt agree."""
    truth, blank = shapes_eval.ground_truth_fn(resolution, prompts), blank_fn(resolution)

    def generate(texts: list[str], seeds: list[int]) -> list:
        out = []
        for text, seed in zip(texts, seeds):
            key = zlib.crc32(text.encode("utf-8")) if per_prompt else seed
            hit = np.random.default_rng([key, 99]).random() < rate
            out += (truth if hit else blank)([text], [seed])
        return out

    return generate


def _shared_seed_text_blind(resolution: int, seed: int, images_per_prompt: int, prompts: list[dict]) -> dict:
    """The text-blind model under v1's seeding (image k of every prompt: seed + k)."""
    images = [img for p in prompts for img in text_blind_fn(resolution)([p["prompt"]] * images_per_prompt,
                                                                        [seed + k for k in range(images_per_prompt)])]
    return shapes_eval.evaluate(images, [p for p in prompts for _ in range(images_per_prompt)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5, help="base seeds for the text-blind seeding comparison")
    args = parser.parse_args(argv)
    r, n = args.resolution, args.images_per_prompt
    rows = [
        ("ground truth", shapes_eval.ground_truth_fn(r)),
        ("ground truth, blurred + noise", degraded_fn(r)),
        ("ground truth + 1 unnamed shape", cluttered_fn(r, 1)),
        ("text-blind random scenes", text_blind_fn(r)),
        ("coin 0.5 per image", coin_fn(r, 0.5)),
        ("coin 0.5 per prompt", coin_fn(r, 0.5, per_prompt=True)),
        ("blank", blank_fn(r)),
    ]
    cell = lambda s: f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"
    print(f"ShapesEval {shapes_eval.DEFAULT_VERSION}, {r} px, {n} images per prompt; overall mean [95 % interval]\n")
    print("| reference model | GenEval rule | strict | widest category interval (strict) |")
    print("|---|---|---|---|")
    for name, generate in rows:
        result = shapes_eval.evaluate_generator(generate, r, images_per_prompt=n)
        widest = max(s["hi"] - s["lo"] for s in result["scores"]["strict"]["categories"].values())
        print(f"| {name} | {cell(result['scores']['geneval']['overall'])} | "
              f"{cell(result['scores']['strict']['overall'])} | {widest:.3f} |", flush=True)
    prompts = shapes_eval.load_prompts()
    print("\ntext-blind model, GenEval-rule overall, by base seed: v1 seeding (seed + k for every prompt) vs per-image")
    for seed in range(args.seeds):
        shared = _shared_seed_text_blind(r, seed, n, prompts)["overall"]
        own = shapes_eval.evaluate_generator(text_blind_fn(r), r, images_per_prompt=n, seed=seed)["overall"]
        print(f"  seed {seed}: shared {shared:.3f}   per-image {own:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
