"""Self-distillation of palettized models: float parameters, LUT entries, indices (QAT), guided loss
(pocketdit.quantize.distill)."""

import copy

import torch

from pocketdit import quantize as Q
from pocketdit.quantize.distill import _guided


def test_self_distillation_lowers_error_and_keeps_palettes(model, calibration, palettized):
    q = copy.deepcopy(palettized[0])
    before = {n: m.weight.clone() for n, m in Q.palettizable_layers(q).items()}
    losses = Q.self_distill_(q, model, calibration, steps=8, lr=1e-3, progress=False)
    assert sum(losses[-4:]) / 4 < losses[0]
    for name, module in Q.palettizable_layers(q).items():
        assert torch.equal(module.weight, before[name]), f"{name} palettized weight changed"
    assert all(p.requires_grad for p in q.parameters())  # flags restored


def test_self_distillation_with_luts_trains_palette_values_only(
    tmp_path, model, calibration, palettized, outputs, F_mse
):
    q = copy.deepcopy(palettized[0])
    before = {n: (m.palettized_weight.lut.clone(), m.palettized_weight.indices.clone()) for n, m in Q.palettizable_layers(q).items()}
    err_before = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    losses = Q.self_distill_(q, model, calibration, steps=12, lr=1e-3, train_luts=True, progress=False)
    err_after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert err_after < err_before, (err_before, err_after)
    changed = 0
    for name, module in Q.palettizable_layers(q).items():
        pw = module.palettized_weight
        lut, idx = before[name]
        assert torch.equal(pw.indices, idx), f"{name}: indices must not change"
        assert pw.lut.shape == lut.shape
        assert torch.equal(pw.lut, pw.lut.half().float()), f"{name}: LUT not fp16-representable"
        assert torch.equal(module.weight, pw.dequantize()), f"{name}: weight out of sync with its LUT"
        changed += not torch.equal(pw.lut, lut)
    assert changed > len(before) // 2
    assert len(losses) == 12
    Q.save_quantized(q, tmp_path / "ft")
    for a, b in zip(outputs(q, calibration), outputs(Q.load_quantized(tmp_path / "ft"), calibration)):
        assert torch.equal(a, b)


def test_self_distillation_with_indices_reassigns_weights_and_stays_palettized(
    tmp_path, model, calibration, palettized, outputs, F_mse
):
    q = copy.deepcopy(palettized[0])
    before = {n: m.palettized_weight.indices.clone() for n, m in Q.palettizable_layers(q).items()}
    err_before = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    Q.self_distill_(q, model, calibration, steps=12, lr=3e-4, train_indices=True, progress=False)
    err_after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert err_after < err_before, (err_before, err_after)
    moved = 0
    for name, module in Q.palettizable_layers(q).items():
        pw = module.palettized_weight
        assert pw.lut.shape[1] == 2**pw.nbits and int(pw.indices.max()) < 2**pw.nbits
        assert torch.equal(pw.lut, pw.lut.half().float()), f"{name}: LUT not fp16-representable"
        assert torch.equal(module.weight, pw.dequantize()), f"{name}: weight out of sync with its LUT"
        assert torch.unique(module.weight).numel() <= 2**pw.nbits
        moved += int((pw.indices.long() != before[name].long()).sum() > 0)
    assert moved > 0, "straight-through training never moved a weight to another LUT entry"
    Q.save_quantized(q, tmp_path / "qat")
    for a, b in zip(outputs(q, calibration), outputs(Q.load_quantized(tmp_path / "qat"), calibration)):
        assert torch.equal(a, b)


def test_self_distillation_on_guided_velocity(model, calibration, palettized, outputs, F_mse):
    # batches stacked [conditional; unconditional]: the loss adds the guided velocity's error
    q = copy.deepcopy(palettized[0])

    def guided_error(m):
        return sum(F_mse(_guided(g, 3.0), _guided(r, 3.0)) for g, r in zip(outputs(m, calibration), outputs(model, calibration)))

    before = guided_error(q)
    losses = Q.self_distill_(q, model, calibration, steps=12, lr=3e-4, train_indices=True, guidance_scale=3.0, progress=False)
    assert guided_error(q) < before and len(losses) == 12
    v = torch.randn(4, 3, requires_grad=True)
    guided = _guided(v, 3.0)
    assert torch.allclose(guided, v[2:] + 3.0 * (v[:2] - v[2:]))
    guided.sum().backward()  # the guided term of the loss must reach the student
    assert torch.allclose(v.grad, torch.tensor([3.0, -2.0])[:, None].repeat_interleave(2, 0).expand(4, 3))
