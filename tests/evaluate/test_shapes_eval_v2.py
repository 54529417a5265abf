"""ShapesEval v2: the held-out prompt set (shipped file = builder, no training caption), per-image seeds, the
strict rule next to GenEval's, the cluster-bootstrap intervals, and the pipeline adapter."""

import copy
import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from pocketdit.data import phrasing
from pocketdit.data.shapes import CATEGORIES, ShapesDataset, caption_for, render_scene
from pocketdit.evaluate import shapes_eval
from pocketdit.evaluate.shapes_eval import (
    SIZE_RANGES,
    SIZE_TOLERANCE,
    build_prompt_set,
    compare,
    detect_objects,
    evaluate,
    evaluate_generator,
    format_table,
    ground_truth_fn,
    image_seed,
    load_prompts,
    render_prompt,
    score_detections,
    score_strict,
    summarise,
)
from pocketdit.evaluate.shapes_reference import cluttered_fn

V2 = load_prompts("v2")


def _scene(*objects, category, relation=None):
    return {
        "category": category,
        "objects": [{"shape": s, "colour": c, "centre": list(xy), "size": size} for s, c, xy, size in objects],
        "relation": relation,
    }


def _verdicts(image, prompt):
    detections = detect_objects(image, keep_unrecognised=True)
    return score_detections(detections, prompt)[0], score_strict(detections, prompt)[0]


# ------------------------------------------------------------------------------------------ prompt set


def test_shipped_v2_file_is_what_the_builder_produces():
    from importlib import resources

    shipped = json.loads(resources.files("pocketdit.evaluate").joinpath("prompts/shapes_v2.json").read_text())
    assert shipped == build_prompt_set(), "regenerate: python -c 'from pocketdit.evaluate.shapes_eval import " \
                                          "write_prompt_set; write_prompt_set()'"
    assert shapes_eval.DEFAULT_VERSION == "v2" and load_prompts() == V2


def test_v2_is_balanced_distinct_and_its_specs_match_their_canonical_text():
    assert Counter(p["category"] for p in V2) == {c: 24 for c in CATEGORIES}
    assert len({p["prompt"] for p in V2}) == len({p["id"] for p in V2}) == len(V2) == 144
    for category in CATEGORIES:
        specs = [json.dumps([p["objects"], p["relation"]]) for p in V2 if p["category"] == category]
        space = len(shapes_eval._spec_space(category))
        counts = Counter(_meaning(p) for p in V2 if p["category"] == category)
        # distinct specs where the category has 24 or more, otherwise every spec equally often
        assert len(counts) == min(space, 24), category
        assert max(counts.values()) - min(counts.values()) <= 1, category
        assert len(specs) == 24
    for p in V2:
        assert p["canonical"] == caption_for(p)
    # the canonical option: the same ids and specs in the GenEval template
    canonical = load_prompts("v2", phrasing="canonical")
    assert [p["id"] for p in canonical] == [p["id"] for p in V2]
    assert all(c["prompt"] == p["canonical"] and c["prompt"].startswith("a photo of ") for c, p in zip(canonical, V2))


def _meaning(prompt):
    """What a spec says, independent of object order and of the side a relation is said from."""
    objects = [(o["shape"], o["colour"], o["count"]) for o in prompt["objects"]]
    relation = prompt["relation"]
    if relation is None:
        return tuple(sorted(objects, key=str))
    subject, other, rel = objects[relation["subject"]], objects[relation["object"]], relation["relation"]
    if str(subject) > str(other):
        subject, other, rel = other, subject, {"left of": "right of", "right of": "left of", "above": "below",
                                                "below": "above"}[rel]
    return subject, rel, other


def _training_caption_pattern():
    """A regex that matches every caption the training generator can produce (train frame x train body, with
    each field's exact vocabulary), so a v2 prompt that does not match it cannot be a training caption."""
    words = lambda options: "(?:" + "|".join(re.escape(w) for w in sorted(set(options), key=len, reverse=True)) + ")"
    shape = words([w for ws in phrasing.SHAPE_WORDS.values() for w in ws])
    colour = words(["red", "orange", "yellow", "green", "blue", "purple"])
    fields = {
        "a": f"an? {shape}", "b": f"an? {shape}", "s": shape, "t": shape, "c": colour, "d": colour,
        "ca": f"an? {colour} {shape}", "cb": f"an? {colour} {shape}",
        "n": words([w for ws in phrasing.NUMBER_WORDS.values() for w in ws]),
        "p": words(phrasing.PLURAL_WORDS.values()),
        "r": words([w for ws in phrasing.RELATION_WORDS.values() for w in ws]),
    }

    def template(text):
        parts = re.split(r"\{(\w*)\}", text)
        return "".join(re.escape(part) if i % 2 == 0 else ("{}" if part == "" else fields[part])
                       for i, part in enumerate(parts))

    bodies = [template(b) for bs in phrasing.BODIES.values() for b, split in bs if split == "train"]
    frames = [template(f) for f, split in phrasing.FRAMES if split == "train"]
    body = "(?:" + "|".join(bodies) + ")"
    return re.compile("|".join("(?:" + f.replace(re.escape("{}"), "{}").replace("{}", body) + ")" for f in frames))


