"""Tests for ShapesEval: the detector and the GenEval-style scoring, on the v1 prompts (canonical captions).
The v2 prompt set, the strict rule, the seeds and the intervals: test_shapes_eval_v2.py."""

import numpy as np
import pytest
import torch

from pocketdit.data.shapes import CATEGORIES, COLOURS, SHAPES, caption_for, render_scene
from pocketdit.evaluate.shapes_eval import (
    detect_objects,
    evaluate,
    evaluate_generator,
    ground_truth_fn,
    image_seed,
    load_prompts,
    render_prompt,
    save_grid,
    score_image,
)

PROMPTS = load_prompts("v1")


def _prompt(text):
    return next(p for p in PROMPTS if p["prompt"] == text)


def _scene(*objects, category="two_object", relation=None):
    return {
        "category": category,
        "objects": [{"shape": s, "colour": c, "centre": list(xy), "size": size} for s, c, xy, size in objects],
        "relation": relation,
    }


def test_prompt_set_is_fixed_and_consistent():
    assert len(PROMPTS) == 100
    assert len({p["id"] for p in PROMPTS}) == len({p["prompt"] for p in PROMPTS}) == 100
    counts = {c: sum(p["category"] == c for p in PROMPTS) for c in CATEGORIES}
    assert counts == {"single_object": 4, "two_object": 12, "counting": 12, "colors": 24, "position": 24,
                      "color_attr": 24}
    for p in PROMPTS:
        assert caption_for(p) == p["prompt"]  # the stored spec says exactly what the text says
    with pytest.raises(FileNotFoundError, match="v0"):
        load_prompts("v0")
    mutated = load_prompts("v1")
    mutated[0]["prompt"] = "changed"
    assert load_prompts("v1")[0]["prompt"] == PROMPTS[0]["prompt"]  # callers get copies


@pytest.mark.parametrize("resolution", [32, 64])
def test_ground_truth_renders_score_at_least_098(resolution):
    for seed in (0, 1):
        images = [render_prompt(p, resolution, seed=seed) for p in PROMPTS]
        result = evaluate(images, PROMPTS)
        failures = [(r["prompt"], r["reason"]) for r in result["results"] if not r["passed"]]
        assert result["overall"] >= 0.98, failures
        assert result["strict_overall"] >= 0.98, [(r["prompt"], r["strict_reason"]) for r in result["results"]]
        assert set(result["categories"]) == set(CATEGORIES)
        assert min(result["categories"].values()) >= 0.9, result["categories"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_noise_and_blank_images_score_near_zero(resolution):
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(3, resolution, resolution, generator=generator).clamp(-1, 1) for _ in PROMPTS]
    assert evaluate(noise, PROMPTS)["overall"] <= 0.05
    for value in (-1.0, 0.0, 1.0):  # black, grey, white
        blank = [torch.full((3, resolution, resolution), value) for _ in PROMPTS]
        result = evaluate(blank, PROMPTS)
        assert result["overall"] == 0.0
        assert all(r["detections"] == [] for r in result["results"])


def test_detector_recognises_every_shape_and_colour():
    for shape in SHAPES:
        for colour in COLOURS:
            image = render_scene(_scene((shape, colour, (0.5, 0.5), 0.3), category="colors"), 32)
            detections = detect_objects(image)
            assert [(d.shape, d.colour) for d in detections] == [(shape, colour)]
            (cx, cy), area = detections[0].centre, detections[0].area
            assert abs(cx - 0.5) < 0.04 and abs(cy - 0.5) < 0.04
            assert 0.02 < area < 0.09 + 0.02


