import logging
import os

import pytest
import torch

from pocketdit.data.cache import CachedFeatureDataset, FeatureCache, cache_key_parts, collate_cached
from pocketdit.data.shapes import ShapesDataset


class CountingEncoders:
    """Deterministic stand-ins for an autoencoder and a text encoder that count their calls."""

    def __init__(self, two_text_encoders=False):
        self.image_calls = 0
        self.text_calls = 0
        self.two = two_text_encoders

    def encode_image(self, images):
        self.image_calls += images.shape[0]
        return torch.nn.functional.avg_pool2d(images, 4)  # (B, 3, H/4, W/4)

    def encode_text(self, captions):
        self.text_calls += len(captions)
        lengths = [len(c.split()) for c in captions]
        length = max(lengths)
        states = torch.zeros(len(captions), length, 8)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, (caption, n) in enumerate(zip(captions, lengths)):
            states[i, :n] = torch.tensor([float(len(w)) for w in caption.split()])[:, None]
            mask[i, :n] = True
        if self.two:
            return [states, states[:, :1] * 2], [mask, mask[:, :1]]
        return states, mask


def _dataset(**kw):
    return ShapesDataset(resolution=16, length=6, seed=kw.pop("seed", 0), **kw)


def test_key_changes_with_encoder_and_resolution(tmp_path):
    ds = _dataset()
    base = FeatureCache(tmp_path, cache_key_parts(ds, "tiny-ae", ["minilm"]))
    same = FeatureCache(tmp_path, cache_key_parts(_dataset(), "tiny-ae", ["minilm"]))
    assert base.key == same.key
    other_text = FeatureCache(tmp_path, cache_key_parts(ds, "tiny-ae", ["minilm", "t5"]))
    other_ae = FeatureCache(tmp_path, cache_key_parts(ds, "sd-vae", ["minilm"]))
    other_res = FeatureCache(tmp_path, cache_key_parts(ShapesDataset(resolution=32, length=6), "tiny-ae", ["minilm"]))
    other_seed = FeatureCache(tmp_path, cache_key_parts(_dataset(seed=1), "tiny-ae", ["minilm"]))
    keys = {c.key for c in (base, other_text, other_ae, other_res, other_seed)}
    assert len(keys) == 5
    assert os.path.isfile(os.path.join(base.directory, "key.json"))
    with pytest.raises(ValueError, match="JSON"):
        FeatureCache(tmp_path, {"bad": object()})


def test_lazy_fill_and_reuse(tmp_path):
    ds = _dataset()
    enc = CountingEncoders()
    key = cache_key_parts(ds, "pool4", ["words"])
    cached = CachedFeatureDataset(ds, FeatureCache(tmp_path, key), enc.encode_image, enc.encode_text)
    first = cached[2]
    assert first["latents"].shape == (3, 4, 4)
    assert torch.allclose(first["latents"], torch.nn.functional.avg_pool2d(ds[2]["image"][None], 4)[0])
    n_words = len(ds[2]["caption"].split())
    assert first["text_states"].shape == (n_words, 8) and first["text_mask"].all()
    assert (enc.image_calls, enc.text_calls) == (1, 1)
    assert len(cached.cache) == 1

    # A new wrapper (e.g. next run) reads the entry back instead of encoding again.
    enc2 = CountingEncoders()
    again = CachedFeatureDataset(ds, FeatureCache(tmp_path, key), enc2.encode_image, enc2.encode_text)[2]
    assert (enc2.image_calls, enc2.text_calls) == (0, 0)
    assert torch.equal(again["latents"], first["latents"]) and torch.equal(again["text_states"], first["text_states"])
    assert again["caption"] == first["caption"] and torch.equal(again["image"], first["image"])

    assert cached.fill(batch_size=4, progress=False) == 5
    assert len(cached.cache) == 6 and cached.fill(progress=False) == 0
    batch = collate_cached([cached[i] for i in range(6)])
    assert batch["latents"].shape == (6, 3, 4, 4)
    longest = max(len(ds[i]["caption"].split()) for i in range(6))
    assert batch["text_states"].shape == (6, longest, 8) and batch["text_mask"].shape == (6, longest)
    assert batch["text_mask"].sum(1).tolist() == [len(ds[i]["caption"].split()) for i in range(6)]


def test_changed_encoder_does_not_reuse_stale_entries(tmp_path):
    ds = _dataset()
    enc = CountingEncoders()
    CachedFeatureDataset(ds, FeatureCache(tmp_path, cache_key_parts(ds, "pool4", ["words"])), enc.encode_image)[0]
    enc2 = CountingEncoders()
    other = FeatureCache(tmp_path, cache_key_parts(ds, "pool4-v2", ["words"]))
    CachedFeatureDataset(ds, other, enc2.encode_image)[0]
    assert enc2.image_calls == 1


def test_caption_mismatch_and_corrupt_entry_recomputed(tmp_path, caplog):
    ds = _dataset()
    enc = CountingEncoders()
    cache = FeatureCache(tmp_path, {"dataset": "fixed-name"})
    cached = CachedFeatureDataset(ds, cache, enc.encode_image, enc.encode_text)
    cached[0]
    cache.put(1, {"latents": torch.zeros(3, 4, 4)}, caption="some other caption")
    with open(cache.path(2), "wb") as handle:
        handle.write(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        assert not torch.equal(cached[1]["latents"], torch.zeros(3, 4, 4))
        cached[2]
    assert "some other caption" in caplog.text and cache.path(2) in caplog.text
    assert enc.image_calls == 3
    # A cache filled with images only is completed when text is asked for.
    image_only = CachedFeatureDataset(ds, FeatureCache(tmp_path / "b", {"k": 1}), enc.encode_image)
    image_only[3]
    both = CachedFeatureDataset(ds, FeatureCache(tmp_path / "b", {"k": 1}), enc.encode_image, enc.encode_text)
    assert "text_states" in both[3]


def test_list_of_text_encoders_round_trips(tmp_path):
    ds = _dataset()
    enc = CountingEncoders(two_text_encoders=True)
    key = cache_key_parts(ds, None, ["words", "words-x2"])
    cached = CachedFeatureDataset(ds, FeatureCache(tmp_path, key), encode_text=enc.encode_text)
    fresh = cached[4]
    reread = CachedFeatureDataset(ds, FeatureCache(tmp_path, key), encode_text=enc.encode_text)[4]
    assert enc.text_calls == 1 and "latents" not in reread
    assert isinstance(reread["text_states"], list) and len(reread["text_states"]) == 2
    assert reread["text_states"][1].shape == (1, 8) and torch.equal(reread["text_mask"][0], fresh["text_mask"][0])
    batch = collate_cached([cached[i] for i in range(3)])
    assert isinstance(batch["text_states"], list) and batch["text_states"][1].shape == (3, 1, 8)


def test_bad_arguments(tmp_path):
    ds = _dataset()
    with pytest.raises(ValueError, match="nothing to cache"):
        CachedFeatureDataset(ds, FeatureCache(tmp_path, {"k": 1}))
    with pytest.raises(ValueError, match="non-empty dict"):
        FeatureCache(tmp_path, {})
    with pytest.raises(IndexError):
        CachedFeatureDataset(ds, FeatureCache(tmp_path, {"k": 1}), lambda x: x)[6]