def test_no_v2_prompt_is_a_training_caption():
    pattern = _training_caption_pattern()
    # the pattern does match training captions, so it is a real test
    train = {ShapesDataset(resolution=16, length=20000, seed=s, phrasing="train").caption(i)
             for s in (0, 1) for i in range(4000)}
    assert all(pattern.fullmatch(c) for c in itertools.islice(train, 2000))
    leaked = [p["prompt"] for p in V2 if pattern.fullmatch(p["prompt"]) or p["prompt"] in train]
    assert not leaked
    # and the canonical phrasing of the same specs is (by design) a training frame x body
    assert all(pattern.fullmatch(p["canonical"]) for p in V2)


def test_prompt_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not held-out"):
        load_prompts("v1", phrasing="heldout")
    with pytest.raises(ValueError, match="phrasing"):
        load_prompts("v2", phrasing="train")
    with pytest.raises(FileNotFoundError, match="v0"):
        load_prompts("v0")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_prompts(str(tmp_path / "missing.json"))
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps([{"prompt": "draw a red circle", "category": "colors",
                                   "objects": [{"shape": "circle", "colour": "red", "count": 1}], "relation": None}]))
    (loaded,) = load_prompts(str(custom))
    assert loaded["id"] == "prompt_000" and load_prompts(str(custom), "canonical")[0]["prompt"] == "a photo of a red circle"
    assert load_prompts(str(custom), "heldout") == [loaded]  # a file that does not say is taken as written
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "category": "nope", "objects": []}]))
    with pytest.raises(ValueError, match="nope"):
        load_prompts(str(bad))


# -------------------------------------------------------------------------------------------- seeds


def test_every_image_of_every_prompt_has_its_own_seed():
    seeds = [image_seed(0, p["id"], k) for p in V2 for k in range(4)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**32 for s in seeds)
    assert image_seed(0, "colors_03", 1) == image_seed(0, "colors_03", 1) != image_seed(1, "colors_03", 1)
    with pytest.raises(ValueError):
        image_seed(-1, "colors_03", 0)


def test_seeds_follow_the_prompt_not_the_batch_the_filter_or_the_phrasing():
    seen = {}

    def record(prompts, seeds):
        for p, s in zip(prompts, seeds):
            seen.setdefault(p, []).append(s)
        return torch.zeros(len(prompts), 3, 16, 16)

    by_id = lambda result: {(r["id"], r["seed"]) for r in result["results"]}
    full = evaluate_generator(record, 16, images_per_prompt=2, batch_size=7, replicates=10)
    colors = evaluate_generator(record, 16, images_per_prompt=2, batch_size=50, categories=["colors"], replicates=10)
    canonical = evaluate_generator(record, 16, images_per_prompt=2, phrasing="canonical", replicates=10)
    assert by_id(colors) <= by_id(full) and by_id(canonical) == by_id(full)
    assert canonical["phrasing"] == "canonical" and full["phrasing"] == "heldout" and full["version"] == "v2"
    assert len({s for r in full["results"] for s in [r["seed"]]}) == 2 * 144


# ------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("resolution", [32, 64])
def test_both_rules_score_ground_truth_of_v2_at_least_098(resolution):
    result = evaluate([render_prompt(p, resolution, seed=5) for p in V2], V2)
    for rule in ("geneval", "strict"):
        scores = result["scores"][rule]
        failures = [(r["prompt"], r["reason"], r["strict_reason"]) for r in result["results"]
                    if not r["passed" if rule == "geneval" else "strict"]]
        assert scores["overall"]["mean"] >= 0.98, failures
        assert min(s["mean"] for s in scores["categories"].values()) >= 0.9, failures


