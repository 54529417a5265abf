"""Varied captions for shape scenes, with a phrasing split held out from training.

Users do not type a dataset's caption template, so the ``shapes`` dataset trains on many phrasings of each
scene and ShapesEval judges a model on phrasings it never saw. A caption is a *frame* around a *body*:

    frame  "a picture of {}"  "{} on a white background"  ...
    body   per category: "{a} to the left of {b}", "{b} below {a}", "3 squares", "a square that is red" ...

Each frame and each body template belongs to one split. A training caption uses a training frame *and* a
training body; a held-out caption uses a held-out frame, a held-out body, or both. So no held-out caption
string can come out of the training generator (``tests/data/test_phrasing.py`` enumerates both spaces),
while every held-out caption is made of pieces (shape, colour, number and relation words) that training
covers in other sentences. ``"canonical"`` is the single GenEval-style template ("a photo of ..."), kept
for comparison with the paper's benchmark and for old prompt files.

Word order varies too: objects of a two-object caption come in either order, and a relation can be said
from either side ("a circle left of a square" = "a square right of a circle").
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["PHRASINGS", "FRAMES", "BODIES", "phrase_scene", "canonical_caption"]

PHRASINGS: tuple[str, ...] = ("canonical", "train", "heldout")

# (template, split). "{}" is the body.
FRAMES: tuple[tuple[str, str], ...] = (
    ("a photo of {}", "train"),
    ("{}", "train"),
    ("an image of {}", "train"),
    ("a picture of {}", "train"),
    ("a drawing of {}", "train"),
    ("{} on a white background", "train"),
    ("a simple illustration of {}", "train"),
    ("a photo showing {}", "train"),
    ("a scene with {}", "train"),
    ("a rendering of {}", "heldout"),
    ("an illustration showing {}", "heldout"),
    ("a picture with {} on a white background", "heldout"),
    ("draw {}", "heldout"),
)

# Shape and colour words. Synonyms appear in both splits: they are vocabulary, not phrasing.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "diamond", "rhombus"),
}
PLURAL_WORDS: dict[str, str] = {"circle": "circles", "disc": "discs", "square": "squares", "triangle": "triangles",
                                "diamond": "diamonds", "rhombus": "rhombuses"}
NUMBER_WORDS: dict[int, tuple[str, ...]] = {1: ("one",), 2: ("two", "2"), 3: ("three", "3"), 4: ("four", "4")}

# Relations: the words for "subject REL object", and the converse relation for saying it the other way.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Body templates per category, (template, split). Fields: {a}/{b} noun phrases with article, {s} a bare shape
# word, {c} a colour, {n} a number word, {p} a plural shape word, {r} relation words.
BODIES: dict[str, tuple[tuple[str, str], ...]] = {
    "single_object": (
        ("{a}", "train"),
        ("one {s}", "train"),
        ("a single {s}", "train"),
        ("just {a}", "heldout"),
    ),
    "colors": (
        ("{ca}", "train"),
        ("{a} that is {c}", "train"),
        ("{a} coloured {c}", "train"),
        ("{a} in {c}", "heldout"),
        ("one {c} {s}", "heldout"),
    ),
    "two_object": (
        ("{a} and {b}", "train"),
        ("{a} with {b}", "train"),
        ("both {a} and {b}", "train"),
        ("{a} together with {b}", "heldout"),
        ("one {s} and one {t}", "heldout"),
    ),
    "counting": (
        ("{n} {p}", "train"),
        ("a group of {n} {p}", "train"),
        ("{n} {p} in total", "train"),
        ("exactly {n} {p}", "heldout"),
    ),
    "position": (
        ("{a} {r} {b}", "train"),
        ("{a} positioned {r} {b}", "train"),
        ("{a} placed {r} {b}", "heldout"),
    ),
    "color_attr": (
        ("{ca} and {cb}", "train"),
        ("{ca} with {cb}", "train"),
        ("{a} that is {c} and {b} that is {d}", "train"),
        ("{ca} together with {cb}", "heldout"),
        ("{a} in {c} and {b} in {d}", "heldout"),
    ),
}


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun_phrase(shape: str, colour: Optional[str] = None) -> str:
    return _article(f"{colour} {shape}" if colour else shape)


def canonical_caption(scene: dict) -> str:
    """The GenEval-style caption of a scene or spec ("a photo of ..."; ``shapes.caption_for``): what the
    category asks to be checked, in the one template of GenEval's prompts."""
    category = scene["category"]
    if category not in BODIES:
        raise ValueError(f"category={category!r} is not one of {tuple(BODIES)}")
    objects = scene["objects"]
    if category == "counting":
        count = sum(int(o.get("count", 1)) for o in objects)
        return f"a photo of {NUMBER_WORDS[count][0]} {PLURAL_WORDS[objects[0]['shape']]}"
    if category == "single_object":
        return f"a photo of {_noun_phrase(objects[0]['shape'])}"
    if category == "colors":
        return f"a photo of {_noun_phrase(objects[0]['shape'], objects[0]['colour'])}"
    if category == "two_object":
        return f"a photo of {_noun_phrase(objects[0]['shape'])} and {_noun_phrase(objects[1]['shape'])}"
    if category == "color_attr":
        first, second = objects[0], objects[1]
        return (f"a photo of {_noun_phrase(first['shape'], first['colour'])} and "
                f"{_noun_phrase(second['shape'], second['colour'])}")
    relation = scene["relation"]
    subject, other = objects[relation["subject"]], objects[relation["object"]]
    return f"a photo of {_noun_phrase(subject['shape'])} {relation['relation']} {_noun_phrase(other['shape'])}"


