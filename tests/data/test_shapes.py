"""Tests for the procedural ``shapes`` dataset."""

import json

import numpy as np
import pytest
import torch

from pocketdit.data.shapes import (
    CATEGORIES,
    COLOURS,
    RELATIONS,
    SHAPES,
    ShapesDataset,
    caption_for,
    layout_scene,
    render_scene,
    sample_scene,
    sample_spec,
)


def test_item_depends_only_on_seed_and_index():
    a = ShapesDataset(resolution=32, length=50, seed=3)
    b = ShapesDataset(resolution=32, length=50, seed=3)
    # read b backwards and touch the global RNGs in between: items must not care
    items_b = {}
    for i in reversed(range(10)):
        np.random.seed(i)
        torch.manual_seed(i)
        items_b[i] = b[i]
    for i in range(10):
        item = a[i]
        assert item["caption"] == items_b[i]["caption"]
        assert item["meta"] == items_b[i]["meta"]
        assert torch.equal(item["image"], items_b[i]["image"])


def test_different_seeds_give_different_scenes():
    a = ShapesDataset(resolution=32, length=20, seed=0)
    b = ShapesDataset(resolution=32, length=20, seed=1)
    assert [a.scene(i)["objects"] for i in range(20)] != [b.scene(i)["objects"] for i in range(20)]


def test_item_format():
    ds = ShapesDataset(resolution=64, length=5, seed=0)
    item = ds[0]
    assert set(item) == {"image", "caption", "meta"}
    image = item["image"]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0
    # the background is white, and something is drawn on it
    assert torch.allclose(image[:, 0, 0], torch.ones(3))
    assert (image < 0.9).any()
    meta = item["meta"]
    assert json.loads(json.dumps(meta)) == meta  # JSON-serialisable
    assert meta["seed"] == 0 and meta["index"] == 0
    assert meta["category"] in CATEGORIES


def test_every_category_appears_with_valid_captions():
    ds = ShapesDataset(resolution=32, length=300, seed=0)
    seen = {}
    for i in range(len(ds)):
        scene = ds.scene(i)
        seen.setdefault(scene["category"], []).append(scene)
    assert set(seen) == set(CATEGORIES)
    for category, scenes in seen.items():
        for scene in scenes:
            caption = caption_for(scene)
            assert caption.startswith("a photo of "), caption
            objects = scene["objects"]
            for obj in objects:
                assert obj["shape"] in SHAPES and obj["colour"] in COLOURS
                x, y = obj["centre"]
                assert 0 < x - obj["size"] / 2 and x + obj["size"] / 2 < 1
                assert 0 < y - obj["size"] / 2 and y + obj["size"] / 2 < 1
            if category == "single_object":
                assert len(objects) == 1 and caption.endswith(objects[0]["shape"])
            elif category == "colors":
                assert caption == f"a photo of {'an' if objects[0]['colour'] == 'orange' else 'a'} " \
                    f"{objects[0]['colour']} {objects[0]['shape']}"
            elif category == "counting":
                assert 2 <= len(objects) <= 4 and len({o["shape"] for o in objects}) == 1
                word = {2: "two", 3: "three", 4: "four"}[len(objects)]
                assert caption == f"a photo of {word} {objects[0]['shape']}s"
            elif category == "two_object":
                assert len(objects) == 2 and objects[0]["shape"] != objects[1]["shape"]
                assert caption == f"a photo of a {objects[0]['shape']} and a {objects[1]['shape']}"
            elif category == "color_attr":
                assert len(objects) == 2 and objects[0]["shape"] != objects[1]["shape"]
                assert objects[0]["colour"] != objects[1]["colour"]
                for obj in objects:
                    assert f"{obj['colour']} {obj['shape']}" in caption
            else:
                rel = scene["relation"]
                assert rel["relation"] in RELATIONS and len(objects) == 2
                subject, other = objects[rel["subject"]], objects[rel["object"]]
                assert caption == f"a photo of a {subject['shape']} {rel['relation']} a {other['shape']}"
                dx = subject["centre"][0] - other["centre"][0]
                dy = subject["centre"][1] - other["centre"][1]
                along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel["relation"]]
                across = abs(dy) if rel["relation"] in ("left of", "right of") else abs(dx)
                assert along > 0 and across <= 0.3 * along + 1e-6


def test_objects_do_not_overlap():
    rng = np.random.default_rng(0)
    for _ in range(100):
        scene = layout_scene(rng, {"category": "counting", "objects": [{"shape": "circle", "colour": None,
                                                                        "count": 4}], "relation": None})
        boxes = [(o["centre"][0], o["centre"][1], o["size"]) for o in scene["objects"]]
        for i in range(len(boxes)):
            for j in range(i):
                (xa, ya, sa), (xb, yb, sb) = boxes[i], boxes[j]
                reach = (sa + sb) / 2
                assert abs(xa - xb) > reach or abs(ya - yb) > reach


