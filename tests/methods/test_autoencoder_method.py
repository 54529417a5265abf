"""The "autoencoder" training method: what `pocketdit train-ae` runs on the shared Trainer."""

import pytest
import torch
from PIL import Image

from pocketdit.autoencoder import TinyAutoencoder
from pocketdit.methods import build_method, method_options
from pocketdit.methods.autoencoder import AutoencoderReconstruction, ImageCollate
from pocketdit.model import PocketDiT

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CFG = dict(latent_channels=4, encoder_block_out_channels=(8, 16), decoder_block_out_channels=(16, 8),
                norm_num_groups=4)


def _method(**kwargs):
    torch.manual_seed(0)
    return build_method("autoencoder", model=TinyAutoencoder(**TINY_CFG), text_conditioner=None, autoencoder=None,
                        **kwargs)


def test_registered_with_its_options():
    assert isinstance(_method(), AutoencoderReconstruction)
    assert method_options("autoencoder") == ["edge_weight", "latent_l2_weight", "preview"]


def test_step_returns_a_finite_differentiable_loss():
    method = _method()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = method.step({"image": images})
    assert set(out) == {"loss", "l1", "edge", "latent_l2"}
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None for p in method.trainable_parameters())


def test_collate_and_preview_png(tmp_path):
    # (image, label) tuples and bare tensors are accepted; images are center-cropped and resized
    batch = ImageCollate(16)([(torch.zeros(3, 24, 32), 0), torch.zeros(3, 16, 16)])
    assert batch["image"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="sample 0"):
        ImageCollate(16)([torch.zeros(1, 16, 16)])

    assert _method().save_samples(None, tmp_path / "none.png") is None  # no preview batch: nothing to draw
    method = _method(preview=batch["image"])
    path = method.save_samples(method.model.eval(), tmp_path / "preview.png")
    assert Image.open(path).size == (2 * 16, 2 * 16)  # inputs over reconstructions


def test_refuses_a_diffusion_transformer():
    with pytest.raises(TypeError, match="train-ae"):
        build_method("autoencoder", model=PocketDiT.from_preset("nano", in_channels=3), text_conditioner=None,
                     autoencoder=None)