def test_input_formats_agree():
    image = render_prompt(PROMPTS[0], 32, seed=0)
    array = np.array(image)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    uint8_tensor = torch.from_numpy(array).permute(2, 0, 1)
    expected = detect_objects(image)
    assert len(expected) == 1
    assert detect_objects(array) == expected == detect_objects(tensor) == detect_objects(uint8_tensor)
    with pytest.raises(ValueError, match="uint8"):
        detect_objects(array.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect_objects(tensor[0])


def test_wrong_colour_fails():
    prompt = _prompt("a photo of a blue square")
    right = render_scene(_scene(("square", "blue", (0.5, 0.5), 0.4), category="colors"), 32)
    wrong = render_scene(_scene(("square", "red", (0.5, 0.5), 0.4), category="colors"), 32)
    assert score_image(right, prompt) and not score_image(wrong, prompt)
    attr = next(p for p in PROMPTS if p["category"] == "color_attr")
    (a, b) = attr["objects"]
    good = _scene((a["shape"], a["colour"], (0.3, 0.5), 0.3), (b["shape"], b["colour"], (0.7, 0.5), 0.3))
    swapped = _scene((a["shape"], b["colour"], (0.3, 0.5), 0.3), (b["shape"], a["colour"], (0.7, 0.5), 0.3))
    assert score_image(render_scene(good, 64), attr)
    assert not score_image(render_scene(swapped, 64), attr)


def test_wrong_count_fails():
    prompt = _prompt("a photo of three triangles")
    centres = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    for n in (2, 3, 4):
        scene = _scene(*[("triangle", "green", c, 0.26) for c in centres[:n]], category="counting")
        assert score_image(render_scene(scene, 32), prompt) == (n == 3)


def test_swapped_position_fails():
    for prompt in (p for p in PROMPTS if p["category"] == "position"):
        _check_position_prompt(prompt)


def _check_position_prompt(prompt):
    subject, other = prompt["objects"][0]["shape"], prompt["objects"][1]["shape"]
    relation = prompt["relation"]["relation"]
    near, far = (0.28, 0.5), (0.72, 0.5)
    if relation in ("above", "below"):
        near, far = near[::-1], far[::-1]
    first, second = (near, far) if relation in ("left of", "above") else (far, near)
    right = _scene((subject, "red", first, 0.3), (other, "blue", second, 0.3), category="position")
    swapped = _scene((subject, "red", second, 0.3), (other, "blue", first, 0.3), category="position")
    assert score_image(render_scene(right, 32), prompt)
    assert not score_image(render_scene(swapped, 32), prompt)


def test_missing_object_fails_two_object_prompt():
    prompt = next(p for p in PROMPTS if p["category"] == "two_object")
    a, b = prompt["objects"][0]["shape"], prompt["objects"][1]["shape"]
    both = _scene((a, "purple", (0.3, 0.3), 0.3), (b, "orange", (0.7, 0.7), 0.3))
    only_a = _scene((a, "purple", (0.3, 0.3), 0.3), (a, "orange", (0.7, 0.7), 0.3))
    assert score_image(render_scene(both, 32), prompt)
    assert not score_image(render_scene(only_a, 32), prompt)


def test_evaluate_generator_and_grid(tmp_path):
    by_text = {p["prompt"]: p for p in PROMPTS}
    calls = []

    def ground_truth(prompts, seeds):
        calls.append(len(prompts))
        return torch.stack([
            torch.from_numpy(np.array(render_prompt(by_text[p], 32, seed=s))).permute(2, 0, 1).float() / 127.5 - 1
            for p, s in zip(prompts, seeds)
        ])

    result = evaluate_generator(ground_truth, resolution=32, images_per_prompt=2, batch_size=7, version="v1",
                                categories=["counting", "colors"], return_images=True)
    assert sum(calls) == 2 * (12 + 24) and max(calls) <= 7
    assert set(result["categories"]) == {"counting", "colors"}
    assert result["num_images"] == {"counting": 24, "colors": 48}
    assert result["overall"] >= 0.98
    first = result["results"][0]["id"]
    assert [r["seed"] for r in result["results"][:2]] == [image_seed(0, first, 0), image_seed(0, first, 1)]
    assert result["version"] == "v1" and result["phrasing"] == "canonical"

    position = evaluate_generator(ground_truth_fn(32), resolution=32, images_per_prompt=1, version="v1",
                                  categories=["position"])
    assert position["num_images"] == {"position": 24} and position["overall"] >= 0.98

    def blank(prompts, seeds):
        return torch.zeros(len(prompts), 3, 32, 32)

    assert evaluate_generator(blank, resolution=32, images_per_prompt=1, version="v1")["overall"] == 0.0
    with pytest.raises(ValueError, match="32x32"):
        evaluate_generator(lambda p, s: torch.zeros(len(p), 3, 16, 16), resolution=32, images_per_prompt=1)

    images = result["images"][:10]
    path = save_grid(images, [r["prompt"] for r in result["results"][:10]], tmp_path / "grid.png",
                     passed=[r["passed"] for r in result["results"][:10]], columns=5, cell=64)
    from PIL import Image

    grid = Image.open(path)
    assert grid.size[0] == 5 * (64 + 8) and grid.size[1] == 2 * (64 + 8 + 40)
    # the first tile is framed in green (passed)
    assert grid.getpixel((1, 1)) == (30, 160, 60)


def _degrade(image, blur, noise, tint, seed):
    """Blur, pixel noise and a warm background tint: roughly what a small generator's samples look like."""
    from scipy import ndimage

    array = np.asarray(image).astype(np.float32)
    array = ndimage.gaussian_filter(array, sigma=(blur, blur, 0))
    array += np.random.default_rng(seed).normal(0.0, noise * 127.5, array.shape)
    array -= np.array([0.0, tint / 2, tint])  # white -> cream
    return np.clip(array.round(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resolution, blur", [(32, 0.8), (64, 1.2)])
def test_degraded_ground_truth_still_scores_high(resolution, blur):
    images = [_degrade(render_prompt(p, resolution, seed=3), blur, 0.05, 20, seed=i) for i, p in enumerate(PROMPTS)]
    result = evaluate(images, PROMPTS)
    assert result["overall"] >= 0.98, [(r["prompt"], r["reason"]) for r in result["results"] if not r["passed"]]


def test_colour_field_filling_the_image_is_not_an_object():
    for colour in COLOURS.values():
        field = np.empty((32, 32, 3), dtype=np.uint8)
        field[:] = colour
        assert detect_objects(field) == []
    with pytest.raises(ValueError, match="min_iou"):
        from pocketdit.evaluate.shapes_eval import ShapesEvalConfig

        ShapesEvalConfig(min_iou=1.5)