def test_render_matches_scene_colours_and_layout():
    scene = {"category": "colors", "objects": [{"shape": "square", "colour": "blue", "centre": [0.5, 0.5],
                                               "size": 0.5}], "relation": None}
    image = np.asarray(render_scene(scene, 32))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert tuple(image[16, 16]) == COLOURS["blue"]
    assert tuple(image[2, 2]) == (255, 255, 255)
    # the square covers pixels 8..23: 16 x 16 exactly blue
    assert (np.all(image == COLOURS["blue"], axis=-1)).sum() == 16 * 16


def test_categories_argument_restricts_and_validates():
    ds = ShapesDataset(resolution=32, length=40, seed=0, categories=["counting"])
    assert all(ds.scene(i)["category"] == "counting" for i in range(40))
    with pytest.raises(ValueError, match="categories"):
        ShapesDataset(categories=["colour"])
    with pytest.raises(ValueError, match="resolution"):
        ShapesDataset(resolution=8)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(length=0)
    with pytest.raises(IndexError):
        ShapesDataset(resolution=32, length=3)[3]
    with pytest.raises(ValueError, match="category"):
        sample_spec(np.random.default_rng(0), "three_objects")


def test_sample_scene_is_reproducible_from_generator_state():
    a = sample_scene(np.random.default_rng([5, 9]), "color_attr")
    b = sample_scene(np.random.default_rng([5, 9]), "color_attr")
    assert a == b


def test_category_weights_set_the_mix_and_validate():
    weights = {"position": 3, "color_attr": 1}
    ds = ShapesDataset(resolution=32, length=4000, seed=0, categories=weights)
    drawn = [ds.scene(i)["category"] for i in range(4000)]
    assert set(drawn) == {"position", "color_attr"}
    share = drawn.count("position") / len(drawn)
    assert abs(share - 0.75) < 0.03  # binomial sd ~0.007
    # weight 0 drops a category; the uniform list keeps its old scenes
    ds0 = ShapesDataset(resolution=32, length=50, seed=0, categories={"counting": 1, "colors": 0})
    assert all(ds0.scene(i)["category"] == "counting" for i in range(50))
    assert ShapesDataset(length=5, seed=3).scene(4) == ShapesDataset(length=5, seed=3, categories=None).scene(4)
    for bad in ({"colour": 1}, {"position": -1}, {"position": 0}, {"position": float("nan")}, {"position": "2"}):
        with pytest.raises(ValueError, match="categories"):
            ShapesDataset(categories=bad)


def test_negative_captions_change_one_bound_thing_in_the_same_template():
    from pocketdit.data.shapes import ShapesDataset, corrupt_scene

    data = ShapesDataset(resolution=16, length=60, seed=3, negatives=True)
    seen = set()
    for i in range(60):
        item = data[i]
        scene, cat = item["meta"], item["meta"]["category"]
        seen.add(cat)
        pos, neg = item["caption"].split(), item["negative_caption"].split()
        assert pos != neg and len(pos) == len(neg) or cat == "counting"  # same template, one thing changed
        if cat == "color_attr":  # the same words, bound the other way
            assert sorted(pos) == sorted(neg)
    assert seen == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert "negative_caption" not in ShapesDataset(resolution=16, length=4, seed=3)[0]
    rng = np.random.default_rng(0)
    scene = data.scene(0)
    assert corrupt_scene(scene, rng) != scene and data.scene(0) == scene  # the input is not modified


def test_counterfactual_pairs_keep_the_layout_and_change_the_binding():
    from pocketdit.data.shapes import ShapesDataset

    data = ShapesDataset(resolution=32, length=80, seed=4, pairs=True, categories=["color_attr", "position"])
    for i in range(12):
        item = data[i]
        img, pair = item["image"], item["pair_image"]
        assert pair.shape == img.shape and not torch.equal(pair, img)
        assert item["pair_caption"] != item["caption"]
        ink, pair_ink = (img < 0.9).any(0), (pair < 0.9).any(0)  # non-white pixels
        if item["meta"]["category"] == "color_attr":  # same places painted, colours swapped: same words
            assert torch.equal(ink, pair_ink)
            assert sorted(item["caption"].split()) == sorted(item["pair_caption"].split())
        else:  # the objects traded places: the relation words differ, the shapes are the same
            assert not torch.equal(ink, pair_ink)
    batch = __import__("pocketdit.data", fromlist=["collate"]).collate([data[0], data[1]])
    assert batch["pair_image"].shape == (2, 3, 32, 32) and len(batch["pair_caption"]) == 2
