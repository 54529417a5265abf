"""Varied captions: every split says what the scene holds, and held-out captions never occur in training."""

import re

import numpy as np
import pytest

from pocketdit.data.phrasing import BODIES, FRAMES, phrase_scene
from pocketdit.data.shapes import CATEGORIES, ShapesDataset, caption_for, sample_scene

# Every held-out frame or body leaves one of these in its caption; no training caption contains one.
HELDOUT_MARKERS = re.compile(
    r"^(a rendering of|an illustration showing|a picture with|draw) |\bjust\b|\bin (red|orange|yellow|green|blue|purple)\b"
    r"|\bone (red|orange|yellow|green|blue|purple)\b|together with|^(.* )?one \w+ and one \w+|\bexactly\b|\bplaced\b"
)


def _captions(phrasing, n, seed=0):
    ds = ShapesDataset(resolution=16, length=n, seed=seed, phrasing=phrasing)
    return [ds.caption(i) for i in range(n)]


def test_heldout_captions_never_come_out_of_the_training_generator():
    train = set(_captions("train", 20000))
    heldout = _captions("heldout", 3000, seed=1)
    assert not train & set(heldout)
    assert all(HELDOUT_MARKERS.search(c) for c in heldout), [c for c in heldout if not HELDOUT_MARKERS.search(c)][:5]
    assert not [c for c in train if HELDOUT_MARKERS.search(c)][:5]


def test_every_template_is_used_and_each_split_varies():
    assert {s for _, s in FRAMES} == {"train", "heldout"}
    for category in CATEGORIES:
        assert {s for _, s in BODIES[category]} == {"train", "heldout"}, category
    train = _captions("train", 600)
    assert len(set(train)) > 400  # many phrasings, not one template
    assert sum(c.startswith("a photo of ") for c in train) < 0.25 * len(train)


@pytest.mark.parametrize("phrasing", ["train", "heldout"])
def test_captions_name_what_the_scene_holds(phrasing):
    rng = np.random.default_rng(0)
    numbers = {2: ("two", "2"), 3: ("three", "3"), 4: ("four", "4")}
    synonyms = {"circle": ("circle", "disc"), "diamond": ("diamond", "rhombus"), "square": ("square",),
                "triangle": ("triangle",)}
    for _ in range(300):
        category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        scene = sample_scene(rng, category)
        caption = phrase_scene(scene, rng, phrasing)
        for obj in scene["objects"]:
            assert any(w in caption for w in synonyms[obj["shape"]]), (caption, scene)
        if category in ("colors", "color_attr"):
            for obj in scene["objects"]:
                assert obj["colour"] in caption, (caption, scene)
        if category == "counting":
            assert any(re.search(rf"\b{w}\b", caption) for w in numbers[len(scene["objects"])]), caption


def test_position_captions_keep_the_relation_when_said_from_the_other_side():
    rng = np.random.default_rng(3)
    words = {"left of": "left", "right of": "right", "above": ("above", "over"), "below": ("below", "under")}
    seen_converse = False
    for _ in range(200):
        scene = sample_scene(rng, "position")
        caption = phrase_scene(scene, rng, "train", frame="{}")
        rel = scene["relation"]
        subject = scene["objects"][rel["subject"]]["shape"]
        first = re.search(r"circle|disc|square|triangle|diamond|rhombus", caption).group(0)
        said_first = {"disc": "circle", "rhombus": "diamond"}.get(first, first)
        relation = rel["relation"]
        if said_first != subject:  # said from the other side: the converse relation
            relation = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
            seen_converse = True
        w = words[relation]
        assert any(x in caption for x in (w if isinstance(w, tuple) else (w,))), (caption, scene)
    assert seen_converse


def test_canonical_phrasing_is_the_geneval_template_and_bad_phrasing_is_an_error():
    ds = ShapesDataset(resolution=16, length=5, seed=0, phrasing="canonical")
    assert all(ds[i]["caption"] == caption_for(ds.scene(i)) for i in range(5))
    with pytest.raises(ValueError, match="phrasing"):
        ShapesDataset(phrasing="fancy")
    # the scene of an item does not depend on how it is phrased
    assert ShapesDataset(resolution=16, length=5, phrasing="train").scene(3) == ds.scene(3)
