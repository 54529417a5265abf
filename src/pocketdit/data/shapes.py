"""``shapes``: procedurally rendered scenes of coloured geometric shapes with captions.

A toy text-to-image dataset that a tiny model can learn in minutes on a laptop, and that can be scored
programmatically (``pocketdit.evaluate.shapes_eval``). Captions follow the six GenEval categories:

==============  ===============================================
category        example caption
==============  ===============================================
single_object   a photo of a circle
two_object      a photo of a circle and a square
counting        a photo of three triangles
colors          a photo of a blue square
position        a photo of a circle left of a square
color_attr      a photo of a red circle and a blue triangle
==============  ===============================================

Every scene is drawn from a NumPy generator seeded with ``(seed, index)`` only, so item ``i`` is the same
on every machine and in every worker, and no global RNG is touched.

A scene is a plain JSON-serialisable dict (kept as the sample's ``"meta"`` for evaluation)::

    {"category": "position",
     "objects": [{"shape": "circle", "colour": "red", "centre": [0.3, 0.52], "size": 0.31}, ...],
     "relation": {"subject": 0, "relation": "left of", "object": 1} or None}

``centre`` is in [0, 1] image coordinates (x to the right, y down) and ``size`` is the side of the shape's
square bounding box as a fraction of the image side. Shapes are axis-aligned; triangles point up.

The scene *spec* is what a caption says (category, shapes, colours that are named, counts, relation)
without a layout; ``layout_scene`` turns a spec into a scene. The ShapesEval prompt set stores specs, so a
ground-truth image for any prompt is ``render_scene(layout_scene(rng, spec), resolution)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .phrasing import PHRASINGS, phrase_scene
from .phrasing import canonical_caption as caption_for  # the GenEval-style caption, kept under its old name

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "COUNT_WORDS",
    "RELATIONS",
    "SHAPES",
    "ShapesDataset",
    "caption_for",
    "corrupt_scene",
    "counterfactual_scene",
    "layout_scene",
    "render_scene",
    "sample_scene",
    "sample_spec",
    "shape_outline",
]

# GenEval's category tags, in GenEval's column order.
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

# Axis-aligned shapes whose bounding-box templates differ enough to be told apart at ~7 px.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Saturated colours with well-separated hues (0, 30, 59, 132, 222, 278 degrees). The background is neutral,
# so antialiased edges keep their object's hue and only lose saturation, which the detector relies on.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 128, 0),
    "yellow": (230, 225, 0),
    "green": (20, 170, 50),
    "blue": (30, 90, 230),
    "purple": (140, 40, 200),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)  # counting prompts; a single object is the single_object category

# Layout constants, as fractions of the image side. Sizes are chosen so that the smallest object is still
# about 7 px across at 32x32 (the smallest resolution the detector is tested at).
_MARGIN = 0.04
_GAP = 0.08  # minimum empty space between bounding boxes, so same-coloured objects never touch
_SIZE_RANGES: dict[str, tuple[float, float]] = {
    "single_object": (0.36, 0.56),
    "colors": (0.36, 0.56),
    "two_object": (0.26, 0.38),
    "color_attr": (0.26, 0.38),
    "position": (0.26, 0.36),
    "counting": (0.22, 0.30),
}
_SUPERSAMPLE = 4
_MIN_RESOLUTION = 16


def _check_category(category: str) -> str:
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r} is not one of {CATEGORIES}")
    return category


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _distinct(rng: np.random.Generator, options: Sequence[Any], k: int) -> list[Any]:
    return [options[int(i)] for i in rng.choice(len(options), size=k, replace=False)]


def _category_weights(weights: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for category, weight in weights.items():
        if category not in CATEGORIES:
            raise ValueError(f"categories: {category!r} is not one of {CATEGORIES}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"categories: the weight of {category!r} must be a finite number >= 0, got {weight!r}")
        out[category] = float(weight)
    if not any(w > 0 for w in out.values()):
        raise ValueError(f"categories: at least one weight must be > 0, got {dict(weights)}")
    return out


def sample_spec(rng: np.random.Generator, category: str) -> dict:
    """Draws what a caption of ``category`` says: ``{"category", "objects": [{"shape", "colour", "count"}],
    "relation"}``. ``colour`` is None when the caption does not name it; ``relation`` is None except for
    ``position``, where it is ``{"subject": 0, "relation": "left of", "object": 1}``."""
    _check_category(category)
    relation = None
    if category == "single_object":
        objects = [{"shape": _choice(rng, SHAPES), "colour": None, "count": 1}]
    elif category == "two_object":
        objects = [{"shape": s, "colour": None, "count": 1} for s in _distinct(rng, SHAPES, 2)]
    elif category == "counting":
        objects = [{"shape": _choice(rng, SHAPES), "colour": None, "count": int(_choice(rng, COUNTS))}]
    elif category == "colors":
        objects = [{"shape": _choice(rng, SHAPES), "colour": _choice(rng, list(COLOURS)), "count": 1}]
    elif category == "position":
        objects = [{"shape": s, "colour": None, "count": 1} for s in _distinct(rng, SHAPES, 2)]
        relation = {"subject": 0, "relation": _choice(rng, RELATIONS), "object": 1}
    else:  # color_attr
        shapes, colours = _distinct(rng, SHAPES, 2), _distinct(rng, list(COLOURS), 2)
        objects = [{"shape": s, "colour": c, "count": 1} for s, c in zip(shapes, colours)]
    return {"category": category, "objects": objects, "relation": relation}


CONVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def corrupt_scene(scene: dict, rng: np.random.Generator) -> dict:
    """The same scene with one thing its caption binds changed, so the caption of the result is wrong for the
    image in exactly that respect: another shape (single_object, two_object), another count (counting), another
    colour (colors), the colours swapped between the objects (color_attr), the relation reversed (position)."""
    import copy

    s = copy.deepcopy(scene)
    objects, category = s["objects"], s["category"]
    if category in ("single_object", "two_object"):
        i = int(rng.integers(len(objects)))
        taken = {o["shape"] for o in objects}
        objects[i]["shape"] = _choice(rng, [x for x in SHAPES if x not in taken])
    elif category == "counting":  # a laid-out scene lists each object (the caption counts them)
        n = sum(int(o.get("count", 1)) for o in objects)
        m = int(_choice(rng, [c for c in COUNTS if c != n]))
        objects[:] = [dict(objects[i % len(objects)], count=1) for i in range(m)]
    elif category == "colors":
        objects[0]["colour"] = _choice(rng, [c for c in COLOURS if c != objects[0]["colour"]])
    elif category == "color_attr":
        objects[0]["colour"], objects[1]["colour"] = objects[1]["colour"], objects[0]["colour"]
    elif category == "position":
        s["relation"]["relation"] = CONVERSE_RELATIONS[s["relation"]["relation"]]
    else:
        _check_category(category)
    return s


def counterfactual_scene(scene: dict, rng: np.random.Generator) -> dict:
    """The same layout with one bound thing changed in the *image*, so that its own caption differs from the
    scene's in that one respect: ``corrupt_scene``'s change, and for ``position`` the two objects trade places
    (the relation reverses with them); a ``counting`` scene is laid out again with another count. Rendered next
    to the scene under the same noise, it makes a pair that only the caption's binding tells apart."""
    cf = corrupt_scene(scene, rng)
    if cf["category"] == "position":
        a, b = cf["objects"][0], cf["objects"][1]
        a["centre"], b["centre"] = b["centre"], a["centre"]
    elif cf["category"] == "counting":
        spec = {"category": "counting", "relation": None,
                "objects": [{"shape": cf["objects"][0]["shape"], "colour": None, "count": len(cf["objects"])}]}
        cf = {**layout_scene(rng, spec), **{k: v for k, v in scene.items() if k in ("seed", "index")}}
    return cf


