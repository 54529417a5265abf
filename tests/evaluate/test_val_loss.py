"""evaluate/val_loss.py: the same number for the same model, a lower one for the model that predicts better."""

import torch

from pocketdit.autoencoder import PixelSpace
from pocketdit.data.shapes import ShapesDataset
from pocketdit.evaluate.val_loss import validation_loss
from pocketdit.model import PocketDiT
from pocketdit.pipeline import PocketDiTPipeline, make_scheduler


class FakeText:
    embed_dims = (32,)

    def encode(self, prompts):
        states = torch.stack([torch.randn(6, 32, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]


def _pipe(model):
    return PocketDiTPipeline(model, make_scheduler(3.0), FakeText(), PixelSpace())


def test_validation_loss_is_deterministic_and_ranks_models():
    data = ShapesDataset(resolution=16, length=8, seed=5, phrasing="heldout")
    zero = PocketDiT.from_preset("nano", in_channels=3, num_kv_heads=4, elastic_widths=[0.5, 1.0])  # predicts v = 0
    a = validation_loss(_pipe(zero), data, num_images=8, num_t=4, batch_size=4)
    b = validation_loss(_pipe(zero), data, num_images=8, num_t=4, batch_size=8)
    assert a["loss"] == b["loss"] and len(a["per_t"]) == 4 and a["ci95"] > 0  # batching does not change it
    # per-image losses, in scene order whatever the batching, so two models can be compared pairwise
    assert a["per_image"] == b["per_image"] and len(a["per_image"]) == 8
    assert abs(sum(a["per_image"]) / 8 - a["loss"]) < 1e-6
    # v = 0 costs E|noise - x0|^2 = 1 + E[x0^2] at every t
    x0 = torch.stack([data[i]["image"] for i in range(8)])
    assert abs(a["loss"] - (1 + x0.square().mean().item())) < 0.1
    half = validation_loss(_pipe(zero), data, num_images=8, num_t=4, width=0.5)
    assert abs(half["loss"] - a["loss"]) < 1e-6  # a zero output layer at every width
    with torch.no_grad():
        zero.final_layer.linear.bias.normal_(0, 3.0)  # a worse model
    worse = validation_loss(_pipe(zero), data, num_images=8, num_t=4)
    assert worse["loss"] > a["loss"] + 1
