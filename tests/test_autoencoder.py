"""Autoencoders: pixel space, tiny diffusers VAEs saved to disk and reloaded, the project's TinyAutoencoder."""

import json
import shutil

import pytest
import torch

from pocketdit.autoencoder import (
    AutoencoderNotFoundError,
    DiffusersAutoencoder,
    InvalidImageSizeError,
    PixelSpace,
    TinyAutoencoder,
    autoencoder_loss,
    load_autoencoder,
)
from pocketdit.train_ae import train_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")


TINY_CFG = dict(latent_channels=4, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(16, 8),
                norm_num_groups=4)


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


class RectanglesDataset(torch.utils.data.Dataset):
    """Flat-coloured rectangles on a coloured background: structured, learnable, deterministic."""

    def __init__(self, n=64, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = []
        for _ in range(n):
            img = (torch.rand(3, 1, 1, generator=g) * 2 - 1).expand(3, size, size).clone()
            y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
            img[:, y0: y0 + h, x0: x0 + w] = torch.rand(3, 1, 1, generator=g) * 2 - 1
            self.images.append(img)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": "a rectangle", "meta": {}}


# ---------------------------------------------------------------------------------------------------- diffusers
def _tiny_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         scaling_factor=0.5, shift_factor=0.1)


def _tiny_taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(8,) * 3, decoder_block_out_channels=(8,) * 3,
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), scaling_factor=2.0)


def _tiny_dc():
    from diffusers import AutoencoderDC

    return AutoencoderDC(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                         encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                         encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                         encoder_block_types="ResBlock", decoder_block_types="ResBlock", latent_channels=8,
                         attention_head_dim=8, scaling_factor=0.7)


def _tiny_qwen():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True])


