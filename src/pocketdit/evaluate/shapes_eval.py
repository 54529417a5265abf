"""ShapesEval: a GenEval-style score for images generated from ``shapes`` prompts.

GenEval detects objects with a Mask2Former and checks each prompt's objects, counts, colours and relative
positions. Here the objects are flat coloured shapes on a neutral background, so a programmatic detector
does the same job with no weights:

1. **Colour segmentation.** Each pixel gets the palette colour of nearest hue if it is saturated and bright
   enough (the background is neutral, so antialiased edges keep the hue and only lose saturation).
2. **Connected components** per colour, dropping those whose bounding box is smaller than
   ``min_size`` of the image side (noise specks).
3. **Shape recognition** by template matching: the component's mask is compared (IoU) with each shape drawn
   into the component's bounding box with the dataset's own geometry (``shape_outline``). The best template
   wins if its IoU reaches ``min_iou``; otherwise the blob is not an object.

Scoring follows GenEval's rules per category (``score_detections``); the overall score is the mean of the
six category accuracies, as in GenEval. The prompt set is fixed and versioned
(``pocketdit/evaluate/prompts/shapes_<version>.json``); never edit a released version, add a new one.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from tqdm.auto import tqdm

from pocketdit.data.shapes import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    caption_for,
    layout_scene,
    render_scene,
    shape_outline,
)

__all__ = [
    "DEFAULT_VERSION",
    "Detection",
    "ShapesEvalConfig",
    "detect_objects",
    "evaluate",
    "evaluate_generator",
    "load_prompts",
    "relative_position",
    "render_prompt",
    "save_grid",
    "score_detections",
    "score_image",
    "to_uint8_rgb",
]

DEFAULT_VERSION = "v1"
POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by this fraction of the two boxes' summed size


@dataclass(frozen=True)
class ShapesEvalConfig:
    """Detector thresholds. The defaults are what the tests calibrate (>= 0.98 on ground-truth renders at
    32 and 64 px, <= 0.05 on noise); change them only with a new prompt-set version's numbers."""

    min_saturation: float = 0.35  # HSV saturation below this is background (edges at < ~half coverage)
    min_value: float = 0.25  # darker pixels have unreliable hue
    max_hue_distance: float = 20.0  # degrees from the nearest palette hue; farther pixels are unassigned
    min_size: float = 0.12  # minimum bounding-box side of an object, as a fraction of the image side
    min_iou: float = 0.6  # minimum IoU between a component and its best shape template

    def __post_init__(self) -> None:
        for name in ("min_saturation", "min_value", "min_size", "min_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1]")
        if not 0.0 < self.max_hue_distance <= 180.0:
            raise ValueError(f"max_hue_distance={self.max_hue_distance!r} must be in (0, 180]")


@dataclass(frozen=True)
class Detection:
    """One detected object. ``centre`` is the bounding-box centre and ``box`` is (x0, y0, x1, y1), both in
    [0, 1] image coordinates (x right, y down); ``area`` is the mask's pixel fraction of the image; ``iou``
    is the match with the shape's template (a confidence; GenEval keeps the most confident first)."""

    shape: str
    colour: str
    centre: tuple[float, float]
    area: float
    box: tuple[float, float, float, float]
    iou: float


# ----------------------------------------------------------------------------------------------- prompts


def load_prompts(version: str = DEFAULT_VERSION) -> list[dict]:
    """The fixed prompt set ``version``: a list of ``{"id", "prompt", "category", "objects": [{"shape",
    "colour" (or None), "count"}], "relation" (or None)}``, in file order."""
    name = f"shapes_{version}.json"
    try:
        text = resources.files("pocketdit.evaluate").joinpath("prompts", name).read_text(encoding="utf-8")
    except FileNotFoundError:
        folder = resources.files("pocketdit.evaluate").joinpath("prompts")
        available = sorted(p.name for p in folder.iterdir() if p.name.startswith("shapes_"))
        raise FileNotFoundError(
            f"ShapesEval prompt set version={version!r} not found ({name}); available: {available}"
        ) from None
    data = json.loads(text)
    if data.get("version") != version:
        raise ValueError(f"{name} declares version {data.get('version')!r}, expected {version!r}")
    return data["prompts"]