def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """True when two square boxes (cx, cy, size) are separated by at least _GAP along some axis."""
    reach = (a[2] + b[2]) / 2 + _GAP
    return abs(a[0] - b[0]) >= reach or abs(a[1] - b[1]) >= reach


def _random_box(rng: np.random.Generator, size: float) -> tuple[float, float, float]:
    lo, hi = _MARGIN + size / 2, 1 - _MARGIN - size / 2
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), size


def _position_pair(rng: np.random.Generator, sizes: tuple[float, float], relation: str):
    """Places subject and object so that ``relation`` holds clearly: the offset along the relation's axis
    exceeds the two half-sizes plus the gap, and the cross-axis offset is at most 0.3 of it (so GenEval's
    rule finds the relation and no other)."""
    s_a, s_b = sizes
    for _ in range(1000):
        along = float(rng.uniform((s_a + s_b) / 2 + _GAP, 1 - 2 * _MARGIN - (s_a + s_b) / 2))
        across = float(rng.uniform(-0.3, 0.3)) * along
        sign = -1.0 if relation in ("left of", "above") else 1.0
        # offset = subject centre - object centre (y grows downwards, so "above" is negative)
        offset = (sign * along, across) if relation in ("left of", "right of") else (across, sign * along)
        # draw the object's centre where both boxes stay inside the margins
        lo_x = max(_MARGIN + s_b / 2, _MARGIN + s_a / 2 - offset[0])
        hi_x = min(1 - _MARGIN - s_b / 2, 1 - _MARGIN - s_a / 2 - offset[0])
        lo_y = max(_MARGIN + s_b / 2, _MARGIN + s_a / 2 - offset[1])
        hi_y = min(1 - _MARGIN - s_b / 2, 1 - _MARGIN - s_a / 2 - offset[1])
        if lo_x > hi_x or lo_y > hi_y:
            continue
        bx, by = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
        return (bx + offset[0], by + offset[1], s_a), (bx, by, s_b)
    raise RuntimeError(f"could not place a pair of sizes {sizes} for relation {relation!r}")