def test_size_error_of_the_detector_is_within_the_tolerance():
    """SIZE_TOLERANCE is the detector's error on the sides of rendered shapes, with margin."""
    rng = np.random.default_rng(0)
    errors = []
    for i in range(60):
        prompt = V2[int(rng.integers(len(V2)))]
        scene = shapes_eval.layout_scene(rng, prompt)
        detections = detect_objects(render_scene(scene, 32))
        for obj in scene["objects"]:
            d = min(detections, key=lambda d: np.hypot(d.centre[0] - obj["centre"][0], d.centre[1] - obj["centre"][1]))
            errors += [(d.box[2] - d.box[0]) / obj["size"] - 1, (d.box[3] - d.box[1]) / obj["size"] - 1]
    assert max(abs(e) for e in errors) < SIZE_TOLERANCE / 2


def test_strict_rule_rejects_clutter_doubles_and_stretched_shapes():
    circle = next(p for p in V2 if p["category"] == "single_object" and p["objects"][0]["shape"] == "circle")
    lo, hi = SIZE_RANGES["single_object"]
    right = _scene(("circle", "red", (0.5, 0.5), (lo + hi) / 2), category="single_object")
    extra = _scene(("circle", "red", (0.3, 0.5), 0.36), ("square", "blue", (0.75, 0.5), 0.3), category="single_object")
    double = _scene(("circle", "red", (0.3, 0.5), 0.36), ("circle", "blue", (0.75, 0.5), 0.36), category="single_object")
    huge = _scene(("circle", "red", (0.5, 0.5), hi * (1 + SIZE_TOLERANCE) * 1.15), category="single_object")
    tiny = _scene(("circle", "red", (0.5, 0.5), lo * (1 - SIZE_TOLERANCE) * 0.85), category="single_object")
    assert _verdicts(render_scene(right, 64), circle) == (True, True)
    for scene in (extra, double, huge, tiny):  # all pass GenEval's rule, none the strict one
        assert _verdicts(render_scene(scene, 64), circle) == (True, False), scene
    # a shape stretched along one axis: a wide "circle" (ellipse) drawn by hand
    from PIL import Image, ImageDraw

    wide = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(wide).ellipse([4, 20, 60, 44], fill=(220, 30, 30))
    geneval, strict = _verdicts(wide, circle)
    assert not strict and "outside" in score_strict(detect_objects(wide), circle)[1]
    # counting and relations: strict agrees with GenEval on the named objects
    three = next(p for p in V2 if p["category"] == "counting" and p["objects"][0]["count"] == 3)
    shape = three["objects"][0]["shape"]
    centres = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    for n in (2, 3, 4):
        scene = _scene(*[(shape, "green", c, 0.26) for c in centres[:n]], category="counting")
        assert _verdicts(render_scene(scene, 32), three) == (n == 3, n == 3)


def test_clutter_lowers_strict_below_geneval():
    subset = [p for i, p in enumerate(V2) if i % 3 == 0]
    generate = cluttered_fn(32, extra=1, prompts=subset)
    result = evaluate_generator(generate, 32, images_per_prompt=1, prompts=subset, replicates=200)
    geneval, strict = result["scores"]["geneval"]["overall"], result["scores"]["strict"]["overall"]
    # one extra shape of another kind: GenEval's rule ignores it (outside counting), the strict rule does not
    assert geneval["mean"] >= 0.95 and strict["mean"] <= 0.05
    assert strict["hi"] < geneval["lo"]


# ---------------------------------------------------------------------------------------- intervals


def _fake_results(rates, images=4, category="colors", seed=0):
    """Per-image results for prompts whose images pass with the given per-prompt rates."""
    rng = np.random.default_rng(seed)
    results = []
    for i, rate in enumerate(rates):
        for _ in range(images):
            ok = bool(rng.random() < rate)
            results.append({"id": f"{category}_{i}", "prompt": f"p{i}", "category": category, "passed": ok,
                            "strict": ok})
    return results


def test_bootstrap_is_over_prompts_seeded_and_deterministic():
    independent = _fake_results([0.5] * 24)  # images vary within a prompt
    clustered = _fake_results([1.0] * 12 + [0.0] * 12)  # all images of a prompt agree
    a, b = summarise(independent), summarise(independent)
    assert a["scores"] == b["scores"]
    width = lambda r: r["scores"]["strict"]["categories"]["colors"]["hi"] - r["scores"]["strict"]["categories"]["colors"]["lo"]
    # the same mean, but 24 prompts of 4 agreeing images carry the information of 24 images, not 96
    assert summarise(clustered)["categories"]["colors"] == 0.5
    assert width(summarise(clustered)) > 1.6 * width(summarise(independent))
    assert 0.35 < width(summarise(clustered)) < 0.45  # ~ 2 * 1.96 * sqrt(0.25 / 24) = 0.40
    s = summarise(independent)["scores"]["strict"]["categories"]["colors"]
    assert s["lo"] <= s["mean"] <= s["hi"]