def _as_prompt(prompt: dict | str, by_text: dict[str, dict] | None = None) -> dict:
    if isinstance(prompt, dict):
        for key in ("prompt", "category", "objects"):
            if key not in prompt:
                raise ValueError(f"prompt dict is missing key {key!r}: {prompt!r}")
        return prompt
    if by_text is None:
        by_text = {p["prompt"]: p for p in load_prompts()}
    if prompt not in by_text:
        raise ValueError(
            f"prompt {prompt!r} is not in the ShapesEval {DEFAULT_VERSION} prompt set; pass the prompt dict "
            "from load_prompts() instead of its text"
        )
    return by_text[prompt]


def render_prompt(prompt: dict, resolution: int, seed: int = 0) -> Image.Image:
    """A ground-truth image for a prompt: a random layout (seeded by ``seed`` and the prompt text) that
    satisfies it, rendered like the ``shapes`` dataset."""
    prompt = _as_prompt(prompt)
    rng = np.random.default_rng([seed, zlib.crc32(prompt["prompt"].encode("utf-8"))])
    return render_scene(layout_scene(rng, prompt), resolution)


# ---------------------------------------------------------------------------------------------- detector


def to_uint8_rgb(image: Any) -> np.ndarray:
    """PIL image, uint8 array (H, W, 3), or tensor (3, H, W) [float in [-1, 1] or uint8] -> uint8 (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must have shape (3, H, W), got {tuple(image.shape)}")
        image = image.detach().cpu()
        if image.dtype == torch.uint8:
            return image.permute(1, 2, 0).numpy().copy()
        if not image.is_floating_point():
            raise ValueError(f"image tensor must be float in [-1, 1] or uint8, got {image.dtype}")
        scaled = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return scaled.permute(1, 2, 0).numpy().copy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image array must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}; "
                "pass float images as a torch tensor (3, H, W) in [-1, 1]"
            )
        return image
    raise TypeError(f"image must be a PIL image, a uint8 numpy array or a torch tensor, got {type(image)}")


def _palette_hues() -> tuple[list[str], np.ndarray]:
    names = list(COLOURS)
    hues = _hsv(np.array([COLOURS[n] for n in names], dtype=np.uint8)[None])[0][0]
    return names, hues


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> hue in degrees [0, 360), saturation and value in [0, 1]."""
    rgb = rgb.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(maxc == r, ((g - b) / safe) % 6.0, np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    saturation = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    return hue, saturation, maxc


def _template(shape: str, height: int, width: int) -> np.ndarray:
    """Binary mask of ``shape`` filling an (height, width) box, at >= 50 % pixel coverage (as the
    saturation threshold binarises a rendered object)."""
    ss = 4
    canvas = Image.new("L", (width * ss, height * ss), 0)
    kind, points = shape_outline(shape, 0.5, 0.5, 1.0)
    points = [(x * width * ss, y * height * ss) for x, y in points]
    draw = ImageDraw.Draw(canvas)
    (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=255)
    coverage = np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0
    return coverage >= 0.5


def detect_objects(image: Any, config: ShapesEvalConfig | None = None) -> list[Detection]:
    """Coloured shapes in ``image`` (PIL, uint8 (H, W, 3) array or tensor (3, H, W) in [-1, 1]), most
    confident (highest template IoU) first."""
    config = config or ShapesEvalConfig()
    rgb = to_uint8_rgb(image)
    height, width = rgb.shape[:2]
    hue, saturation, value = _hsv(rgb)
    names, palette = _palette_hues()
    distance = np.abs(hue[..., None] - palette[None, None, :])
    distance = np.minimum(distance, 360.0 - distance)
    nearest = distance.argmin(-1)
    coloured = (saturation >= config.min_saturation) & (value >= config.min_value)
    coloured &= distance.min(-1) <= config.max_hue_distance
    min_side = config.min_size * min(height, width)

    detections = []
    structure = np.ones((3, 3), dtype=bool)  # 8-connectivity keeps thin triangle tips attached
    for index, colour in enumerate(names):
        labels, count = ndimage.label(coloured & (nearest == index), structure=structure)
        if count == 0:
            continue
        for label, slices in enumerate(ndimage.find_objects(labels), start=1):
            rows, cols = slices
            box_h, box_w = rows.stop - rows.start, cols.stop - cols.start
            if min(box_h, box_w) < min_side:
                continue
            mask = labels[slices] == label
            best_shape, best_iou = None, 0.0
            for shape in SHAPES:
                template = _template(shape, box_h, box_w)
                iou = float((mask & template).sum() / max((mask | template).sum(), 1))
                if iou > best_iou:
                    best_shape, best_iou = shape, iou
            if best_shape is None or best_iou < config.min_iou:
                continue
            x0, x1, y0, y1 = cols.start / width, cols.stop / width, rows.start / height, rows.stop / height
            detections.append(
                Detection(
                    shape=best_shape,
                    colour=colour,
                    centre=((x0 + x1) / 2, (y0 + y1) / 2),
                    area=float(mask.sum()) / (height * width),
                    box=(x0, y0, x1, y1),
                    iou=best_iou,
                )
            )
    detections.sort(key=lambda d: -d.iou)
    return detections


# ---------------------------------------------------------------------------------------------- scoring


def relative_position(subject: Detection, other: Detection) -> set[str]:
    """GenEval's ``relative_position``: the relations of ``subject`` to ``other`` from their box centres,
    after shrinking the offset by POSITION_THRESHOLD of the two boxes' summed sizes."""
    box_a, box_b = np.array(subject.box), np.array(other.box)
    centre_a, centre_b = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
    dim_a, dim_b = box_a[2:] - box_a[:2], box_b[2:] - box_b[:2]
    offset = centre_a - centre_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def score_detections(detections: Sequence[Detection], prompt: dict) -> tuple[bool, str]:
    """GenEval's per-prompt rule on a list of detections; returns (passed, reason of the first failure).

    Each object group needs at least ``count`` detections of its shape (of its colour, when the prompt names
    one); ``counting`` also needs no more than ``count``; ``position`` needs every subject detection to stand
    in the relation to every detection of the other group. Extra objects of other shapes are allowed."""
    prompt = _as_prompt(prompt)
    matched: list[list[Detection] | None] = []
    passed, reasons = True, []
    relation = prompt.get("relation")
    for group_index, group in enumerate(prompt["objects"]):
        shape, colour, count = group["shape"], group.get("colour"), int(group.get("count", 1))
        found = [d for d in detections if d.shape == shape]  # already sorted by confidence
        if len(found) < count:
            passed = False
            reasons.append(f"expected {count} {shape}(s), found {len(found)}")
            matched.append(None)
            continue
        if colour is not None:
            found = [d for d in found if d.colour == colour]
            if len(found) < count:
                passed = False
                seen = sorted({d.colour for d in detections if d.shape == shape})
                reasons.append(f"expected {count} {colour} {shape}(s), found colours {seen}")
                matched.append(None)
                continue
        matched.append(found[:count])
        if prompt["category"] == "counting" and len(found) > count:
            passed = False
            reasons.append(f"expected exactly {count} {shape}(s), found {len(found)}")
    if relation is not None and passed:
        subjects, others = matched[relation["subject"]], matched[relation["object"]]
        for subject in subjects or []:
            for other in others or []:
                found_relations = relative_position(subject, other)
                if relation["relation"] not in found_relations:
                    passed = False
                    reasons.append(
                        f"expected {relation['relation']!r}, found {sorted(found_relations) or 'no relation'}"
                    )
    return passed, "; ".join(reasons)


def score_image(image: Any, prompt: dict | str, config: ShapesEvalConfig | None = None) -> bool:
    """Whether ``image`` satisfies ``prompt`` (a dict from ``load_prompts`` or its text)."""
    return score_detections(detect_objects(image, config), _as_prompt(prompt))[0]


def evaluate(
    images: Sequence[Any],
    prompts: Sequence[dict | str],
    config: ShapesEvalConfig | None = None,
    progress: bool = False,
) -> dict:
    """Scores ``images[i]`` against ``prompts[i]``.

    Returns ``{"overall": mean of category accuracies, "categories": {category: accuracy},
    "num_images": {category: n}, "results": [{"prompt", "category", "passed", "reason", "detections"}]}``.
    Categories with no images are left out of both the table and the mean."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    by_text = None
    if any(isinstance(p, str) for p in prompts):
        by_text = {p["prompt"]: p for p in load_prompts()}
    results = []
    for image, prompt in tqdm(list(zip(images, prompts)), desc="ShapesEval", disable=not progress):
        prompt = _as_prompt(prompt, by_text)
        detections = detect_objects(image, config)
        passed, reason = score_detections(detections, prompt)
        results.append(
            {
                "prompt": prompt["prompt"],
                "id": prompt.get("id"),
                "category": prompt["category"],
                "passed": passed,
                "reason": reason,
                "detections": [asdict(d) for d in detections],
            }
        )
    return _summarise(results)


def _summarise(results: list[dict]) -> dict:
    categories, num_images = {}, {}
    for category in CATEGORIES:
        outcomes = [r["passed"] for r in results if r["category"] == category]
        if outcomes:
            categories[category] = sum(outcomes) / len(outcomes)
            num_images[category] = len(outcomes)
    overall = sum(categories.values()) / len(categories) if categories else math.nan
    return {"overall": overall, "categories": categories, "num_images": num_images, "results": results}


def evaluate_generator(
    generate_fn: Callable[[list[str], list[int]], Any],
    resolution: int,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 16,
    version: str = DEFAULT_VERSION,
    categories: Sequence[str] | None = None,
    config: ShapesEvalConfig | None = None,
    return_images: bool = False,
) -> dict:
    """Generates ``images_per_prompt`` images for every prompt of the set and scores them (GenEval uses 4).

    ``generate_fn(prompts, seeds)`` gets a batch of prompt texts and one integer seed per image (image k of
    a prompt uses ``seed + k``, so runs are comparable across models) and returns a tensor (B, 3, H, W) in
    [-1, 1] or a list of PIL images / uint8 arrays, with H = W = ``resolution``.
    The result is ``evaluate``'s dict plus ``"resolution"``, ``"version"``, ``"images_per_prompt"``,
    ``"seed"``, and ``"images"`` (uint8 arrays) when ``return_images``."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt!r} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    prompts = load_prompts(version)
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"categories: {unknown} not in {CATEGORIES}")
        prompts = [p for p in prompts if p["category"] in set(categories)]
    jobs = [(p, seed + k) for p in prompts for k in range(images_per_prompt)]
    results, images = [], []
    with tqdm(total=len(jobs), desc=f"ShapesEval {version} @ {resolution}px", unit="img") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            outputs = generate_fn([p["prompt"] for p, _ in batch], [s for _, s in batch])
            if len(outputs) != len(batch):
                raise ValueError(f"generate_fn returned {len(outputs)} images for a batch of {len(batch)}")
            for (prompt, image_seed), output in zip(batch, outputs):
                rgb = to_uint8_rgb(output)
                if rgb.shape[:2] != (resolution, resolution):
                    raise ValueError(
                        f"generate_fn returned a {rgb.shape[1]}x{rgb.shape[0]} image, expected "
                        f"{resolution}x{resolution} (the resolution passed to evaluate_generator)"
                    )
                detections = detect_objects(rgb, config)
                passed, reason = score_detections(detections, prompt)
                results.append(
                    {
                        "prompt": prompt["prompt"],
                        "id": prompt["id"],
                        "category": prompt["category"],
                        "seed": image_seed,
                        "passed": passed,
                        "reason": reason,
                        "detections": [asdict(d) for d in detections],
                    }
                )
                if return_images:
                    images.append(rgb)
            bar.update(len(batch))
            bar.set_postfix(passed=f"{sum(r['passed'] for r in results) / len(results):.3f}")
    summary = _summarise(results)
    summary.update(resolution=resolution, version=version, images_per_prompt=images_per_prompt, seed=seed)
    if return_images:
        summary["images"] = images
    return summary