@pytest.mark.parametrize(
    "build, kind, channels, factor",
    [(_tiny_kl, "AutoencoderKL", 4, 2), (_tiny_taesd, "AutoencoderTiny", 4, 4), (_tiny_dc, "AutoencoderDC", 8, 2),
     (_tiny_qwen, "AutoencoderKLQwenImage", 16, 4)],
)
def test_diffusers_autoencoder_roundtrip_through_disk(tmp_path, build, kind, channels, factor):
    torch.manual_seed(0)
    vae = build().eval()
    vae.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(str(tmp_path))  # a pipeline-style folder: found in vae/
    assert isinstance(ae, DiffusersAutoencoder) and ae.kind == kind
    assert ae.latent_channels == channels and ae.downsample_factor == factor
    assert ae.latent_shape(32, 32) == (channels, 32 // factor, 32 // factor)
    x = _images(2, 32)
    z = ae.encode(x)
    assert z.shape == (2, channels, 32 // factor, 32 // factor) and z.dtype == torch.float32
    y = ae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()

    # Normalisation: encode == (raw - shift) * scale with the config's factors; decode undoes it exactly.
    with torch.no_grad():
        xin = x.unsqueeze(2) if kind == "AutoencoderKLQwenImage" else x
        out = vae.encode(xin)
        raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else getattr(out, "latents", None)
        raw = out.latent if raw is None else raw
        raw = raw[:, :, 0] if kind == "AutoencoderKLQwenImage" else raw
        cfg = vae.config
        if kind == "AutoencoderKLQwenImage":
            mean = torch.tensor(cfg.latents_mean)[None, :, None, None]
            std = torch.tensor(cfg.latents_std)[None, :, None, None]
            want = (raw - mean) / std
        else:
            want = (raw - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
        assert torch.allclose(z, want, atol=1e-5)
        raw_in = raw.unsqueeze(2) if kind == "AutoencoderKLQwenImage" else raw
        ref = vae.decode(raw_in).sample
        ref = ref[:, :, 0] if kind == "AutoencoderKLQwenImage" else ref
        assert torch.allclose(y, ref.clamp(-1, 1), atol=1e-4)
    # The reloaded weights are the saved ones.
    sd = vae.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ae.vae.state_dict().items())
    assert not any(p.requires_grad for p in ae.parameters())


def test_kl_per_channel_statistics_and_sampling(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=2, norm_num_groups=4, scaling_factor=0.5,
                        latents_mean=(0.2, -0.1), latents_std=(2.0, 4.0))
    vae.save_pretrained(tmp_path)
    ae = DiffusersAutoencoder.from_pretrained(tmp_path)
    x = _images(1, 16)
    z = ae.encode(x)
    raw = vae.encode(x).latent_dist.mode()
    want = (raw - torch.tensor([0.2, -0.1])[None, :, None, None]) * 0.5 / torch.tensor([2.0, 4.0])[None, :, None, None]
    assert torch.allclose(z, want, atol=1e-5)
    # Same config and folder name, different weights -> different names (latent-cache keys).
    torch.manual_seed(1)
    AutoencoderKL(**vae.config).save_pretrained(tmp_path / "other" / tmp_path.name)
    other = DiffusersAutoencoder.from_pretrained(tmp_path / "other" / tmp_path.name)
    assert other.name != ae.name and other.name.split("-")[:-1] == ae.name.split("-")[:-1]
    assert DiffusersAutoencoder.from_pretrained(tmp_path).name == ae.name
    sampled = DiffusersAutoencoder.from_pretrained(tmp_path, sample_posterior=True)
    a = sampled.encode(x, generator=torch.Generator().manual_seed(0))
    b = sampled.encode(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, z)


def test_unsupported_diffusers_class_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(AutoencoderNotFoundError, match="UNet2DModel"):
        load_autoencoder(tmp_path)


# ---------------------------------------------------------------------------------------------------- pixel, errors
def test_pixel_space_is_identity():
    ae = load_autoencoder("pixel")
    assert isinstance(ae, PixelSpace) and ae.latent_channels == 3 and ae.downsample_factor == 1
    x = _images(2, 8)
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert torch.equal(ae.decode(x * 3), (x * 3).clamp(-1, 1))


def test_autoencoders_save_and_load_as_pipeline_components(tmp_path):
    # the kwargs DiffusionPipeline.from_pretrained passes to every ModelMixin component must be accepted
    load_kwargs = dict(torch_dtype=None, device_map=None, low_cpu_mem_usage=False, use_safetensors=None)
    PixelSpace().save_pretrained(tmp_path / "pixel")
    assert sorted(p.name for p in (tmp_path / "pixel").iterdir()) == ["config.json"]
    assert isinstance(PixelSpace.from_pretrained(tmp_path / "pixel", **load_kwargs), PixelSpace)
    assert isinstance(load_autoencoder(tmp_path / "pixel"), PixelSpace)
    with pytest.raises(AutoencoderNotFoundError, match="PixelSpace"):
        PixelSpace.from_pretrained(tmp_path / "nothing")

    torch.manual_seed(0)
    ae = DiffusersAutoencoder(_tiny_kl().eval())
    ae.save_pretrained(tmp_path / "kl")  # the VAE itself: the pipeline directory is self-contained
    assert json.loads((tmp_path / "kl" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    back = DiffusersAutoencoder.from_pretrained(tmp_path / "kl", **load_kwargs)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.decode(z), ae.decode(z))


def test_missing_and_invalid_dirs_give_clear_errors(tmp_path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(AutoencoderNotFoundError, match="does not exist") as e:
        load_autoencoder(str(missing))
    assert str(missing) in str(e.value) and "pixel" in str(e.value)
    with pytest.raises(AutoencoderNotFoundError, match="config.json"):
        load_autoencoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(AutoencoderNotFoundError, match="no weights"):
        load_autoencoder(tmp_path)
    with pytest.raises(AutoencoderNotFoundError, match="does not exist"):
        TinyAutoencoder.from_pretrained(missing)


def test_bad_image_sizes_and_shapes():
    ae = TinyAutoencoder(**TINY_CFG)
    with pytest.raises(InvalidImageSizeError, match="multiple of"):
        ae.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(ValueError, match="3-channel"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_tiny_autoencoder_config_validation():
    with pytest.raises(ValueError, match="decoder_block_out_channels"):
        TinyAutoencoder(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        TinyAutoencoder(encoder_block_out_channels=(6, 16), decoder_block_out_channels=(16, 8), norm_num_groups=4)
    with pytest.raises(TypeError):
        TinyAutoencoder(not_a_key=1)
    with pytest.raises(ValueError, match="preset"):
        TinyAutoencoder.from_preset("f99")


# ---------------------------------------------------------------------------------------------------- tiny AE
def test_tiny_autoencoder_shapes_and_decoder_has_no_full_convs():
    ae = TinyAutoencoder.from_preset("f4c4")
    assert ae.downsample_factor == 4 and ae.latent_channels == 4
    x = _images(2, 64)
    z = ae.encode(x)
    assert z.shape == (2, 4, 16, 16)
    assert ae.decode(z).shape == (2, 3, 64, 64)
    # SnapGen-style decoder: inside the blocks only depthwise 3x3 and pointwise 1x1 convolutions, no attention.
    for block in ae.decoder.blocks:
        for conv in [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]:
            assert conv.kernel_size == (1, 1) or conv.groups == conv.in_channels
    assert not any("attn" in n or "attention" in n for n, _ in ae.named_modules())
    big = TinyAutoencoder.from_preset("f8c16")
    assert big.encode(_images(1, 64)).shape == (1, 16, 8, 8)


def test_fit_latent_normalization_gives_unit_latents():
    torch.manual_seed(0)
    ae = TinyAutoencoder(**TINY_CFG).eval()
    x = _images(8, 32)
    name_before = ae.name
    ae.fit_latent_normalization([x[:4], x[4:]])
    assert ae.name != name_before and ae.name.startswith("tiny-ae-f2c4-")  # cache keys follow the statistics
    z = ae.encode(x)
    per_channel = z.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(4), atol=1e-4)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(4), atol=1e-3)
    assert ae.normalization_fitted
    # decode(encode) == decode_raw(encode_raw): the normalisation round-trips exactly.
    with torch.no_grad():
        assert torch.allclose(ae.decode(z), ae.decode_raw(ae.encode_raw(x)).clamp(-1, 1), atol=1e-5)


def test_loss_terms():
    x = _images(2, 16)
    zero = autoencoder_loss(x, x, latents=torch.zeros(2, 4, 4, 4))
    assert zero["loss"].item() == 0 and zero["l1"].item() == 0 and zero["edge"].item() == 0
    shifted = autoencoder_loss(x + 0.1, x, edge_weight=0.5)
    assert abs(shifted["l1"].item() - 0.1) < 1e-6 and shifted["edge"].item() < 1e-6  # a constant offset has no edges
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert autoencoder_loss(blurred, x)["edge"].item() > 0.1


def test_train_autoencoder_learns_saves_and_reloads(tmp_path):
    from PIL import Image

    data = RectanglesDataset(n=48, size=16)
    out = tmp_path / "ae"
    result = train_autoencoder(data, out, steps=30, batch_size=8, lr=1e-2, resolution=16, model_config=TINY_CFG,
                               warmup_steps=3, stats_batches=2, device="cpu", seed=0, progress=False)
    losses = result.losses
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert result.final_l1 is not None and result.final_l1 < 0.5

    # Files: diffusers layout, a log line per step, a reconstruction image (2 rows of 8 images).
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".save-")]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and abs(log[-1]["loss"] - losses[-1]) < 1e-5
    png = Image.open(result.reconstruction_path)
    assert png.size == (8 * 16, 2 * 16)

    # Normalisation was fitted, and save/load round-trips bit for bit.
    model = result.model
    assert model.normalization_fitted
    loaded = load_autoencoder(out)
    assert isinstance(loaded, TinyAutoencoder) and loaded.name == model.name
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = torch.stack([data[i]["image"] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(model.encode(x), loaded.encode(x))
        assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))
    z = loaded.encode(torch.stack([d["image"] for d in data]))
    assert abs(z.mean().item()) < 0.3 and 0.6 < z.std().item() < 1.5  # ~normalised on the training data


def test_train_autoencoder_resizes_and_validates(tmp_path):
    data = RectanglesDataset(n=8, size=48)  # center-crop/resize 48 -> 16
    result = train_autoencoder(data, tmp_path / "a", steps=2, batch_size=4, resolution=16, model_config=TINY_CFG,
                               stats_batches=1, device="cpu", progress=False)
    assert len(result.losses) == 2
    with pytest.raises(InvalidImageSizeError, match="resolution 17"):
        train_autoencoder(data, tmp_path / "b", steps=1, batch_size=4, resolution=17, model_config=TINY_CFG,
                          device="cpu", progress=False)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_autoencoder(data, tmp_path / "c", steps=1, batch_size=16, resolution=16, model_config=TINY_CFG,
                          device="cpu", progress=False)
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(data, tmp_path / "d", steps=0, model_config=TINY_CFG, progress=False)


def test_train_autoencoder_on_iterable_dataset(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from RectanglesDataset(n=6, size=16)  # shorter than one epoch of steps: the loader restarts

    result = train_autoencoder(Stream(), tmp_path, steps=4, batch_size=4, resolution=16, model_config=TINY_CFG,
                               stats_batches=1, device="cpu", progress=False)
    assert len(result.losses) == 4 and (tmp_path / "reconstruction.png").is_file()


def test_train_autoencoder_runs_on_the_trainer_and_resumes_exactly(tmp_path):
    from PIL import Image
    from safetensors.torch import load_file

    data = RectanglesDataset(n=24, size=16)
    kw = dict(steps=6, batch_size=4, lr=1e-2, resolution=16, model_config=TINY_CFG, warmup_steps=2, save_every=3,
              stats_batches=2, device="cpu", progress=False)
    full = train_autoencoder(data, tmp_path / "full", **kw)
    run = tmp_path / "full" / "train"  # the Trainer's checkpoints, with EMA, and its reconstruction previews
    assert (run / "latest").read_text().strip() == "checkpoint-0000006"
    assert (run / "checkpoint-0000003" / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert Image.open(run / "samples" / "step-0000003.png").size == (4 * 16, 2 * 16)

    # Interrupted after step 3: resume=True continues from there and ends where the uninterrupted run did.
    cut = tmp_path / "cut"
    train_autoencoder(data, cut, **kw)
    shutil.rmtree(cut / "train" / "checkpoint-0000006")
    (cut / "train" / "latest").write_text("checkpoint-0000003\n")
    resumed = train_autoencoder(data, cut, resume=True, **kw)
    assert resumed.losses == full.losses[3:]
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(cut / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (cut / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))

    # Without resume, a second run replaces the first (as train-ae always did) instead of mixing checkpoints.
    train_autoencoder(data, cut, **{**kw, "steps": 2})
    assert sorted(p.name for p in (cut / "train").glob("checkpoint-*")) == ["checkpoint-0000002"]


def test_cli_train_ae_and_resume(tmp_path, capsys):
    from pocketdit.cli import main

    out = tmp_path / "ae"
    args = ["train-ae", "-o", str(out), "--batch-size", "4", "--resolution", "16", "--data-option", "length=8",
            "--device", "cpu"]
    assert main([*args, "--steps", "2"]) == 0
    assert isinstance(load_autoencoder(out), TinyAutoencoder)
    assert main([*args, "--steps", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "at step 2" in printed and f"saved {out}" in printed
    assert (out / "train" / "latest").read_text().strip() == "checkpoint-0000003"
