"""k-means palettization of one weight, GPTQ-style assignment, layer sensitivity and bit choice
(pocketdit.quantize.palettize)."""

import copy

import pytest
import torch

from pocketdit import quantize as Q
from pocketdit.quantize.palettize import _nearest_entry


def test_palettize_weight_has_at_most_2_pow_n_values_and_dequantizes_exactly():
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    pw = Q.palettize_weight(w, nbits=3)
    assert pw.lut.shape == (1, 8)
    assert int(pw.indices.max()) < 8
    deq = pw.dequantize()
    assert deq.shape == w.shape
    assert deq.unique().numel() <= 8
    # k-means with 8 levels beats uniform 8-level rounding of the same range
    levels = torch.linspace(w.min(), w.max(), 8)
    uniform = levels[(w[..., None] - levels).abs().argmin(-1)]
    assert (deq - w).pow(2).mean() < (uniform - w).pow(2).mean()
    # LUT is stored in fp16: values survive a round trip through half precision unchanged
    assert torch.equal(pw.lut, pw.lut.half().float())


def test_tiny_weights_are_their_own_palette():
    w = torch.randn(2, 3)
    pw = Q.palettize_weight(w, nbits=4)
    assert torch.equal(pw.dequantize(), w.half().float())


def test_choose_layer_bits_respects_budget_and_promotes_most_sensitive():
    numels = {"a": 100, "b": 100, "c": 800}
    sens = {"a": 5.0, "b": 1.0, "c": 10.0}
    bits = Q.choose_layer_bits(sens, numels, 4, 8, 4.5)
    # c is most sensitive but promoting it costs 3200 extra bits > budget 500; a fits (400), then b does not
    assert bits == {"a": 8, "b": 4, "c": 4}
    avg = sum(bits[n] * numels[n] for n in numels) / sum(numels.values())
    assert avg <= 4.5


def test_choose_layer_bits_per_bit_prefers_error_per_weight():
    numels = {"big": 400, "s1": 100, "s2": 100, "rest": 1400}
    sens = {"big": 4.0, "s1": 3.0, "s2": 2.0, "rest": 0.1}
    # budget 0.8 * 2000 = 1600 extra bits: by sensitivity, "big" comes first and takes all of it (1600);
    # per bit (s1 0.03, s2 0.02, big 0.01 per weight), s1 and s2 come first (800) and big no longer fits
    assert Q.choose_layer_bits(sens, numels, 4, 8, 4.8) == {"big": 8, "rest": 4, "s1": 4, "s2": 4}
    assert Q.choose_layer_bits(sens, numels, 4, 8, 4.8, per_bit=True) == {"big": 4, "rest": 4, "s1": 8, "s2": 8}


def test_model_output_sensitivity_is_the_error_of_quantizing_that_layer_alone(model, calibration, outputs):
    q = copy.deepcopy(model)
    layers = Q.palettizable_layers(q)
    names = ["patch_embed", "final_layer.linear", "down_blocks.0.ff.fc1"]
    palettes = {n: Q.palettize_weight(layers[n].weight, 2) for n in names}
    before = {n: p.clone() for n, p in q.state_dict().items()}
    sens = Q.layer_sensitivity(q, calibration, palettes, metric="model_output")
    assert set(sens) == set(names)
    for n, p in q.state_dict().items():  # every weight restored
        assert torch.equal(p, before[n]), n
    ref = outputs(q, calibration)
    name = "down_blocks.0.ff.fc1"
    layers[name].weight.data.copy_(palettes[name].dequantize())
    got = outputs(q, calibration)
    expected = sum((g - r).double().pow(2).sum() for g, r in zip(got, ref)) / sum(r.double().pow(2).sum() for r in ref)
    assert sens[name] == pytest.approx(expected.item(), rel=1e-6)
    assert all(v > 0 for v in sens.values())


def test_nearest_entry_matches_argmin_for_unsorted_luts():
    torch.manual_seed(0)
    lut = torch.randn(3, 16)
    w = torch.randn(3, 200)
    expected = (w[:, :, None] - lut[:, None, :]).abs().argmin(-1)
    assert torch.equal(_nearest_entry(w, lut), expected)


def _output_error(w, wq, h):
    d = (w - wq).double()
    return torch.einsum("ij,jk,ik->", d, h.double(), d).item()


def test_gptq_assignment_lowers_layer_output_error_and_keeps_the_palette():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    mix = torch.randn(32, 32)  # correlated inputs: what GPTQ exploits and nearest rounding ignores
    x = torch.randn(512, 32) @ mix
    h = x.T @ x / len(x)
    nearest = Q.palettize_weight(w, nbits=3)
    gptq, latent = Q.gptq_palettize(w, nearest, h)
    assert torch.equal(gptq.lut, nearest.lut) and gptq.indices.dtype == nearest.indices.dtype
    assert int(gptq.indices.max()) < 8
    assert _output_error(w, gptq.dequantize(), h) < 0.7 * _output_error(w, nearest.dequantize(), h)
    # the compensated weight is where QAT starts: its nearest entries are exactly the assigned indices
    assert torch.equal(_nearest_entry(latent.reshape(1, -1), gptq.lut).reshape(w.shape), gptq.indices.long())
    # per-channel-group LUTs: each row uses its own group's table
    grouped = Q.palettize_weight(w, nbits=3, granularity="per_grouped_channel", group_size=8)
    g2, _ = Q.gptq_palettize(w, grouped, h)
    assert g2.lut.shape == (3, 8)
    assert _output_error(w, g2.dequantize(), h) < _output_error(w, grouped.dequantize(), h)


def test_gptq_assignment_never_does_worse_than_nearest():
    # white inputs: nearest rounding is already optimal for the output error; a rank-1 H is ill-conditioned
    torch.manual_seed(1)
    w = torch.randn(16, 12)
    nearest = Q.palettize_weight(w, nbits=2)
    v = torch.randn(12, 1)
    for h in (torch.eye(12), v @ v.T):
        pw, latent = Q.gptq_palettize(w, nearest, h)
        assert _output_error(w, pw.dequantize(), h) <= _output_error(w, nearest.dequantize(), h) + 1e-9
    # an input that was always zero in calibration: its column keeps plain rounding of the original weight
    x = torch.randn(256, 12) @ torch.randn(12, 12)
    x[:, 3] = 0
    pw, latent = Q.gptq_palettize(w, nearest, x.T @ x / len(x))
    assert torch.equal(pw.indices[:, 3], nearest.indices[:, 3])
    assert torch.equal(latent[:, 3], w[:, 3])