def layout_scene(rng: np.random.Generator, spec: dict) -> dict:
    """Gives a spec (see ``sample_spec``) a concrete layout: sizes, centres and colours for objects whose
    colour the caption leaves open. Objects never overlap and keep a gap between them."""
    category = _check_category(spec["category"])
    size_lo, size_hi = _SIZE_RANGES[category]
    wanted: list[tuple[str, str | None]] = []
    for obj in spec["objects"]:
        if obj["shape"] not in SHAPES:
            raise ValueError(f"shape={obj['shape']!r} is not one of {SHAPES}")
        if obj.get("colour") is not None and obj["colour"] not in COLOURS:
            raise ValueError(f"colour={obj['colour']!r} is not one of {tuple(COLOURS)}")
        wanted += [(obj["shape"], obj.get("colour"))] * int(obj.get("count", 1))
    colours = [c if c is not None else _choice(rng, list(COLOURS)) for _, c in wanted]

    relation = spec.get("relation")
    if relation is not None:
        if relation["relation"] not in RELATIONS:
            raise ValueError(f"relation={relation['relation']!r} is not one of {RELATIONS}")
        if len(wanted) != 2:
            raise ValueError(f"a position spec needs exactly two objects, got {len(wanted)}")
        sizes = (float(rng.uniform(size_lo, size_hi)), float(rng.uniform(size_lo, size_hi)))
        boxes = list(_position_pair(rng, sizes, relation["relation"]))
        if relation["subject"] == 1:  # the pair is built subject-first
            boxes.reverse()
    else:
        for _ in range(200):  # rejection sampling; a restart redraws the sizes as well
            boxes = []
            for _shape in wanted:
                size = float(rng.uniform(size_lo, size_hi))
                for _ in range(200):
                    box = _random_box(rng, size)
                    if all(_boxes_apart(box, other) for other in boxes):
                        boxes.append(box)
                        break
                else:
                    break
            if len(boxes) == len(wanted):
                break
        else:
            raise RuntimeError(f"could not lay out {len(wanted)} objects for category {category!r}")

    objects = [
        {"shape": shape, "colour": colour, "centre": [round(x, 4), round(y, 4)], "size": round(size, 4)}
        for (shape, _), colour, (x, y, size) in zip(wanted, colours, boxes)
    ]
    return {"category": category, "objects": objects, "relation": None if relation is None else dict(relation)}