def test_overall_is_the_mean_of_categories_with_its_own_interval():
    results = _fake_results([1.0] * 10, category="colors") + _fake_results([0.0] * 30, category="counting")
    summary = summarise(results)
    overall = summary["scores"]["geneval"]["overall"]
    assert overall["mean"] == summary["overall"] == 0.5  # not 10 / 40: categories weigh the same
    assert overall["lo"] == overall["hi"] == 0.5  # both categories are certain
    assert summary["num_prompts"] == {"colors": 10, "counting": 30}
    assert summary["num_images"] == {"colors": 40, "counting": 120}
    table = format_table(summary)
    assert "colors" in table and "overall" in table and "0.500 [0.500, 0.500]" in table


def test_compare_is_paired():
    base = summarise(_fake_results([0.5] * 24, seed=0))
    same = compare(base, copy.deepcopy(base))
    assert same["overall"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    better = copy.deepcopy(base)
    for r in better["results"][:16]:
        r["strict"] = True
    difference = compare(base, better)["overall"]
    assert difference["mean"] > 0 and difference["lo"] > 0
    with pytest.raises(ValueError, match="same prompts"):
        compare(base, summarise(_fake_results([0.5] * 23)))


# --------------------------------------------------------------------------------------- generating


def test_ground_truth_fn_knows_canonical_and_custom_prompts():
    canonical = load_prompts("v2", phrasing="canonical")[:12]
    result = evaluate_generator(ground_truth_fn(32), 32, images_per_prompt=1, prompts=canonical, replicates=50)
    assert result["strict_overall"] == 1.0
    custom = [{"id": "x", "prompt": "my own words for a red square", "category": "colors",
               "objects": [{"shape": "square", "colour": "red", "count": 1}], "relation": None}]
    assert evaluate_generator(ground_truth_fn(32, custom), 32, prompts=custom, replicates=10)["strict_overall"] == 1.0


def test_pipeline_generate_fn_gives_each_image_its_own_noise(one_thread):
    from pocketdit.autoencoder import PixelSpace
    from pocketdit.model import PocketDiT
    from pocketdit.pipeline import PocketDiTPipeline, make_scheduler

    class FakeText:
        embed_dims = (32,)

        def encode(self, prompts):
            states = torch.stack([torch.ones(6, 32) * len(p) / 50 for p in prompts])
            return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]

    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, text_embed_dims=(32,)).eval()
    with torch.no_grad():  # a fresh model predicts 0; give its zero-initialised layers weights
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    pipe = PocketDiTPipeline(model, make_scheduler(1.0), FakeText(), PixelSpace())
    generate = shapes_eval.pipeline_generate_fn(pipe, 16, num_steps=2, guidance_scale=1.0)
    batch = generate(["a", "b", "c"], [7, 8, 9])
    alone = generate(["b"], [8])
    assert batch.shape == (3, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    torch.testing.assert_close(batch[1:2], alone, atol=1e-5, rtol=0)  # not the batch's noise
    assert not torch.allclose(generate(["b"], [9]), alone)
    shifted = shapes_eval.pipeline_generate_fn(pipe, 16, num_steps=2, guidance_scale=1.0, shift=3.0)
    assert not torch.allclose(shifted(["b"], [8]), alone) and pipe.shift == 1.0  # scheduler put back


def test_a_blob_of_no_known_shape_is_clutter_for_the_strict_rule_only():
    from PIL import ImageDraw

    from pocketdit.evaluate.shapes_eval import UNRECOGNISED

    circle = next(p for p in V2 if p["category"] == "single_object" and p["objects"][0]["shape"] == "circle")
    image = render_scene(_scene(("circle", "red", (0.3, 0.3), 0.4), category="single_object"), 64)
    ImageDraw.Draw(image).polygon([(36, 40), (62, 36), (44, 62), (50, 46)], fill=(140, 40, 200))  # a purple dart
    detections = detect_objects(image, keep_unrecognised=True)
    assert [d.shape for d in detections] == ["circle", UNRECOGNISED]
    assert [d.shape for d in detect_objects(image)] == ["circle"]  # the default: only shapes
    assert _verdicts(image, circle) == (True, False)
    assert "no known shape" in score_strict(detections, circle)[1]
