"""ShapesEval: a GenEval-style score for images generated from ``shapes`` prompts.

GenEval detects objects with a Mask2Former and checks each prompt's objects, counts, colours and relative
positions. Here the objects are flat coloured shapes on a neutral background, so a programmatic detector
does the same job with no weights:

1. **Colour segmentation.** Each pixel gets the palette colour of nearest hue and a *coverage*: its chroma
   over that colour's chroma. The background is neutral, so an antialiased or blurred edge keeps its
   object's hue and its chroma scales by exactly the fraction of the pixel the object covers.
2. **Connected components** of pixels at >= 50 % coverage, per colour; components whose bounding box is
   smaller than ``min_size`` (noise specks) or larger than ``max_size`` of the image side are dropped.
3. **Shape recognition** by template matching: each shape is drawn with the dataset's own geometry
   (``shape_outline``) into a box fitted to the component's first and second moments, at a few blurs, and
   compared with the component's soft coverage mask (soft IoU). The best template wins if its IoU reaches
   ``min_iou``; otherwise the blob is not an object.

Scoring follows GenEval's rules per category (``score_detections``); the overall score is the mean of the
six category accuracies, as in GenEval. The prompt set is fixed and versioned
(``pocketdit/evaluate/prompts/shapes_<version>.json``); never edit a released version, add a new one.
"""

from __future__ import annotations

import copy
import functools
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
    "ground_truth_fn",
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
_TEMPLATE_SUPERSAMPLE = 8
_MAX_BLUR = 2.0  # largest Gaussian blur (px) the shape templates are fitted with


@dataclass(frozen=True)
class ShapesEvalConfig:
    """Detector thresholds. The defaults are what the tests calibrate (>= 0.98 on ground-truth renders at
    32 and 64 px, <= 0.05 on noise); change them only with a new prompt-set version's numbers."""

    min_value: float = 0.25  # darker pixels have unreliable hue
    max_hue_distance: float = 20.0  # degrees from the nearest palette hue; farther pixels are unassigned
    min_coverage: float = 0.1  # faintest edge pixels (fraction of the palette colour's chroma) kept in a mask
    min_size: float = 0.12  # minimum bounding-box side of an object, as a fraction of the image side
    max_size: float = 0.9  # maximum one (a colour field filling the image is not an object)
    min_iou: float = 0.75  # minimum soft IoU between a component and its best shape template

    def __post_init__(self) -> None:
        for name in ("min_value", "min_coverage", "min_size", "max_size", "min_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in [0, 1]")
        if not 0.0 < self.max_hue_distance <= 180.0:
            raise ValueError(f"max_hue_distance={self.max_hue_distance!r} must be in (0, 180]")


@dataclass(frozen=True)
class Detection:
    """One detected object. ``box`` (x0, y0, x1, y1) is the fitted template's bounding box and ``centre`` its
    centre, both in [0, 1] image coordinates (x right, y down); ``area`` is the object's coverage as a
    fraction of the image; ``iou`` is the soft IoU with the shape's template (a confidence; GenEval keeps
    the most confident detections first)."""

    shape: str
    colour: str
    centre: tuple[float, float]
    area: float
    box: tuple[float, float, float, float]
    iou: float


# ----------------------------------------------------------------------------------------------- prompts


def load_prompts(version: str = DEFAULT_VERSION) -> list[dict]:
    """The fixed prompt set ``version``: a list of ``{"id", "prompt", "category", "objects": [{"shape",
    "colour" (or None), "count"}], "relation" (or None)}``, in file order (a fresh copy on every call)."""
    return copy.deepcopy(_read_prompt_file(version))


@functools.lru_cache(maxsize=None)
def _read_prompt_file(version: str) -> list[dict]:
    name = f"shapes_{version}.json"
    folder = resources.files("pocketdit.evaluate").joinpath("prompts")
    try:
        text = folder.joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        available = sorted(p.name for p in folder.iterdir() if p.name.startswith("shapes_"))
        raise FileNotFoundError(
            f"ShapesEval prompt set version={version!r} not found ({name}); available: {available}"
        ) from None
    try:
        data = json.loads(text)
        prompts = data["prompts"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"ShapesEval prompt file {name} is corrupt: {error}") from error
    if data.get("version") != version:
        raise ValueError(f"{name} declares version {data.get('version')!r}, expected {version!r}")
    return prompts


def _as_prompt(prompt: dict | str, by_text: dict[str, dict] | None = None) -> dict:
    if isinstance(prompt, dict):
        for key in ("prompt", "category", "objects"):
            if key not in prompt:
                raise ValueError(f"prompt dict is missing key {key!r}: {prompt!r}")
        return prompt
    if by_text is None:
        by_text = {p["prompt"]: p for p in _read_prompt_file(DEFAULT_VERSION)}
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