def sample_scene(rng: np.random.Generator, category: str) -> dict:
    """A random scene of ``category``: ``layout_scene(rng, sample_spec(rng, category))``."""
    return layout_scene(rng, sample_spec(rng, category))


def shape_outline(shape: str, cx: float, cy: float, size: float) -> tuple[str, list[tuple[float, float]]]:
    """Geometry of a shape whose square bounding box has centre (cx, cy) and side ``size`` (any units).
    Returns ("ellipse", [top-left, bottom-right]) or ("polygon", vertices). Shared by the renderer and
    the detector's templates, so both agree on what each shape looks like."""
    half = size / 2
    left, top, right, bottom = cx - half, cy - half, cx + half, cy + half
    if shape == "circle":
        return "ellipse", [(left, top), (right, bottom)]
    if shape == "square":
        return "polygon", [(left, top), (right, top), (right, bottom), (left, bottom)]
    if shape == "triangle":
        return "polygon", [(cx, top), (right, bottom), (left, bottom)]
    if shape == "diamond":
        return "polygon", [(cx, top), (right, cy), (cx, bottom), (left, cy)]
    raise ValueError(f"shape={shape!r} is not one of {SHAPES}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    kind, points = shape_outline(shape, cx, cy, size)
    # PIL's coordinates address pixel corners for polygons but include the end pixel for ellipses; at 4x
    # supersampling the half-pixel difference is 1/8 px after downscaling, so it is ignored.
    if kind == "ellipse":
        draw.ellipse(points, fill=fill)
    else:
        draw.polygon(points, fill=fill)


def render_scene(scene: dict, resolution: int, supersample: int | None = None) -> Image.Image:
    """Renders a scene to an RGB PIL image of ``resolution`` x ``resolution``: drawn at ``supersample``
    times the size, then box-filtered down (exact area coverage, so edges keep the object's hue).
    ``supersample=None`` uses 4 up to 128 px and 2 above (edges are a smaller part of large images)."""
    if not isinstance(resolution, int) or resolution < _MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution!r} must be an int >= {_MIN_RESOLUTION}")
    if supersample is None:
        supersample = _SUPERSAMPLE if resolution <= 128 else 2
    if not isinstance(supersample, int) or supersample < 1:
        raise ValueError(f"supersample={supersample!r} must be a positive int")
    big = resolution * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        if obj["colour"] not in COLOURS:
            raise ValueError(f"colour={obj['colour']!r} is not one of {tuple(COLOURS)}")
        cx, cy = obj["centre"]
        _draw(draw, obj["shape"], cx * big, cy * big, obj["size"] * big, COLOURS[obj["colour"]])
    return canvas.resize((resolution, resolution), Image.BOX) if supersample > 1 else canvas


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


