"""quantize_ and the scheme configs: the bit budget, config errors, calibration use, GPTQ by default, psnr
(pocketdit.quantize.api)."""

import copy

import pytest
import torch

from pocketdit import quantize as Q
from pocketdit.quantize import api


def test_palettized_model_meets_bit_budget_and_stays_close(model, calibration, palettized, outputs):
    q, report = palettized
    assert 4.0 < report.average_bits <= 4.3
    assert report.num_high_bit_layers >= 1
    layers = Q.palettizable_layers(q)
    assert set(report.layer_bits) == set(layers)
    for name, module in layers.items():
        assert module.weight.unique().numel() <= 2 ** report.layer_bits[name], name
    # bits follow the model-output sensitivity per weight: the layer with the most error per weight is 8-bit
    assert Q.choose_layer_bits(report.sensitivity, report.numels, 4, 8, 4.3, per_bit=True) == report.layer_bits
    assert report.layer_bits[max(report.numels, key=lambda n: report.sensitivity[n] / report.numels[n])] == 8
    ref, got = outputs(model, calibration), outputs(q, calibration)
    assert min(Q.psnr(g, r) for g, r in zip(got, ref)) > 25.0


def test_config_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        Q.config_for_scheme("int3")
    with pytest.raises(ValueError, match="unknown PalettizeConfig key"):
        Q.config_for_scheme("palettize4", bits=4)
    with pytest.raises(ValueError, match="target_avg_bits"):
        Q.PalettizeConfig(target_avg_bits=9.0)
    with pytest.raises(ValueError, match="nbits"):
        Q.PalettizeConfig(nbits=5)
    with pytest.raises(ValueError, match="assignment"):
        Q.PalettizeConfig(assignment="round")
    with pytest.raises(ValueError, match="group_size"):
        Q.Int8DynActInt4Weight(group_size=24)
    with pytest.raises(ValueError, match="calibration"):
        Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=None, progress=False)
    with pytest.raises(ValueError, match="sensitivity_batches"):
        Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=[{}], sensitivity_batches=0, progress=False)


def test_sensitivity_batches_caps_the_ranking_but_gptq_statistics_use_every_batch(model, monkeypatch):
    batches = Q.random_calibration(model, num_batches=4, batch_size=1)
    seen = {}
    real_moments, real_sensitivity = Q.input_second_moments, Q.layer_sensitivity

    def moments(m, layers, calibration):
        seen["moments"] = list(calibration)
        return real_moments(m, layers, calibration)

    def sensitivity(m, calibration, *args, **kwargs):
        seen["ranking"] = list(calibration)
        return real_sensitivity(m, calibration, *args, **kwargs)

    monkeypatch.setattr(api, "input_second_moments", moments)
    monkeypatch.setattr(api, "layer_sensitivity", sensitivity)
    Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=batches, sensitivity_batches=2, progress=False)
    assert [id(b) for b in seen["moments"]] == [id(b) for b in batches]
    assert [id(b) for b in seen["ranking"]] == [id(batches[0]), id(batches[2])]  # evenly spaced


def test_psnr():
    x = torch.linspace(-1, 1, 100)
    assert Q.psnr(x, x) == float("inf")
    noisy = x + 0.01
    assert Q.psnr(noisy, x, peak=2.0) == pytest.approx(20 * torch.log10(torch.tensor(2.0 / 0.01)).item(), rel=1e-4)


def test_gptq_palettized_model_is_closer_than_nearest_and_qat_starts_from_it(model, calibration, outputs, F_mse):
    # the default config assigns GPTQ-style; nearest is the plain k-means rounding
    assert Q.PalettizeConfig().assignment == "gptq"
    errors = {}
    for assignment in ("nearest", "gptq"):
        q = copy.deepcopy(model)
        Q.quantize_(q, Q.PalettizeConfig(target_avg_bits=4.0, assignment=assignment), calibration=calibration, progress=False)
        errors[assignment] = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
        for name, module in Q.palettizable_layers(q).items():
            assert torch.equal(module.weight, module.palettized_weight.dequantize()), name
            latent = getattr(module, "palettized_latent", None)
            assert (latent is not None) == (assignment == "gptq" and isinstance(module, torch.nn.Linear)), name
    assert errors["gptq"] < errors["nearest"], errors
    # QAT from the compensated weights: zero learning rate keeps GPTQ's indices (from the teacher's weights
    # it would snap back to nearest rounding)
    Q.self_distill_(q, model, calibration, steps=1, lr=0.0, train_indices=True, progress=False)
    after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert after == pytest.approx(errors["gptq"], rel=1e-5)