def ground_truth_fn(resolution: int) -> Callable[[list[str], list[int]], list[Image.Image]]:
    """A ``generate_fn`` for ``evaluate_generator`` that returns ground-truth renders (the score's ceiling,
    for reference rows in tables)."""
    by_text = {p["prompt"]: p for p in _read_prompt_file(DEFAULT_VERSION)}

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [render_prompt(_as_prompt(p, by_text), resolution, seed=s) for p, s in zip(prompts, seeds)]

    return generate


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
        # in NumPy: small torch ops pay thread-pool overheads that dominate at these sizes
        array = image.float().permute(1, 2, 0).numpy()
        return np.round((np.clip(array, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image array must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}; "
                "pass float images as a torch tensor (3, H, W) in [-1, 1]"
            )
        return image
    raise TypeError(f"image must be a PIL image, a uint8 numpy array or a torch tensor, got {type(image)}")


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (..., 3) -> hue in degrees [0, 360), chroma (max - min) and value (max), both in [0, 1]."""
    rgb = rgb.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    chroma = maxc - minc
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(maxc == r, ((g - b) / safe) % 6.0, np.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(chroma > 0, hue * 60.0, 0.0), chroma, maxc


@functools.lru_cache(maxsize=None)
def _palette() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    names = tuple(COLOURS)
    hue, chroma, _ = _hsv(np.array([[COLOURS[n] for n in names]], dtype=np.uint8))
    return names, hue[0], chroma[0]


@functools.lru_cache(maxsize=None)
def _unit_moments(shape: str) -> tuple[float, float, float, float]:
    """Centroid offset from the box centre and variances along x and y of ``shape`` in a unit box."""
    n = 512
    canvas = Image.new("L", (n, n), 0)
    _draw_outline(ImageDraw.Draw(canvas), shape, n / 2, n / 2, n, n)
    mask = np.asarray(canvas, dtype=np.float64) / 255.0
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / n - 0.5
    mass = mask.sum()
    mx, my = (mask * xs).sum() / mass, (mask * ys).sum() / mass
    var_x, var_y = (mask * (xs - mx) ** 2).sum() / mass, (mask * (ys - my) ** 2).sum() / mass
    return float(mx), float(my), float(var_x), float(var_y)


def _draw_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, w: float, h: float) -> None:
    kind, points = shape_outline(shape, 0.0, 0.0, 1.0)
    points = [(cx + x * w, cy + y * h) for x, y in points]
    (draw.ellipse if kind == "ellipse" else draw.polygon)(points, fill=255)


def _template(shape: str, cx: float, cy: float, w: float, h: float, window: tuple[int, int, int, int],
              blur: float) -> np.ndarray:
    """Pixel coverage of ``shape`` with box centre (cx, cy) and size (w, h), in pixels, over the window
    (y0, x0, height, width), blurred by a Gaussian of ``blur`` px (generated images are rarely crisp)."""
    y0, x0, height, width = window
    # enough sub-pixels for smooth edges on small objects, without drawing huge canvases for big ones
    s = max(2, min(_TEMPLATE_SUPERSAMPLE, 96 // max(height, width)))
    canvas = Image.new("L", (width * s, height * s), 0)
    _draw_outline(ImageDraw.Draw(canvas), shape, (cx - x0) * s, (cy - y0) * s, w * s, h * s)
    coverage = np.asarray(canvas.resize((width, height), Image.BOX), dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(coverage, blur, mode="constant") if blur > 0 else coverage


def _fit_shape(soft: np.ndarray, y0: int, x0: int) -> tuple[str | None, float, tuple[float, float, float, float]]:
    """Best (shape, soft IoU, (cx, cy, w, h)) for a soft mask whose top-left pixel is (y0, x0).

    For a shape and a blur sigma, the box follows from the mask's moments (blur adds sigma**2 to each
    variance). Sigma is searched on a 0.2 px grid up to ``_MAX_BLUR`` and then refined by 0.1 px: a wrong
    sigma turns a blurred diamond into a better-matching circle, so the search has to be fine."""
    height, width = soft.shape
    mass = float(soft.sum())
    ys, xs = np.mgrid[y0 : y0 + height, x0 : x0 + width] + 0.5
    mean_x, mean_y = float((soft * xs).sum() / mass), float((soft * ys).sum() / mass)
    var_x = float((soft * (xs - mean_x) ** 2).sum() / mass)
    var_y = float((soft * (ys - mean_y) ** 2).sum() / mass)
    best: tuple[str | None, float, tuple[float, float, float, float]] = (None, 0.0, (0.0, 0.0, 0.0, 0.0))
    for shape in SHAPES:
        mx, my, vx, vy = _unit_moments(shape)

        def score(blur: float) -> tuple[float, tuple[float, float, float, float]]:
            if blur < 0 or var_x <= blur**2 or var_y <= blur**2:
                return -1.0, (0.0, 0.0, 0.0, 0.0)
            w, h = math.sqrt((var_x - blur**2) / vx), math.sqrt((var_y - blur**2) / vy)
            cx, cy = mean_x - mx * w, mean_y - my * h
            template = _template(shape, cx, cy, w, h, (y0, x0, height, width), blur)
            iou = float(np.minimum(soft, template).sum() / max(float(np.maximum(soft, template).sum()), 1e-6))
            return iou, (cx, cy, w, h)

        grid = [0.2 * i for i in range(int(round(_MAX_BLUR / 0.2)) + 1)]
        scored = {blur: score(blur) for blur in grid}
        coarse = max(scored, key=lambda b: scored[b][0])
        for blur in (coarse - 0.1, coarse + 0.1):
            scored[blur] = score(blur)
        iou, box = max(scored.values(), key=lambda item: item[0])
        if iou > best[1]:
            best = (shape, iou, box)
    return best


def detect_objects(image: Any, config: ShapesEvalConfig | None = None) -> list[Detection]:
    """Coloured shapes in ``image`` (PIL, uint8 (H, W, 3) array or tensor (3, H, W) in [-1, 1]), most
    confident (highest template IoU) first.

    Per pixel, the *coverage* of the nearest-hue palette colour is its chroma over the palette colour's
    chroma: on a neutral background of any brightness an antialiased or blurred edge keeps the hue and
    scales the chroma by exactly the fraction covered. Pixels with coverage >= 0.5 seed connected
    components per colour; each component (grown by 2 px into fainter pixels of its colour) is compared as
    a soft mask with every shape's template fitted to its moments."""
    config = config or ShapesEvalConfig()
    rgb = to_uint8_rgb(image)
    height, width = rgb.shape[:2]
    hue, chroma, value = _hsv(rgb)
    names, palette_hue, palette_chroma = _palette()
    distance = np.abs(hue[..., None] - palette_hue)
    distance = np.minimum(distance, 360.0 - distance)
    nearest = distance.argmin(-1)
    has_hue = (distance.min(-1) <= config.max_hue_distance) & (value >= config.min_value)
    coverage = np.where(has_hue, np.clip(chroma / palette_chroma[nearest], 0.0, 1.0), 0.0)
    min_side = config.min_size * min(height, width)
    max_side = config.max_size * max(height, width)

    detections = []
    eight_connected = np.ones((3, 3), dtype=bool)  # keeps thin triangle tips attached
    for index, colour in enumerate(names):
        of_colour = nearest == index
        labels, count = ndimage.label(of_colour & (coverage >= 0.5), structure=eight_connected)
        if count == 0:
            continue
        # cheap pre-filter: noise gives thousands of specks; an object has at least ~0.4 * min_side**2 pixels
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        faint = of_colour & (coverage >= config.min_coverage)
        for label, slices in enumerate(ndimage.find_objects(labels), start=1):
            if sizes[label] < 0.4 * min_side**2:
                continue
            rows, cols = slices
            box_h, box_w = rows.stop - rows.start, cols.stop - cols.start
            if min(box_h, box_w) < min_side or max(box_h, box_w) > max_side:
                continue
            y0, y1 = max(rows.start - 3, 0), min(rows.stop + 3, height)
            x0, x1 = max(cols.start - 3, 0), min(cols.stop + 3, width)
            window_labels = labels[y0:y1, x0:x1]
            core = window_labels == label
            # grow into this colour's faint edge pixels, but never into a neighbouring object's core
            region = ndimage.binary_dilation(core, eight_connected, iterations=2) & faint[y0:y1, x0:x1]
            region &= (window_labels == 0) | core
            soft = np.where(region, coverage[y0:y1, x0:x1], 0.0).astype(np.float32)
            shape, iou, (cx, cy, w, h) = _fit_shape(soft, y0, x0)
            if shape is None or iou < config.min_iou:
                continue
            detections.append(
                Detection(
                    shape=shape,
                    colour=colour,
                    centre=(cx / width, cy / height),
                    area=float(soft.sum()) / (height * width),
                    box=((cx - w / 2) / width, (cy - h / 2) / height, (cx + w / 2) / width, (cy + h / 2) / height),
                    iou=iou,
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
        by_text = {p["prompt"]: p for p in _read_prompt_file(DEFAULT_VERSION)}
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