# ---------------------------------------------------------------------------------------------- figures


def _wrap(text: str, width_px: int, font, draw: ImageDraw.ImageDraw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width_px:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def save_grid(
    images: Sequence[Any],
    prompts: Sequence[dict | str],
    path: str | Path,
    passed: Sequence[bool] | None = None,
    columns: int = 8,
    cell: int = 128,
) -> Path:
    """Writes a labelled grid PNG: each image upscaled (nearest) to ``cell`` px, its prompt below, and a
    green (pass) or red (fail) frame when ``passed`` is given (e.g. ``[r["passed"] for r in
    result["results"]]``). Returns the path."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if passed is not None and len(passed) != len(images):
        raise ValueError(f"got {len(passed)} pass/fail flags for {len(images)} images")
    if not images:
        raise ValueError("save_grid needs at least one image")
    font = ImageFont.load_default()
    pad, label_h = 4, 40
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * (cell + 2 * pad), rows * (cell + 2 * pad + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        text = prompt["prompt"] if isinstance(prompt, dict) else str(prompt)
        x = (i % columns) * (cell + 2 * pad)
        y = (i // columns) * (cell + 2 * pad + label_h)
        if passed is not None:
            frame = (30, 160, 60) if passed[i] else (210, 40, 40)
            draw.rectangle([x, y, x + cell + 2 * pad - 1, y + cell + 2 * pad - 1], fill=frame)
        tile = Image.fromarray(to_uint8_rgb(image)).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (x + pad, y + pad))
        label = _wrap(text.removeprefix("a photo of "), cell, font, draw)[:3]
        for j, line in enumerate(label):
            draw.text((x + pad, y + cell + 2 * pad + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