def _templates(category: str, phrasing: str, rng: np.random.Generator) -> tuple[str, str]:
    """A (frame, body) pair of the split: train x train, or held-out in the frame, the body or both."""
    frames = [f for f, s in FRAMES]
    bodies = [b for b, s in BODIES[category]]
    train_f = [f for f, s in FRAMES if s == "train"]
    train_b = [b for b, s in BODIES[category] if s == "train"]
    if phrasing == "train":
        return _choice(rng, train_f), _choice(rng, train_b)
    pairs = [(f, b) for f in frames for b in bodies if not (f in train_f and b in train_b)]
    return pairs[int(rng.integers(len(pairs)))]


def phrase_scene(scene: dict, rng: np.random.Generator, phrasing: str = "train", frame: Optional[str] = None,
                 body: Optional[str] = None) -> str:
    """A caption of ``scene`` (or of a spec) drawn from ``rng`` in the given split.

    ``frame``/``body`` pin a template (tests and prompt-set builders); otherwise both are drawn.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing={phrasing!r} is not one of {PHRASINGS}")
    if phrasing == "canonical":
        return canonical_caption(scene)
    category = scene["category"]
    if category not in BODIES:
        raise ValueError(f"category={category!r} is not one of {tuple(BODIES)}")
    drawn_frame, drawn_body = _templates(category, phrasing, rng)
    frame, body = frame or drawn_frame, body or drawn_body
    objects = list(scene["objects"])
    relation_words = None
    if category == "position":
        relation = scene["relation"]
        subject, other, rel = objects[relation["subject"]], objects[relation["object"]], relation["relation"]
        if rng.random() < 0.5:  # say it from the other side
            subject, other, rel = other, subject, CONVERSE[rel]
        objects = [subject, other]
        relation_words = _choice(rng, RELATION_WORDS[rel])
    elif category in ("two_object", "color_attr") and rng.random() < 0.5:
        objects.reverse()
    shape_words = [_choice(rng, SHAPE_WORDS[o["shape"]]) for o in objects]
    colours = [o.get("colour") for o in objects]
    fields = {"s": shape_words[0], "a": _article(shape_words[0])}
    if len(objects) > 1:
        fields.update(t=shape_words[1], b=_article(shape_words[1]))
    if colours[0] is not None:
        fields.update(c=colours[0], ca=_article(f"{colours[0]} {shape_words[0]}"))
    if len(objects) > 1 and colours[1] is not None:
        fields.update(d=colours[1], cb=_article(f"{colours[1]} {shape_words[1]}"))
    if category == "counting":
        count = sum(int(o.get("count", 1)) for o in scene["objects"])
        fields.update(n=_choice(rng, NUMBER_WORDS[count]), p=PLURAL_WORDS[shape_words[0]])
    if relation_words is not None:
        fields["r"] = relation_words
    return frame.format(body.format(**fields))