class ShapesDataset(Dataset):
    """Map-style dataset of rendered shape scenes.

    Item ``i`` depends only on ``(seed, i)``. Yields ``{"image": float (3, R, R) in [-1, 1], "caption": str,
    "meta": scene dict + {"seed", "index"}}``.

    Args:
        resolution: image side in pixels (>= 16; 32 and 64 are what the evaluator is tested at).
        length: number of items.
        seed: dataset seed; two datasets with different seeds share no scenes by construction.
        categories: which of ``CATEGORIES`` to draw from: a list (uniformly), a mapping category -> relative
            weight (e.g. ``{"position": 3, "color_attr": 3, "single_object": 0.5}``; an unnamed category gets
            weight 0, so it is never drawn) or None = all six uniformly.
        phrasing: "train" (default: captions in many phrasings, see ``pocketdit.data.phrasing``), "heldout"
            (the phrasings ShapesEval v2 judges on; not for training) or "canonical" (the one GenEval-style
            template of ``caption_for``). The caption of item ``i`` depends only on ``(seed, i)`` as well.
    """

    def __init__(
        self,
        resolution: int = 64,
        length: int = 10000,
        seed: int = 0,
        categories: Sequence[str] | Mapping[str, float] | None = None,
        phrasing: str = "train",
        negatives: bool = False,
        pairs: bool = False,
    ) -> None:
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing={phrasing!r} is not one of {PHRASINGS}")
        if not isinstance(resolution, int) or resolution < _MIN_RESOLUTION:
            raise ValueError(f"resolution={resolution!r} must be an int >= {_MIN_RESOLUTION}")
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length={length!r} must be a positive int")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if categories is None:
            categories = CATEGORIES
        if isinstance(categories, str):
            categories = [categories]
        weights = None
        if isinstance(categories, Mapping):
            weights = _category_weights(categories)
            categories = tuple(c for c in CATEGORIES if weights.get(c, 0) > 0)
        categories = tuple(categories)
        if not categories:
            raise ValueError(f"categories must name at least one of {CATEGORIES}")
        for category in categories:
            if category not in CATEGORIES:
                raise ValueError(f"categories: {category!r} is not one of {CATEGORIES}")
        # Uniform draws keep the integer draw (the scenes of every existing seed stay as they were); weighted
        # draws invert the cumulative distribution with one uniform number.
        self.category_weights = None if weights is None else {c: weights[c] for c in categories}
        self._cumulative = None
        if weights is not None:
            w = np.array([weights[c] for c in categories], dtype=np.float64)
            self._cumulative = np.cumsum(w / w.sum())
        self.resolution = resolution
        self.length = length
        self.seed = seed
        self.categories = categories
        self.phrasing = phrasing
        self.negatives = bool(negatives)
        self.pairs = bool(pairs)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> dict:
        """The scene of item ``index`` without rendering it."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        if self._cumulative is None:
            category = _choice(rng, self.categories)
        else:
            i = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
            category = self.categories[min(i, len(self.categories) - 1)]
        scene = sample_scene(rng, category)
        scene.update(seed=self.seed, index=index)
        return scene

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(int(index))
        image = render_scene(scene, self.resolution)
        item = {"image": pil_to_tensor(image), "caption": self.caption(int(index)), "meta": scene}
        if self.negatives:
            item["negative_caption"] = self.negative_caption(int(index))
        if self.pairs:
            cf = counterfactual_scene(scene, np.random.default_rng([self.seed, scene["index"], 3]))
            item["pair_image"] = pil_to_tensor(render_scene(cf, self.resolution))
            item["pair_caption"] = phrase_scene(cf, np.random.default_rng([self.seed, scene["index"], 1]), self.phrasing)
        return item

    def negative_caption(self, index: int) -> str:
        """A caption that is wrong for item ``index`` in one bound respect (``corrupt_scene``), in the same
        template as its caption (the same phrasing generator), for contrastive training."""
        scene = self.scene(index)
        wrong = corrupt_scene(scene, np.random.default_rng([self.seed, scene["index"], 2]))
        return phrase_scene(wrong, np.random.default_rng([self.seed, scene["index"], 1]), self.phrasing)

    def caption(self, index: int) -> str:
        """The caption of item ``index`` (its own generator, so scenes are the same in every phrasing)."""
        scene = self.scene(index)
        return phrase_scene(scene, np.random.default_rng([self.seed, scene["index"], 1]), self.phrasing)

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(resolution={self.resolution}, length={self.length}, seed={self.seed}, "
            f"categories={self.category_weights or list(self.categories)}, phrasing={self.phrasing!r}"
            f"{', negatives=True' if self.negatives else ''}{', pairs=True' if self.pairs else ''})"
        )
