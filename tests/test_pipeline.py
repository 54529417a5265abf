"""PocketDiTPipeline: prompts -> PIL images, seeding, CFG, resolution errors, save/load round trip."""

import json

import pytest
import torch

from pocketdit.autoencoder import PixelSpace
from pocketdit.model import InvalidResolutionError, PocketDiT
from pocketdit.pipeline import PocketDiTPipeline, make_grid

torch.set_num_threads(1)


class FakeText:
    embed_dims = (32,)

    def encode(self, prompts):
        states = torch.stack(
            [torch.randn(6, 32, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        )
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]


def trained_like_model(text_dims=(32,)):
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, text_embed_dims=text_dims)
    # A fresh model has zero-initialised output and cross-attention layers (it predicts 0 and ignores text);
    # give them weights so that outputs depend on noise, prompt and guidance, as a trained model's do.
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return model.eval()


def test_generates_pil_images_of_the_requested_size():
    pipe = PocketDiTPipeline(trained_like_model(), FakeText(), PixelSpace())
    images = pipe(["a red circle", "a blue square"], num_steps=3, height=16, width=24, seed=0, progress=False)
    assert len(images) == 2
    assert all(im.size == (24, 16) and im.mode == "RGB" for im in images)
    t = pipe(["a red circle"], num_steps=3, height=16, width=16, output_type="pt", progress=False)
    assert t.shape == (1, 3, 16, 16) and t.min() >= -1 and t.max() <= 1


def test_seeding_is_reproducible_and_per_image():
    pipe = PocketDiTPipeline(trained_like_model(), FakeText(), PixelSpace())
    kw = dict(num_steps=3, height=16, width=16, output_type="pt", progress=False)
    a = pipe(["x", "y"], seed=1, **kw)
    b = pipe(["x", "y"], seed=1, **kw)
    c = pipe(["x", "y"], seed=2, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # with one seed per prompt an image does not depend on its batch
    batch = pipe(["x", "y"], seed=[5, 6], **kw)
    alone = pipe(["y"], seed=[6], **kw)
    assert torch.allclose(batch[1:], alone, atol=1e-5)
    with pytest.raises(ValueError, match="seeds"):
        pipe(["x", "y"], seed=[1], **kw)


def test_guidance_changes_the_result_and_scale_one_skips_uncond():
    model = trained_like_model()
    pipe = PocketDiTPipeline(model, FakeText(), PixelSpace())
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    kw = dict(num_steps=2, height=16, width=16, output_type="pt", progress=False, seed=0)
    g1 = pipe(["a"], guidance_scale=1.0, **kw)
    assert len(calls) == 2
    g4 = pipe(["a"], guidance_scale=4.0, **kw)
    assert len(calls) == 2 + 4
    assert not torch.allclose(g1, g4)


def test_invalid_resolution_lists_valid_image_sizes():
    pipe = PocketDiTPipeline(trained_like_model(), FakeText(), PixelSpace())
    with pytest.raises(InvalidResolutionError, match=r"Nearest valid image sizes: .*16x16"):
        pipe(["a"], num_steps=1, height=18, width=16, progress=False)


def test_mismatched_components_are_rejected():
    with pytest.raises(ValueError, match="text widths"):
        PocketDiTPipeline(trained_like_model(text_dims=(48,)), FakeText(), PixelSpace())
    with pytest.raises(ValueError, match="latent channels"):
        PocketDiTPipeline(PocketDiT.from_preset("nano", text_embed_dims=(32,)), FakeText(), PixelSpace())


def test_save_and_load_round_trip(tmp_path):
    from pocketdit.text import build_text_conditioner

    text = build_text_conditioner("minilm", dropout_probs=0.0, max_lengths=8)
    pipe = PocketDiTPipeline(trained_like_model(text_dims=text.embed_dims), text, PixelSpace(), default_size=16,
                             default_steps=3)
    kw = dict(output_type="pt", progress=False, seed=3)
    before = pipe(["a green triangle"], **kw)
    pipe.save_pretrained(tmp_path / "pipe")
    meta = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert meta["text_encoders"] == ["minilm"] and meta["autoencoder"] == "pixel"
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PocketDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.default_size == 16 and loaded.default_steps == 3
    after = loaded(["a green triangle"], **kw)
    assert after.shape == (1, 3, 16, 16)
    assert torch.allclose(before, after, atol=1e-6)


def test_missing_pipeline_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline not found"):
        PocketDiTPipeline.from_pretrained(tmp_path / "missing")


def test_make_grid_layout():
    from PIL import Image

    ims = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(ims, ncols=3, scale=2, pad=1)
    assert grid.size == (3 * 17 + 1, 2 * 17 + 1)
    assert grid.getpixel((1 + 17 + 3, 4)) == (40, 0, 0)  # second image, upscaled
