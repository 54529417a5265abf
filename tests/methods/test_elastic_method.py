"""methods/elastic.py: one elastic step trains the full width and a sampled sub-width of one supernet."""

import pytest
import torch

from pocketdit.autoencoder import PixelSpace
from pocketdit.config import load_config
from pocketdit.methods import build_method
from pocketdit.methods.elastic import ElasticPretrain
from pocketdit.model import PocketDiT
from pocketdit.trainer import Trainer


class FakeText:
    embed_dims = (32,)
    dropout_probs = [0.0]

    def encode(self, prompts):
        states = torch.stack([torch.randn(6, 32, generator=torch.Generator().manual_seed(len(p))) for p in prompts])
        return [states], [torch.ones(len(prompts), 6, dtype=torch.bool)]


def _method(widths=(0.5, 0.75, 1.0), **options):
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", in_channels=3, num_kv_heads=4, elastic_widths=list(widths))
    with torch.no_grad():  # a fresh model's zero-initialised output layer would give zero gradients upstream
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ElasticPretrain(model, FakeText(), PixelSpace(), **options)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "caption": [f"c{i}" for i in range(n)]}


def test_one_step_gives_gradients_to_the_full_and_the_drawn_width_only():
    method = _method(seed=1)
    method.global_step = 0
    (sub,) = method.widths_for_step(0)
    out = method.step(_batch())
    model = method.model
    assert model.width == 1.0  # the step leaves the supernet at full width
    key = f"{sub:g}".replace(".", "_")
    other = "0_75" if key == "0_5" else "0_5"
    blk = model.down_blocks[0]
    assert blk.scale_shift_table.grad is not None and blk.scale_shift_table.grad.abs().sum() > 0
    assert blk.scale_shift_tables[key].grad is not None and blk.scale_shift_tables[key].grad.abs().sum() > 0
    assert blk.scale_shift_tables[other].grad is None  # the width not drawn is untouched
    assert blk.norm_cross.width_weight[key].grad is not None
    assert {"loss", "loss_w1", f"loss_w{sub:g}", f"distill_w{sub:g}", "loss_w1_avg"} <= set(out)
    assert not out["loss"].requires_grad and torch.isfinite(out["loss"])


def test_the_full_width_term_is_plain_flow_matching_and_the_sub_width_is_rescaled_to_it():
    method = _method(seed=1, distill_weight=0.0, balance="running_mean")
    out = method.step(_batch())
    (sub,) = method.widths_for_step(0)
    # first step: running means are the step's own losses, so the sub term is rescaled to the full loss
    assert out["loss"].item() == pytest.approx(2 * out["loss_w1"].item(), rel=1e-5)
    raw = _method(seed=1, distill_weight=0.0, balance="none").step(_batch())
    assert raw["loss"].item() == pytest.approx(raw["loss_w1"].item() + raw[f"loss_w{sub:g}"].item(), rel=1e-5)


def test_width_draws_depend_on_seed_and_step_only_and_sandwich_takes_every_width():
    a, b = _method(seed=3), _method(seed=3)
    assert [a.widths_for_step(s) for s in range(20)] == [b.widths_for_step(s) for s in range(20)]
    assert {w for s in range(20) for w in a.widths_for_step(s)} == {0.5, 0.75}
    assert _method(sampling="sandwich").widths_for_step(7) == [0.5, 0.75]
    only_half = _method(width_probs=[1, 0])
    assert {w for s in range(20) for w in only_half.widths_for_step(s)} == {0.5}


@pytest.mark.parametrize("options,match", [
    ({"sampling": "random"}, "sampling"), ({"balance": "grad_norm"}, "balance"), ({"distill_weight": -1}, "distill"),
    ({"width_probs": [1.0]}, "width_probs"), ({"balance_momentum": 1.0}, "momentum"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        _method(**options)


def test_a_plain_model_is_refused():
    with pytest.raises(ValueError, match="elastic_widths"):
        build_method("elastic", model=PocketDiT.from_preset("nano", in_channels=3), text_conditioner=FakeText(),
                     autoencoder=PixelSpace())


def _config(out, steps, *extra):
    return load_config(None, [
        "--train.output_dir", str(out), "--train.steps", str(steps), "--data.batch_size", "4",
        "--data.resolution", "16", "--train.checkpoint_every", "2", "--train.sample_every", "0",
        "--train.log_every", "1", "--train.progress", "false", "--optim.warmup_steps", "1", *extra,
    ])


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 16, 16, generator=g) * 2 - 1, "caption": f"c{i % 3}", "meta": {}} for i in range(n)]


def test_resume_reproduces_the_uninterrupted_run_including_the_running_means(tmp_path):
    full = Trainer(_method(seed=1), _data(), _config(tmp_path / "a", 4)).train()
    Trainer(_method(seed=1), _data(), _config(tmp_path / "b", 2)).train()
    resumed = Trainer(_method(seed=1), _data(), _config(tmp_path / "b", 4, "--train.resume", "auto")).train()
    assert list(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [full[s] for s in (3, 4)]
