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

Each image gets two verdicts:

- **GenEval rule** (``score_detections``): what the paper checks, for comparison with its numbers. Objects
  of other shapes are allowed everywhere; only ``counting`` rejects extra objects of the counted shape.
- **strict** (``score_strict``): exactly the named objects and nothing else (an object-sized coloured blob
  that matches no shape template counts as something else), and no detected shape whose box sides fall
  outside the sizes the dataset draws for the category (``SIZE_RANGES``, widened by ``SIZE_TOLERANCE`` for
  the detector's error). A model that scatters shapes, or paints one huge shape, passes the GenEval rule
  far more often than it passes this.

Per category, a score is the fraction of images that pass; the overall score is the mean of the six
category scores (GenEval's convention). Images of one prompt are correlated (same text, same ground
truth), so the 95 % intervals come from a cluster bootstrap over prompts (``summarise``).

Prompt sets are fixed and versioned (``pocketdit/evaluate/prompts/shapes_<version>.json``); never edit a
released version, add a new one. ``v2`` (the default, ``build_prompt_set``) phrases every spec in the
held-out phrasings of ``pocketdit.data.phrasing``, which the training generator never produces; ``v1`` is
100 canonical "a photo of ..." captions that are also training captions, kept for comparison.

Every image has its own seed, a hash of (base seed, prompt id, image index) (``image_seed``), so no two
prompts share a noise map and a text-blind model cannot score by painting one good layout.
"""

from __future__ import annotations

import copy
import functools
import itertools
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
    _SIZE_RANGES,
    CATEGORIES,
    COLOURS,
    COUNTS,
    RELATIONS,
    SHAPES,
    caption_for,
    layout_scene,
    render_scene,
    shape_outline,
)

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_VERSION",
    "Detection",
    "RULES",
    "SIZE_RANGES",
    "SIZE_TOLERANCE",
    "ShapesEvalConfig",
    "UNRECOGNISED",
    "build_prompt_set",
    "compare",
    "detect_objects",
    "evaluate",
    "evaluate_generator",
    "format_table",
    "ground_truth_fn",
    "image_seed",
    "load_prompts",
    "pipeline_generate_fn",
    "relative_position",
    "render_prompt",
    "save_grid",
    "score_detections",
    "score_image",
    "score_strict",
    "summarise",
    "to_uint8_rgb",
    "write_prompt_set",
]

DEFAULT_VERSION = "v2"
DEFAULT_STEPS = 28  # sampling steps models are judged at (issue 13), whatever their pipeline's default
RULES: tuple[str, ...] = ("geneval", "strict")
UNRECOGNISED = "unrecognised"  # Detection.shape of a blob that matches no shape template (strict rule only)
V2_SEED = 13  # build_prompt_set's seed for the shipped v2 file (issue 13)
V2_PROMPTS_PER_CATEGORY = 24  # = every colors spec and every position spec once; see build_prompt_set
# The box sides the dataset draws per category (fractions of the image side); a strict pass needs every
# detected side within [lo * (1 - SIZE_TOLERANCE), hi * (1 + SIZE_TOLERANCE)]. The detector's fitted sides
# are within +8 % of the drawn size on clean renders at 32 px and within -15 % .. +17 % on blurred, noisy
# ones (tests/evaluate: test_size_error_of_the_detector), hence 20 %.
SIZE_RANGES: dict[str, tuple[float, float]] = dict(_SIZE_RANGES)
SIZE_TOLERANCE = 0.2
BOOTSTRAP_REPLICATES = 2000
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


def load_prompts(version: str = DEFAULT_VERSION, phrasing: str | None = None) -> list[dict]:
    """The fixed prompt set ``version`` ("v2", "v1") or a prompt file (a path ending in ``.json``): a list of
    ``{"id", "prompt", "category", "objects": [{"shape", "colour" (or None), "count"}], "relation" (or
    None)}``, in file order (a fresh copy on every call).

    ``phrasing=None`` keeps the file's own phrasing (v2: held-out, v1: canonical); ``"canonical"`` replaces
    every prompt with the GenEval template of its spec ("a photo of ...", ``caption_for``), keeping ids, so
    the same specs and image seeds can be judged in both phrasings; ``"heldout"`` checks that the file is
    held-out phrasings (v1 is not)."""
    data = _read_prompt_file(version)
    prompts = copy.deepcopy(data["prompts"])
    stored = data.get("phrasing")  # None: a user's file that does not say
    if phrasing is None:
        return prompts
    if phrasing == "canonical":
        for prompt in prompts:
            prompt["prompt"] = caption_for(prompt)
        return prompts
    if phrasing == "heldout":
        if stored in ("heldout", None):
            return prompts
        raise ValueError(
            f"ShapesEval prompts {version!r} are {stored} phrasings, not held-out ones; use --prompts v2 (held-out "
            "phrasings of the same kind of specs) or phrasing='canonical'"
        )
    raise ValueError(f"phrasing={phrasing!r} must be 'heldout', 'canonical' or None (the prompt file's own)")


@functools.lru_cache(maxsize=None)
def _read_prompt_file(version: str) -> dict:
    """The parsed prompt file: a shipped version by name, or a JSON file by path."""
    is_file = version.endswith(".json") or "/" in version
    if is_file:
        path = Path(version)
        if not path.is_file():
            raise FileNotFoundError(f"ShapesEval prompt file {version!r} not found")
        name, text = str(path), path.read_text(encoding="utf-8")
    else:
        name = f"shapes_{version}.json"
        folder = resources.files("pocketdit.evaluate").joinpath("prompts")
        try:
            text = folder.joinpath(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            available = sorted(p.name for p in folder.iterdir() if p.name.startswith("shapes_"))
            raise FileNotFoundError(
                f"ShapesEval prompt set version={version!r} not found ({name}); available: {available}, "
                "or pass a .json file"
            ) from None
    try:
        data = json.loads(text)
        if isinstance(data, list):  # a bare list of prompt dicts
            data = {"prompts": data}
        prompts = data["prompts"]
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt)
            prompt.setdefault("id", f"prompt_{i:03d}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"ShapesEval prompt file {name} is corrupt: {error}") from error
    if not is_file:
        if data.get("version") != version:
            raise ValueError(f"{name} declares version {data.get('version')!r}, expected {version!r}")
        data.setdefault("phrasing", "canonical")  # v1 predates the key: GenEval's template
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"ShapesEval prompt file {name} repeats prompt ids (image seeds are derived from them)")
    return data


def _check_prompt(prompt: dict) -> dict:
    for key in ("prompt", "category", "objects"):
        if key not in prompt:
            raise ValueError(f"prompt dict is missing key {key!r}: {prompt!r}")
    if prompt["category"] not in CATEGORIES:
        raise ValueError(f"prompt {prompt['prompt']!r}: category {prompt['category']!r} is not one of {CATEGORIES}")
    return prompt


@functools.lru_cache(maxsize=None)
def _shipped_prompts_by_text() -> dict[str, dict]:
    """Prompt text -> prompt dict over every shipped version, in both its own and canonical phrasing."""
    folder = resources.files("pocketdit.evaluate").joinpath("prompts")
    by_text: dict[str, dict] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name, reverse=True):  # newest version wins
        if path.name.startswith("shapes_") and path.name.endswith(".json"):
            version = path.name.removeprefix("shapes_").removesuffix(".json")
            for phrasing in (None, "canonical"):
                for prompt in load_prompts(version, phrasing):
                    by_text.setdefault(prompt["prompt"], prompt)
    return by_text


def _as_prompt(prompt: dict | str, by_text: dict[str, dict] | None = None) -> dict:
    if isinstance(prompt, dict):
        return _check_prompt(prompt)
    by_text = _shipped_prompts_by_text() if by_text is None else by_text
    if prompt not in by_text:
        raise ValueError(
            f"prompt {prompt!r} is not in a shipped ShapesEval prompt set; pass the prompt dict from load_prompts() "
            "instead of its text"
        )
    return by_text[prompt]


def render_prompt(prompt: dict, resolution: int, seed: int = 0) -> Image.Image:
    """A ground-truth image for a prompt: a random layout (seeded by ``seed`` and the prompt text) that
    satisfies it, rendered like the ``shapes`` dataset."""
    prompt = _as_prompt(prompt)
    rng = np.random.default_rng([seed, zlib.crc32(prompt["prompt"].encode("utf-8"))])
    return render_scene(layout_scene(rng, prompt), resolution)


def ground_truth_fn(resolution: int, prompts: Sequence[dict] | None = None
                    ) -> Callable[[list[str], list[int]], list[Image.Image]]:
    """A ``generate_fn`` for ``evaluate_generator`` that returns ground-truth renders (the score's ceiling,
    for reference rows in tables). Prompt texts are looked up in ``prompts`` and the shipped sets."""
    by_text = dict(_shipped_prompts_by_text())
    by_text.update({p["prompt"]: p for p in prompts or []})

    def generate(texts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [render_prompt(_as_prompt(t, by_text), resolution, seed=s) for t, s in zip(texts, seeds)]

    return generate


# ------------------------------------------------------------------------------------- building v2


def _spec(category: str, objects: list[tuple[str, str | None, int]], relation: str | None = None) -> dict:
    return {
        "category": category,
        "objects": [{"shape": s, "colour": c, "count": n} for s, c, n in objects],
        "relation": None if relation is None else {"subject": 0, "relation": relation, "object": 1},
    }


def _spec_space(category: str) -> list[dict]:
    """Every distinct spec of ``category`` (``sample_spec``'s format), in a fixed order. Specs that say the
    same thing are listed once: two objects in either order, a relation said from either side."""
    pairs = list(itertools.combinations(SHAPES, 2))
    if category == "single_object":
        return [_spec(category, [(s, None, 1)]) for s in SHAPES]
    if category == "two_object":
        return [_spec(category, [(a, None, 1), (b, None, 1)]) for a, b in pairs]
    if category == "counting":
        return [_spec(category, [(s, None, n)]) for s in SHAPES for n in COUNTS]
    if category == "colors":
        return [_spec(category, [(s, c, 1)]) for s in SHAPES for c in COLOURS]
    if category == "position":
        return [_spec(category, [(a, None, 1), (b, None, 1)], r) for a, b in pairs for r in RELATIONS]
    return [_spec(category, [(a, c, 1), (b, d, 1)]) for a, b in pairs for c, d in itertools.permutations(COLOURS, 2)]


_CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def build_prompt_set(seed: int = V2_SEED, per_category: int = V2_PROMPTS_PER_CATEGORY,
                     phrasing: str = "heldout") -> dict:
    """The v2 prompt file's contents (``prompts/shapes_v2.json`` is ``build_prompt_set()``; a test checks it).

    Per category, ``per_category`` specs: distinct specs drawn without replacement where the category has
    that many (color_attr has 180), otherwise every spec equally often (single_object has 4, two_object 6,
    counting 12; colors and position have exactly 24, so the default covers each once). Object order and
    the side a relation is said from are drawn too, so the canonical phrasings vary as well. Each spec is
    phrased by ``pocketdit.data.phrasing.phrase_scene(spec, rng, phrasing)``, redrawn until the text is new
    in the set, so repeated specs get different sentences. Category ``i`` draws from
    ``default_rng([seed, i])`` alone: the categories do not depend on each other."""
    from pocketdit.data.phrasing import phrase_scene

    if per_category < 1:
        raise ValueError(f"per_category={per_category!r} must be >= 1")
    prompts, texts = [], set()
    for index, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, index])
        space = _spec_space(category)
        if len(space) >= per_category:
            order = [int(i) for i in rng.choice(len(space), size=per_category, replace=False)]
        else:  # whole shuffled rounds, so every spec appears floor or ceil(per_category / len) times
            order = []
            while len(order) < per_category:
                order += [int(i) for i in rng.permutation(len(space))]
            order = order[:per_category]
        for number, spec_index in enumerate(order):
            spec = copy.deepcopy(space[spec_index])
            if len(spec["objects"]) == 2 and rng.random() < 0.5:
                spec["objects"].reverse()
                if spec["relation"] is not None:
                    spec["relation"]["relation"] = _CONVERSE[spec["relation"]["relation"]]
            for _ in range(1000):
                text = phrase_scene(spec, rng, phrasing)
                if text not in texts:
                    break
            else:
                raise RuntimeError(f"no new {phrasing} phrasing of {caption_for(spec)!r} in 1000 draws")
            texts.add(text)
            prompts.append({"id": f"{category}_{number:02d}", "prompt": text, "canonical": caption_for(spec), **spec})
    return {
        "name": "ShapesEval",
        "version": "v2",
        "description": (
            "GenEval-style prompts for the pocketdit shapes dataset in phrasings held out from training "
            f"(pocketdit.evaluate.shapes_eval.build_prompt_set(seed={seed}, per_category={per_category})). "
            "Never edit; add a new version."
        ),
        "phrasing": phrasing,
        "seed": seed,
        "categories": list(CATEGORIES),
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "relations": list(RELATIONS),
        "prompts": prompts,
    }


def write_prompt_set(path: str | Path | None = None) -> Path:
    """Writes ``build_prompt_set()`` as the v2 prompt file (default: the package's ``prompts/shapes_v2.json``),
    one prompt per line like v1."""
    data = build_prompt_set()
    path = Path(path) if path is not None else Path(__file__).parent / "prompts" / "shapes_v2.json"
    header = {k: v for k, v in data.items() if k != "prompts"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in header.items()] + [' "prompts": [']
    lines += [f"  {json.dumps(p)}," for p in data["prompts"]]
    lines[-1] = lines[-1].rstrip(",")
    path.write_text("\n".join(lines + [" ]", "}"]) + "\n", encoding="utf-8")
    return path


def image_seed(seed: int, prompt_id: str, index: int) -> int:
    """The seed of image ``index`` of prompt ``prompt_id``: a hash of the three into [0, 2**32).

    Every image of every prompt gets its own noise (with ``seed + index`` for all prompts, 400 images were
    4 noise maps, and a model that ignores the text painted the same 4 layouts for every prompt). The id,
    not the position in the file, goes into the hash, so a prompt keeps its seeds when categories are
    filtered or the set is re-phrased (canonical vs held-out runs are paired image by image)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed!r} and index={index!r} must be >= 0")
    entropy = [int(seed), zlib.crc32(str(prompt_id).encode("utf-8")), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


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


def detect_objects(image: Any, config: ShapesEvalConfig | None = None, keep_unrecognised: bool = False
                   ) -> list[Detection]:
    """Coloured shapes in ``image`` (PIL, uint8 (H, W, 3) array or tensor (3, H, W) in [-1, 1]), most
    confident (highest template IoU) first. With ``keep_unrecognised``, object-sized blobs that match no
    shape template well enough come last, as ``shape=UNRECOGNISED`` with their pixel bounding box (the
    strict rule counts them as extra objects; GenEval's rule does not see them).

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
                if keep_unrecognised:
                    cx, cy = (cols.start + cols.stop) / 2, (rows.start + rows.stop) / 2
                    w, h = box_w, box_h
                    shape, iou = UNRECOGNISED, min(iou, config.min_iou)
                else:
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


def _relation_failures(prompt: dict, matched: list[list[Detection] | None]) -> list[str]:
    """GenEval's relation check: every matched subject stands in the relation to every matched object."""
    relation = prompt.get("relation")
    if relation is None:
        return []
    reasons = []
    for subject in matched[relation["subject"]] or []:
        for other in matched[relation["object"]] or []:
            found = relative_position(subject, other)
            if relation["relation"] not in found:
                reasons.append(f"expected {relation['relation']!r}, found {sorted(found) or 'no relation'}")
    return reasons


def score_detections(detections: Sequence[Detection], prompt: dict) -> tuple[bool, str]:
    """GenEval's per-prompt rule on a list of detections; returns (passed, reason of the first failure).

    Each object group needs at least ``count`` detections of its shape (of its colour, when the prompt names
    one); ``counting`` also needs no more than ``count``; ``position`` needs every subject detection to stand
    in the relation to every detection of the other group. Extra objects of other shapes are allowed."""
    prompt = _as_prompt(prompt)
    detections = [d for d in detections if d.shape != UNRECOGNISED]  # GenEval's detector sees only its classes
    matched: list[list[Detection] | None] = []
    passed, reasons = True, []
    for group in prompt["objects"]:
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
    if passed:
        reasons = _relation_failures(prompt, matched)
        passed = not reasons
    return passed, "; ".join(reasons)


def score_strict(detections: Sequence[Detection], prompt: dict, size_tolerance: float = SIZE_TOLERANCE
                 ) -> tuple[bool, str]:
    """The strict rule; returns (passed, reasons). The image must hold exactly the prompt's objects: as many
    detections as the prompt names objects, each group matched by exactly ``count`` detections of its shape
    (and colour, when named), the relation holding as in GenEval, and every detected box side within the
    category's ``SIZE_RANGES`` widened by ``size_tolerance`` (relative). So clutter, a missing or doubled
    object, or a shape blown up (or squashed) beyond what the dataset draws all fail. Pass the detections
    of ``detect_objects(..., keep_unrecognised=True)`` so that object-sized blobs of no known shape count
    as clutter too."""
    prompt = _as_prompt(prompt)
    reasons = []
    lo, hi = SIZE_RANGES[prompt["category"]]
    lo, hi = lo * (1 - size_tolerance), hi * (1 + size_tolerance)
    for d in detections:
        width, height = d.box[2] - d.box[0], d.box[3] - d.box[1]
        if d.shape == UNRECOGNISED:
            reasons.append(f"a {d.colour} blob of no known shape ({width:.2f} x {height:.2f})")
        elif not (lo <= width <= hi and lo <= height <= hi):
            reasons.append(f"{d.colour} {d.shape} is {width:.2f} x {height:.2f}, outside [{lo:.2f}, {hi:.2f}]")
    wanted = sum(int(g.get("count", 1)) for g in prompt["objects"])
    if len(detections) != wanted:
        named = sorted(f"{d.colour} {d.shape}" for d in detections)
        reasons.append(f"expected {wanted} object(s), found {len(detections)}: {named}")
    matched: list[list[Detection] | None] = []
    for group in prompt["objects"]:
        shape, colour, count = group["shape"], group.get("colour"), int(group.get("count", 1))
        found = [d for d in detections if d.shape == shape and colour in (None, d.colour)]
        if len(found) != count:
            reasons.append(f"expected {count} {f'{colour} {shape}' if colour else shape}(s), found {len(found)}")
            matched.append(None)
        else:
            matched.append(found)
    if not reasons:
        reasons = _relation_failures(prompt, matched)
    return not reasons, "; ".join(reasons)


def score_image(image: Any, prompt: dict | str, config: ShapesEvalConfig | None = None, rule: str = "geneval"
                ) -> bool:
    """Whether ``image`` satisfies ``prompt`` (a dict from ``load_prompts`` or its text) under ``rule``
    ("geneval" or "strict")."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")
    score = score_detections if rule == "geneval" else score_strict
    return score(detect_objects(image, config, keep_unrecognised=True), _as_prompt(prompt))[0]


def _score(image: Any, prompt: dict, config: ShapesEvalConfig | None) -> dict:
    """One image's per-image result (both rules, the detections, unrecognised blobs included)."""
    detections = detect_objects(image, config, keep_unrecognised=True)
    passed, reason = score_detections(detections, prompt)
    strict, strict_reason = score_strict(detections, prompt)
    return {
        "prompt": prompt["prompt"],
        "id": prompt.get("id"),
        "category": prompt["category"],
        "passed": passed,
        "reason": reason,
        "strict": strict,
        "strict_reason": strict_reason,
        "detections": [asdict(d) for d in detections],
    }


def evaluate(
    images: Sequence[Any],
    prompts: Sequence[dict | str],
    config: ShapesEvalConfig | None = None,
    progress: bool = False,
) -> dict:
    """Scores ``images[i]`` against ``prompts[i]`` (dicts from ``load_prompts``, or texts of shipped prompts);
    images of the same prompt id (or text) are one cluster of the bootstrap. Returns ``summarise``'s dict."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    results = []
    for image, prompt in tqdm(list(zip(images, prompts)), desc="ShapesEval", disable=not progress):
        results.append(_score(image, _as_prompt(prompt), config))
    return summarise(results)


# ------------------------------------------------------------------------------------------ intervals


def _clusters(results: Sequence[dict], category: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Prompt keys of a category, per rule the passes per prompt, and the images per prompt."""
    keys: dict[str, list[dict]] = {}
    for r in results:
        if r["category"] == category:
            keys.setdefault(str(r["id"] if r.get("id") is not None else r["prompt"]), []).append(r)
    passes = {rule: np.array([sum(bool(r[_FIELD[rule]]) for r in rs) for rs in keys.values()], dtype=np.float64)
              for rule in RULES}
    return list(keys), passes, np.array([len(rs) for rs in keys.values()], dtype=np.float64)


_FIELD = {"geneval": "passed", "strict": "strict"}


def _interval(mean: float, draws: np.ndarray, level: float) -> dict:
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi)}


def summarise(results: Sequence[dict], replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0,
              level: float = 0.95) -> dict:
    """Per-category and overall scores under both rules, with cluster-bootstrap intervals.

    A category's score is the fraction of its images that pass; overall is the mean of the category scores
    (GenEval's convention, so a category with more prompts does not weigh more). The images of one prompt
    share its text and ground truth, so they are not independent draws: each bootstrap replicate resamples
    the *prompts* of every category with replacement (stratified by category, all images of a drawn prompt
    kept), and the interval is the replicates' central ``level`` quantile range. The same resampled prompts
    serve both rules and the overall score, and ``default_rng(seed)`` makes the intervals reproducible.

    Returns ``{"scores": {rule: {"overall": {"mean", "lo", "hi"}, "categories": {category: {"mean", "lo",
    "hi"}}}}, "interval": {...how...}, "num_images": {category: n}, "num_prompts": {category: n},
    "overall": GenEval-rule overall, "categories": {category: GenEval-rule score}, "strict_overall",
    "strict_categories", "results": results}``. The flat keys repeat the means (older readers use them).
    Categories with no images are left out of every table and mean."""
    if replicates < 1:
        raise ValueError(f"replicates={replicates!r} must be >= 1")
    rng = np.random.default_rng(seed)
    scores = {rule: {"overall": None, "categories": {}} for rule in RULES}
    draws = {rule: [] for rule in RULES}
    num_images, num_prompts = {}, {}
    for category in CATEGORIES:
        keys, passes, counts = _clusters(results, category)
        if not keys:
            continue
        num_images[category], num_prompts[category] = int(counts.sum()), len(keys)
        picks = rng.integers(0, len(keys), size=(replicates, len(keys)))
        for rule in RULES:
            category_draws = passes[rule][picks].sum(1) / counts[picks].sum(1)
            draws[rule].append(category_draws)
            scores[rule]["categories"][category] = _interval(passes[rule].sum() / counts.sum(), category_draws, level)
    for rule in RULES:
        means = [s["mean"] for s in scores[rule]["categories"].values()]
        if means:
            scores[rule]["overall"] = _interval(float(np.mean(means)), np.mean(draws[rule], axis=0), level)
        else:
            scores[rule]["overall"] = {"mean": math.nan, "lo": math.nan, "hi": math.nan}
    flat = {rule: {c: s["mean"] for c, s in scores[rule]["categories"].items()} for rule in RULES}
    return {
        "scores": scores,
        "interval": {"level": level, "replicates": replicates, "seed": seed,
                     "method": "percentile cluster bootstrap: prompts resampled within each category, all their images kept"},
        "num_images": num_images,
        "num_prompts": num_prompts,
        "overall": scores["geneval"]["overall"]["mean"],
        "categories": flat["geneval"],
        "strict_overall": scores["strict"]["overall"]["mean"],
        "strict_categories": flat["strict"],
        "results": list(results),
    }


def compare(base: dict, other: dict, rule: str = "strict", replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0,
            level: float = 0.95) -> dict:
    """``other - base`` for two results on the same prompts (and, for a paired comparison, the same image
    seeds), with a paired cluster-bootstrap interval: the same resampled prompts score both models, so the
    noise the two share (hard prompts, lucky seeds) cancels. Returns ``{"overall": {"mean", "lo", "hi"},
    "categories": {category: {...}}}``; a difference whose interval excludes 0 is resolved."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")
    rng = np.random.default_rng(seed)
    out, draws = {"categories": {}}, []
    for category in CATEGORIES:
        keys_a, passes_a, counts_a = _clusters(base["results"], category)
        keys_b, passes_b, counts_b = _clusters(other["results"], category)
        if keys_a != keys_b or not np.array_equal(counts_a, counts_b):
            raise ValueError(f"{category}: the two results do not cover the same prompts with the same image counts")
        if not keys_a:
            continue
        diff = (passes_b[rule] - passes_a[rule])
        picks = rng.integers(0, len(keys_a), size=(replicates, len(keys_a)))
        category_draws = diff[picks].sum(1) / counts_a[picks].sum(1)
        draws.append(category_draws)
        out["categories"][category] = _interval(diff.sum() / counts_a.sum(), category_draws, level)
    if not draws:
        raise ValueError("the results have no images")
    means = [s["mean"] for s in out["categories"].values()]
    out["overall"] = _interval(float(np.mean(means)), np.mean(draws, axis=0), level)
    return out


# ------------------------------------------------------------------------------------------ generating


def pipeline_generate_fn(pipe, resolution: int, num_steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
                         shift: float | None = None) -> Callable[[list[str], list[int]], torch.Tensor]:
    """A ``generate_fn`` for ``evaluate_generator`` from a ``PocketDiTPipeline`` (a diffusers pipeline).

    All per-image noise goes through ``_per_image_generators``: one ``torch.Generator`` per image, so image
    i's noise depends on its own seed only, not on the batch it lands in. ``shift`` (None: the pipeline's
    scheduler as it is) swaps in a copy of the scheduler for the call and puts the original back.
    Returns images in [-1, 1] (the diffusers call's "pt" output is in [0, 1])."""
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        scheduler = pipe.scheduler
        if shift is not None:
            pipe.scheduler = type(scheduler).from_config(scheduler.config, shift=float(shift))
        try:
            images = pipe(
                prompt=list(prompts), num_inference_steps=num_steps, guidance_scale=guidance_scale,
                height=resolution, width=resolution, generator=_per_image_generators(seeds), output_type="pt",
            ).images
        finally:
            pipe.scheduler = scheduler
        return images.float().cpu() * 2 - 1

    return generate


def _per_image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its own seed (the diffusers way to fix each image's noise)."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


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
    phrasing: str | None = None,
    prompts: Sequence[dict] | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> dict:
    """Generates ``images_per_prompt`` images for every prompt of the set and scores them (GenEval uses 4).

    ``generate_fn(prompts, seeds)`` gets a batch of prompt texts and one integer seed per image
    (``image_seed(seed, prompt id, k)`` for image k of a prompt: distinct across prompts and images, equal
    across models and phrasings, so runs are paired) and returns a tensor (B, 3, H, W) in [-1, 1] or a list
    of PIL images / uint8 arrays, with H = W = ``resolution``. The prompts are ``load_prompts(version,
    phrasing)``, or ``prompts`` (dicts with an ``"id"``) when given. The result is ``summarise``'s dict plus ``"resolution"``,
    ``"version"``, ``"phrasing"``, ``"images_per_prompt"``, ``"seed"``, and ``"images"`` (uint8 arrays)
    when ``return_images``."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt={images_per_prompt!r} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if prompts is None:
        prompts = load_prompts(version, phrasing)
        phrasing = phrasing or _read_prompt_file(version).get("phrasing")
    else:
        prompts = [_check_prompt(p) for p in prompts]
        version = "custom"
    if categories is not None:
        unknown = sorted(set(categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"categories: {unknown} not in {CATEGORIES}")
        prompts = [p for p in prompts if p["category"] in set(categories)]
    jobs = [(p, image_seed(seed, p.get("id", p["prompt"]), k)) for p in prompts for k in range(images_per_prompt)]
    results, images = [], []
    with tqdm(total=len(jobs), desc=f"ShapesEval {version} @ {resolution}px", unit="img") as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            outputs = generate_fn([p["prompt"] for p, _ in batch], [s for _, s in batch])
            if len(outputs) != len(batch):
                raise ValueError(f"generate_fn returned {len(outputs)} images for a batch of {len(batch)}")
            for (prompt, image_seed_), output in zip(batch, outputs):
                rgb = to_uint8_rgb(output)
                if rgb.shape[:2] != (resolution, resolution):
                    raise ValueError(
                        f"generate_fn returned a {rgb.shape[1]}x{rgb.shape[0]} image, expected "
                        f"{resolution}x{resolution} (the resolution passed to evaluate_generator)"
                    )
                result = _score(rgb, prompt, config)
                result["seed"] = image_seed_
                results.append(result)
                if return_images:
                    images.append(rgb)
            bar.update(len(batch))
            bar.set_postfix(passed=f"{sum(r['passed'] for r in results) / len(results):.3f}",
                            strict=f"{sum(r['strict'] for r in results) / len(results):.3f}")
    summary = summarise(results, replicates=replicates, seed=seed)
    summary.update(resolution=resolution, version=version, phrasing=phrasing, images_per_prompt=images_per_prompt,
                   seed=seed)
    if return_images:
        summary["images"] = images
    return summary


def format_table(result: dict) -> str:
    """A plain-text table of ``summarise``'s scores: per category the prompts, images and both rules'
    mean [95 % interval], then the overall row."""
    level = round(100 * result.get("interval", {}).get("level", 0.95))
    header = f"{'category':14s} {'prompts':>7s} {'images':>6s}   {'GenEval rule':22s} {'strict':22s}"
    lines = [header, "-" * len(header)]

    def cell(score: dict) -> str:
        return f"{score['mean']:.3f} [{score['lo']:.3f}, {score['hi']:.3f}]"

    scores = result["scores"]
    for category in scores["geneval"]["categories"]:
        lines.append(
            f"{category:14s} {result['num_prompts'][category]:7d} {result['num_images'][category]:6d}   "
            f"{cell(scores['geneval']['categories'][category]):22s} {cell(scores['strict']['categories'][category]):22s}"
        )
    lines.append(
        f"{'overall':14s} {sum(result['num_prompts'].values()):7d} {sum(result['num_images'].values()):6d}   "
        f"{cell(scores['geneval']['overall']):22s} {cell(scores['strict']['overall']):22s}"
    )
    lines.append(f"(mean [{level} % interval, cluster bootstrap over prompts]; overall = mean of the categories)")
    return "\n".join(lines)


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
    strict: Sequence[bool] | None = None,
) -> Path:
    """Writes a labelled grid PNG: each image upscaled (nearest) to ``cell`` px, its prompt below, and a
    green (pass) or red (fail) frame when ``passed`` is given (e.g. ``[r["passed"] for r in
    result["results"]]``); with ``strict`` too, images that pass the GenEval rule but not the strict one
    get an orange frame. Returns the path."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if passed is not None and len(passed) != len(images):
        raise ValueError(f"got {len(passed)} pass/fail flags for {len(images)} images")
    if strict is not None and (passed is None or len(strict) != len(images)):
        raise ValueError("strict flags need passed flags too, one of each per image")
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
            if passed[i] and strict is not None and not strict[i]:
                frame = (240, 150, 0)
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
